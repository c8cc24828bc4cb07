"""Training loop with compressed neural gradients: metrics, checkpoints, exact resume, DDP.

One function, ``train(cfg)``, serves ``gradcomp train``, the demo and the tests. Determinism: the
model is initialised from ``cfg.seed``, batches depend only on (seed, epoch), and every random
draw of the compressors comes from their own generators, whose states are checkpointed. A run
killed after epoch k and resumed with ``resume=True`` therefore ends bit for bit where an
uninterrupted run would (same machine, same thread count).

Data parallel: with ``world_size > 1`` (spawned by ``gradcomp train --nproc N`` or launched by
``torchrun``) each rank trains on its shard (rank::world_size) of the training set inside
``DistributedDataParallel``; ``cfg.comm`` selects the communication hook; rank 0 writes outputs.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from gradcomp.apps.data import TensorSplit, load_dataset, make_loader
from gradcomp.apps.experiments import evaluate, resolve_device
from gradcomp.apps.models import build_model
from gradcomp.apps.recipes import Recipe, get_recipe
from gradcomp.apps.tables import write_json
from gradcomp.numerics._checks import require_choice

__all__ = ["TrainConfig", "TrainResult", "train", "CheckpointMismatchError"]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "constant")


class CheckpointMismatchError(ValueError):
    """Resuming from a checkpoint written by another recipe, model or dataset."""


@dataclass
class TrainConfig:
    recipe: str | Recipe = "baseline"
    model: str = "resnet20"
    dataset: str = "fashion-mnist"
    epochs: int = 1
    batch_size: int = 128
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    seed: int = 0
    device: str = "cpu"
    out: str | None = None
    resume: bool = False
    data_dir: str | None = None
    max_train: int | None = None
    width: int | None = None
    workers: int = 0
    progress: bool = True
    max_steps_per_epoch: int | None = None  # truncate epochs (quick runs, tests)
    max_test: int | None = None  # evaluate on the first N test images (quick runs)
    comm: str = "allreduce"  # DDP communication hook (world_size > 1)
    comm_options: dict = field(default_factory=dict)

    def __post_init__(self):
        require_choice(self.optimizer, "optimizer", OPTIMIZERS)
        require_choice(self.schedule, "schedule", SCHEDULES)
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")

    def recipe_obj(self) -> Recipe:
        return self.recipe if isinstance(self.recipe, Recipe) else get_recipe(self.recipe)

    def identity(self) -> dict:
        """What a checkpoint must match to be resumed: everything that changes the trajectory."""
        r = self.recipe_obj()
        return {
            "recipe": r.to_dict(), "model": self.model, "dataset": self.dataset,
            "batch_size": self.batch_size, "lr": self.lr, "optimizer": self.optimizer,
            "schedule": self.schedule, "seed": self.seed, "max_train": self.max_train,
            "width": self.width, "epochs": self.epochs, "momentum": self.momentum,
            "weight_decay": self.weight_decay, "max_steps_per_epoch": self.max_steps_per_epoch,
        }


@dataclass
class TrainResult:
    history: list[dict]
    test_accuracy: float
    test_loss: float
    out: Path | None
    seconds: float
    # median wall time of a training step (forward+backward+compression+update); the median
    # ignores the first steps' one-off compilation of the fused kernels
    step_seconds: float
    loss_trace: list[float] = field(default_factory=list)  # training loss of every step (this run)


def _make_optimizer(cfg: TrainConfig, params):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _make_schedule(cfg: TrainConfig, opt, total_steps: int):
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))
        )
    if cfg.schedule == "step":  # x0.1 at 50% and 75% of training (the paper's CIFAR regime)
        return torch.optim.lr_scheduler.MultiStepLR(
            opt, [int(0.5 * total_steps), int(0.75 * total_steps)], 0.1
        )
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _shard(split: TensorSplit, rank: int, world: int) -> TensorSplit:
    if world == 1:
        return split
    return TensorSplit(split.x[rank::world], split.y[rank::world])


def _dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train(cfg: TrainConfig) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.dataset`` with ``cfg.recipe``; see the module docstring."""
    from gradcomp.integration.wrap import compress_gradients

    recipe = cfg.recipe_obj()
    rank, world = _dist_info()
    dev = resolve_device(cfg.device)
    if world > 1 and dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(dev)
    out = Path(cfg.out) if cfg.out else None
    is_main = rank == 0
    identity = cfg.identity()
    ckpt_path = out / "checkpoint.pt" if out else None

    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg.dataset, cfg.data_dir, max_train=cfg.max_train)
    model = build_model(cfg.model, in_channels=data.in_channels, num_classes=data.num_classes,
                        image_size=data.image_size, width=cfg.width).to(dev)
    fwd_handle = None
    if recipe.forward is not None:
        from gradcomp.integration.forward import quantize_forward

        fwd_handle = quantize_forward(model, **recipe.forward.kwargs())
    handle = compress_gradients(model, recipe.compression, seed=cfg.seed) \
        if recipe.compression is not None else None

    net: nn.Module = model
    comm_state = None
    if world > 1:
        from gradcomp.integration.ddp_hooks import make_comm_hook

        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None
        )
        comm_state, hook = make_comm_hook(cfg.comm, **cfg.comm_options)
        if hook is not None:
            net.register_comm_hook(comm_state, hook)

    loader = make_loader(_shard(data.train, rank, world), cfg.batch_size, shuffle=True,
                         seed=cfg.seed, drop_last=True, workers=cfg.workers, device=dev)
    test = data.test if cfg.max_test is None else TensorSplit(data.test.x[: cfg.max_test],
                                                              data.test.y[: cfg.max_test])
    test_loader = make_loader(test, 512, shuffle=False, device=dev)
    steps_per_epoch = len(loader)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    opt = _make_optimizer(cfg, model.parameters())
    sched = _make_schedule(cfg, opt, cfg.epochs * steps_per_epoch)

    history: list[dict] = []
    start_epoch = 0
    if cfg.resume:
        if ckpt_path is None or not ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        ck = torch.load(ckpt_path, map_location=dev, weights_only=False)
        if ck["identity_digest"] != _digest(identity):
            diff = [k for k in identity if ck["identity"].get(k) != identity[k]]
            raise CheckpointMismatchError(
                f"checkpoint {ckpt_path} was written by another run configuration "
                f"(differs in: {', '.join(diff)}); use another --out or the same settings"
            )
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["rng_cpu"])
        if dev.type == "cuda" and ck.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ck["rng_cuda"], dev)
        if handle is not None:
            handle.load_state_dict(ck["compressor"])
        if fwd_handle is not None:
            fwd_handle.load_state_dict(ck["forward"])
        history = ck["history"]
        start_epoch = ck["epoch"] + 1

    t_start = time.perf_counter()
    step_times: list[float] = []
    trace: list[torch.Tensor] = []
    for epoch in range(start_epoch, cfg.epochs):
        loader.set_epoch(epoch)
        if handle is not None:
            handle.on_epoch_start(epoch)
        net.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        correct = torch.zeros((), dtype=torch.int64, device=dev)
        seen, skipped = 0, 0
        t_epoch = time.perf_counter()
        bar = tqdm(total=steps_per_epoch, desc=f"{recipe.name} epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (cfg.progress and is_main), leave=False)
        for i, (x, y) in enumerate(loader):
            if i >= steps_per_epoch:
                break
            t0 = time.perf_counter()
            out_ = net(x)
            loss = nn.functional.cross_entropy(out_, y)
            if fwd_handle is not None:
                loss = loss + fwd_handle.alpha_regularization()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if handle is not None:
                stepped = handle.step(opt)
                skipped += 0 if stepped else 1
            else:
                opt.step()
            sched.step()
            step_times.append(time.perf_counter() - t0)
            trace.append(loss.detach())
            loss_sum += loss.detach().double() * y.numel()
            correct += (out_.detach().argmax(1) == y).sum()
            seen += y.numel()
            bar.update(1)
        bar.close()
        epoch_seconds = time.perf_counter() - t_epoch
        test_loss, test_acc = evaluate(model, test_loader, dev)
        row = {
            "epoch": epoch + 1,
            "train_loss": float(loss_sum) / max(seen, 1),
            "train_accuracy": float(correct) / max(seen, 1),
            "test_loss": test_loss,
            "test_accuracy": test_acc,
            "lr": opt.param_groups[0]["lr"],
            "seconds": epoch_seconds,
            "skipped_steps": skipped,
        }
        if handle is not None:
            row.update(handle.metrics(reset=True)["overall"])
        else:
            row.update({"sparsity": 0.0, "bits_per_element": 32.0,
                        "overflow": 0.0, "underflow": 0.0})
        if comm_state is not None and hasattr(comm_state, "metrics"):
            cm = comm_state.metrics()
            row["comm_compression_ratio"] = cm.get("compression_ratio", 1.0)
            row["comm_bytes_sent"] = cm.get("bytes_sent")
        history.append(row)
        if is_main and cfg.progress:
            print(f"[{recipe.name}] epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f} "
                  f"test acc {100 * test_acc:.2f}% sparsity {row['sparsity']:.3f} "
                  f"bits/elem {row['bits_per_element']:.2f} ({epoch_seconds:.1f}s)", flush=True)
        if out is not None and is_main:
            out.mkdir(parents=True, exist_ok=True)
            ck = {
                "identity": identity, "identity_digest": _digest(identity), "epoch": epoch,
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
                "compressor": handle.state_dict() if handle is not None else None,
                "forward": fwd_handle.state_dict() if fwd_handle is not None else None,
                "history": history,
            }
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save(ck, tmp)
            os.replace(tmp, ckpt_path)  # atomic: a kill mid-save leaves the previous checkpoint
            _write_metrics(out, history, cfg, recipe)
    final = history[-1] if history else {"test_accuracy": math.nan, "test_loss": math.nan}
    if handle is not None:
        handle.remove()
    if fwd_handle is not None:
        fwd_handle.remove()
    return TrainResult(
        history=history, test_accuracy=final["test_accuracy"], test_loss=final["test_loss"],
        out=out, seconds=time.perf_counter() - t_start,
        step_seconds=statistics.median(step_times) if step_times else math.nan,
        loss_trace=torch.stack(trace).float().cpu().tolist() if trace else [],
    )


def _write_metrics(out: Path, history: list[dict], cfg: TrainConfig, recipe: Recipe) -> None:
    keys = list(dict.fromkeys(k for row in history for k in row))
    with open(out / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    cfg_dict = dataclasses.asdict(cfg) | {"recipe": recipe.to_dict()}
    write_json(out / "metrics.json", {"config": cfg_dict, "history": history})
