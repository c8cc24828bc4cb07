"""The training loop: compressed neural gradients, metrics, checkpoints, exact resume, DDP.

One function, ``train(cfg, hook=None)``, serves ``gradcomp train``, the demo, the gradient
capture of ``analyze``/``sparsity``/``fitcheck`` (through a :class:`StepHook`) and the tests.

Determinism: the model is initialised from ``cfg.seed``, batches depend only on (seed, epoch),
the neural-gradient compressors' noise is a function of (run seed, rank, step, layer, draw)
(``random.StepStreams``: the step counter is checkpointed) and every other random draw of the
compressors comes from their own generators, whose states are checkpointed. A run killed at any
moment and resumed with ``resume=True`` therefore ends bit for bit where an uninterrupted run
would (same machine, same thread count).

Checkpoints (``OUT/checkpoint.pt``, one per finished epoch): written to a temporary file, then
the previous checkpoint is renamed ``checkpoint.prev.pt`` and the new one renamed into place (both
renames atomic), so a kill at any moment leaves at least one complete checkpoint once the first
one exists. Everything that differs between data-parallel ranks (random states, the
neural-gradient compressor's thresholds, the communication hook's error-feedback memory and
counters) is gathered to rank 0 and saved in that one file, one entry per rank; on resume rank 0
reads the file and sends each rank its entry (no shared file system needed).

Data parallel: with ``world_size > 1`` (spawned by ``gradcomp train --nproc N`` or launched by
``torchrun``) each rank trains on its shard (rank::world_size) of the training set inside
``DistributedDataParallel``; ``cfg.comm`` selects the communication hook; rank 0 writes outputs.
At start-up the ranks all-gather what shapes the trajectory (:func:`run_fingerprint`) and all
refuse together, naming the first field that differs. A collective that gets no answer within
``cfg.timeout`` seconds ends the run on every live rank with a line naming the silent rank(s).

Tasks: an image dataset is evaluated on its test split after each epoch (``test_loss``,
``test_accuracy``). A text dataset (``shakespeare``: next-byte language modelling;
``shakespeare-works``: which work a passage comes from; ``cfg.context`` bytes per sequence) is
evaluated on its validation split (``val_loss``, and ``val_perplexity`` = exp(val_loss) for the
language model, ``val_accuracy`` for the classifier); the language model's loss is the mean
next-byte cross-entropy over all B*T positions (``flatten_logits``), in nats per byte.

Sharded data parallel (``cfg.fsdp``, ``gradcomp train --fsdp``): the model is sharded with FSDP2
(``integration.fsdp.setup_fsdp``: every child with parameters its own group) instead of DDP, and
``cfg.comm`` selects the compressed reduce-scatter. The forward quantizers are installed before
sharding (their PACT clips are parameters, sharded with the rest) and the neural-gradient
compressor after it (its forward hooks on the layers run after FSDP's own hooks and see the
layers' outputs as without FSDP). FSDP2 does not synchronise buffers, so the buffers (BatchNorm
statistics) are broadcast from rank 0 before every training forward, as DDP does. Checkpoints
are sharded (``OUT/checkpoint_dcp/``, torch.distributed.checkpoint: every rank writes its shards,
the comm's error-feedback memory and its own random and compressor states; a shared file system
is needed across machines): written to ``checkpoint_dcp.tmp/``, then the previous one renamed
``checkpoint_dcp.prev/`` and the new one into place; ``run.json`` in it (the run identity,
written last) marks a complete checkpoint. When the comm compresses, training ends with
``comm.require_compressed``: a run that asked for compression and did not get it (no compressed
call, a parameter group left out, or a ratio below ``MIN_COMM_RATIO``) fails with
:class:`CompressionNotAppliedError`.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import math
import os
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from gradcomp.apps.data import (
    DEFAULT_CONTEXT,
    TensorSplit,
    is_text_dataset,
    load_dataset,
    make_loader,
)
from gradcomp.apps.evaluation import evaluate, resolve_device
from gradcomp.apps.models import build_model
from gradcomp.apps.recipes import Recipe, get_recipe
from gradcomp.apps.runtime import MALLOC_POLICIES, apply_malloc_policy
from gradcomp.apps.tables import write_json
from gradcomp.apps.text import flatten_logits
from gradcomp.numerics._checks import require_choice

__all__ = [
    "TrainConfig",
    "TrainResult",
    "StepHook",
    "train",
    "run_fingerprint",
    "CheckpointMismatchError",
    "CheckpointUnreadableError",
    "RankMismatchError",
    "PeerTimeoutError",
    "CompressionNotAppliedError",
    "CHECKPOINT",
    "PREVIOUS_CHECKPOINT",
    "DCP_CHECKPOINT",
    "PREVIOUS_DCP_CHECKPOINT",
    "MIN_COMM_RATIO",
]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "constant")
CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
DCP_CHECKPOINT = "checkpoint_dcp"  # FSDP: a torch.distributed.checkpoint directory
PREVIOUS_DCP_CHECKPOINT = "checkpoint_dcp.prev"
_DCP_IDENTITY = "run.json"  # inside a DCP checkpoint, written last: marks it complete
# test only: the named point at which the process kills itself with SIGKILL (:func:`_kill_point`)
KILL_AT_ENV = "GRADCOMP_KILL_AT"
# FSDP: the cumulative ratio (fp32 bytes / bytes sent) a compressing comm must reach by the end;
# just above 1, so that a warm-up longer than the run or a silent fallback to the dense
# collective fails, while any run that compressed for a fair share of its steps passes
MIN_COMM_RATIO = 1.1
DEFAULT_TIMEOUT = 600.0  # seconds; covers a first step that compiles the fused kernels
# data parallel: ranks agree on a Ctrl-C every this many steps (a collective, so not every step)
_STOP_CHECK_EVERY = 8


class CheckpointMismatchError(ValueError):
    """Resuming from a checkpoint of another configuration (recipe, model, world size, ...)."""


class CheckpointUnreadableError(ValueError):
    """The checkpoint file exists but cannot be read (truncated, empty, not a checkpoint)."""


class RankMismatchError(ValueError):
    """Data-parallel ranks started with different settings (names the first differing field)."""


class PeerTimeoutError(RuntimeError):
    """A data-parallel peer stopped answering within the collective timeout."""


class CompressionNotAppliedError(RuntimeError):
    """An FSDP run asked for a compressed reduce-scatter and did not get it."""


def _check_device(device: str) -> None:
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device must be cpu, cuda, cuda:N, mps or auto; got {device!r}")


def _positive_int_or_none(value, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be an int >= 1 (or None for no limit), got {value!r}")


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
    overwrite: bool = False  # start over in an ``out`` that holds another run's checkpoint
    data_dir: str | None = None
    max_train: int | None = None
    width: int | None = None
    workers: int = 0
    progress: bool = True
    max_steps_per_epoch: int | None = None  # truncate epochs (quick runs, tests)
    max_steps: int | None = None  # exactly this many steps in all, over as many epochs as needed
    max_test: int | None = None  # evaluate on the first N test images / val sequences (quick runs)
    evaluate: bool = True  # test loss/accuracy after each epoch (False: NaN, saves time)
    comm: str = "allreduce"  # DDP communication hook / FSDP reduce-scatter (world_size > 1)
    comm_options: dict = field(default_factory=dict)
    timeout: float = DEFAULT_TIMEOUT  # seconds a collective waits for a silent peer
    context: int | None = None  # text datasets: bytes per sequence (None: DEFAULT_CONTEXT)
    fsdp: bool = False  # shard the model with FSDP2 instead of DDP (world_size > 1)
    # "retain": glibc keeps freed memory for reuse (``apps.runtime``; no page faults for the
    # tensors each step frees and allocates again; process-wide, for the rest of the
    # process); "default": the process's malloc policy as it is. Where memory comes from
    # only: not part of the run's identity.
    malloc: str = "retain"

    def __post_init__(self):
        require_choice(self.optimizer, "optimizer", OPTIMIZERS)
        require_choice(self.malloc, "malloc", MALLOC_POLICIES)
        require_choice(self.schedule, "schedule", SCHEDULES)
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        _check_device(str(self.device))
        for name in ("max_steps_per_epoch", "max_steps", "max_test", "max_train", "context"):
            _positive_int_or_none(getattr(self, name), name)
        if not isinstance(self.comm_options, dict):
            raise TypeError(f"comm_options must be a dict, got {type(self.comm_options).__name__}")
        if not (isinstance(self.timeout, (int, float)) and math.isfinite(self.timeout)
                and self.timeout > 0):
            raise ValueError(f"timeout must be a finite number of seconds > 0, got "
                             f"{self.timeout!r}")
        if self.context is not None and not is_text_dataset(self.dataset):
            raise ValueError(f"context applies to the text datasets only, not to "
                             f"{self.dataset!r}; drop it")
        if not isinstance(self.fsdp, bool):
            raise TypeError(f"fsdp must be a bool, got {type(self.fsdp).__name__}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: continue the run in out "
                             "(resume) or start it over (overwrite)")

    def text_context(self) -> int | None:
        """Bytes per sequence of a text dataset (``context`` or its default); None for images."""
        if not is_text_dataset(self.dataset):
            return None
        return DEFAULT_CONTEXT if self.context is None else self.context

    def recipe_obj(self) -> Recipe:
        return self.recipe if isinstance(self.recipe, Recipe) else get_recipe(self.recipe)

    def identity(self, world_size: int | None = None) -> dict:
        """What a checkpoint must match to be resumed: everything that changes the trajectory,
        the data-parallel setup included (``world_size``: the current one when None)."""
        r = self.recipe_obj()
        world = _dist_info()[1] if world_size is None else int(world_size)
        # the sequence length only for text datasets: image runs keep their identity (and so
        # their checkpoints) unchanged
        text = {} if self.text_context() is None else {"context": self.text_context()}
        return {**text,
            "recipe": r.to_dict(), "model": self.model, "dataset": self.dataset,
            "batch_size": self.batch_size, "lr": self.lr, "optimizer": self.optimizer,
            "schedule": self.schedule, "seed": self.seed, "max_train": self.max_train,
            "width": self.width, "epochs": self.epochs, "momentum": self.momentum,
            "weight_decay": self.weight_decay, "max_steps_per_epoch": self.max_steps_per_epoch,
            "max_steps": self.max_steps, "world_size": world, "comm": self.comm,
            "comm_options": self.comm_options, "fsdp": self.fsdp,
        }


@dataclass
class TrainResult:
    history: list[dict]
    test_accuracy: float  # image datasets (NaN for text: see val_*)
    test_loss: float
    out: Path | None
    seconds: float
    # median wall time of a training step (forward+backward+compression+update); the median
    # ignores the first steps' one-off compilation of the fused kernels
    step_seconds: float
    loss_trace: list[float] = field(default_factory=list)  # training loss of every step (this run)
    interrupted: bool = False  # stopped by Ctrl-C (SIGINT) after a step; last checkpoint kept
    steps: int = 0  # optimizer steps run by this call
    # text datasets, last epoch, validation split: mean loss (nats per predicted byte), accuracy
    # (next byte, or the work), perplexity exp(val_loss) (language model; NaN for the classifier)
    val_loss: float = math.nan
    val_accuracy: float = math.nan
    val_perplexity: float = math.nan


class StepHook:
    """Callbacks into :func:`train` (the base class does nothing; override what you need).

    ``attach(model)`` once the model is built (before DDP wraps it); ``around(step)`` a context
    manager wrapping the forward and backward of global step ``step`` (0-based, counted from the
    start of training); ``detach()`` when training ends, also on an error.
    """

    def attach(self, model: nn.Module) -> None:
        pass

    def around(self, step: int):
        return contextlib.nullcontext()

    def detach(self) -> None:
        pass


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
    return type(split)(split.x[rank::world], split.y[rank::world])  # TokenSplit stays one


def _dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _tensor_fingerprint(t: torch.Tensor) -> str:
    """Shape, dtype and a hash of at most ~4096 evenly strided elements (cheap on 60k images)."""
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // 4096)
    h = hashlib.sha256(str((tuple(t.shape), str(t.dtype))).encode())
    h.update(flat[::step].cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def run_fingerprint(cfg: TrainConfig, world: int, data, model: nn.Module,
                    steps_per_epoch: int) -> dict:
    """Everything that shapes a data-parallel trajectory, as plain values, in a fixed order:
    the run identity (whole config and recipe, seeds, world size, comm method and options), the
    data (sizes and a fingerprint of the training split), the model's parameter shapes and the
    steps per epoch. Ranks must agree on every field."""
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    return {
        **cfg.identity(world),
        "device_type": resolve_device(cfg.device).type,
        "train_images": len(data.train), "test_images": len(data.test),
        "train_data": _tensor_fingerprint(data.train.x) + _tensor_fingerprint(data.train.y),
        "model_parameters": _digest(shapes),
        "steps_per_epoch": steps_per_epoch,
    }


def _agree(fingerprint: dict, problem: str | None) -> None:
    """All-gather every rank's fingerprint and start-up problem; raise the same error on all."""
    import torch.distributed as dist

    world = dist.get_world_size()
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (problem, fingerprint))
    for r, (p, _) in enumerate(gathered):
        if p is not None:
            raise ValueError(p if r == dist.get_rank() else f"rank {r}: {p}")
    # the union of every rank's fields, in order: a field one rank lacks is a difference too
    for key in dict.fromkeys(k for _, fp in gathered for k in fp):
        values = [fp.get(key) for _, fp in gathered]
        if any(v != values[0] for v in values[1:]):
            key, values = _first_difference(key, values)
            per_rank = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
            raise RankMismatchError(
                f"data-parallel ranks disagree on {key} ({per_rank}); every rank must run the "
                "same settings and data"
            )


def _first_difference(key: str, values: list):
    """Descend into dicts (the recipe) to the first field whose values differ: ("recipe.name",
    ['baseline', 'fp4']) rather than two whole recipes."""
    while all(isinstance(v, dict) for v in values):
        keys = list(dict.fromkeys(k for v in values for k in v))
        sub = next((k for k in keys if any(v.get(k) != values[0].get(k) for v in values)), None)
        if sub is None:
            break
        key, values = f"{key}.{sub}", [v.get(sub) for v in values]
    return key, values


def _prepare_out(out: Path | None, cfg: TrainConfig) -> None:
    """Check the output directory before any training: not a file, writable, and no other
    run's checkpoint unless resuming or overwriting (then the old checkpoints are removed)."""
    if out is None:
        return
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory (created if missing)")
    if cfg.resume and not out.exists():
        raise FileNotFoundError(f"--resume: {out} does not exist (nothing to resume); check "
                                "--out or drop --resume")
    ck = [out / n for n in (CHECKPOINT, PREVIOUS_CHECKPOINT, DCP_CHECKPOINT,
                             PREVIOUS_DCP_CHECKPOINT)]
    if not cfg.resume and any(p.exists() for p in ck):
        if not cfg.overwrite:
            raise ValueError(f"--out {out} already holds a run ({CHECKPOINT}); add --resume to "
                             "continue it, --overwrite to start it over, or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot create the directory ({exc.strerror})") from None
    if not os.access(out, os.W_OK):
        raise ValueError(f"--out {out} is not writable")


def _read_checkpoint(out: Path) -> tuple[dict | None, str]:
    """(checkpoint, note) of ``out``; (None, note) when there is none to resume (start fresh)."""
    cur, prev = out / CHECKPOINT, out / PREVIOUS_CHECKPOINT
    if not cur.exists() and prev.exists():
        # a kill between the two renames of a save: the previous checkpoint is complete
        return _load_file(prev, None), f"resuming from {prev} ({CHECKPOINT} is missing)"
    if not cur.exists():
        return None, (f"no complete checkpoint in {out} (the run stopped before its first "
                      "checkpoint was written): starting from scratch")
    return _load_file(cur, prev if prev.exists() else None), ""


def _load_file(path: Path, fallback: Path | None) -> dict:
    try:
        if path.is_dir():
            raise IsADirectoryError("it is a directory")
        ck = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(ck, dict) or "identity_digest" not in ck:
            raise ValueError("not a gradcomp checkpoint")
        return ck
    except Exception as exc:  # noqa: BLE001 - any failure to read means "unreadable"
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        offer = (f"resume from the previous one (mv {fallback} {path}, then --resume), or "
                 if fallback is not None else "")
        raise CheckpointUnreadableError(
            f"checkpoint {path} is unreadable ({reason}); {offer}start a fresh run with "
            "--overwrite"
        ) from None


def _read_dcp_checkpoint(out: Path) -> tuple[dict | None, str]:
    """FSDP: ({"path", "identity", "identity_digest", "epoch"}, note) of the newest complete
    DCP checkpoint in ``out`` (``run.json`` present), or (None, note) when there is none."""
    cur, prev = out / DCP_CHECKPOINT, out / PREVIOUS_DCP_CHECKPOINT
    for path in (cur, prev):
        marker = path / _DCP_IDENTITY
        if not marker.exists():
            continue
        try:
            meta = json.loads(marker.read_text())
            if not isinstance(meta, dict) or "identity_digest" not in meta:
                raise ValueError("not a gradcomp checkpoint")
        except (OSError, ValueError) as exc:
            raise CheckpointUnreadableError(
                f"checkpoint {marker} is unreadable ({str(exc).splitlines()[0][:120]}); start "
                "a fresh run with --overwrite") from None
        note = "" if path == cur else f"resuming from {prev} ({cur} is missing or incomplete)"
        return {**meta, "path": str(path)}, note
    return None, (f"no complete checkpoint in {out} (the run stopped before its first "
                  "checkpoint was written): starting from scratch")


def _other_kind_identity(out: Path, fsdp: bool) -> dict | None:
    """The identity of a checkpoint of the other kind (DDP file vs FSDP directory) in ``out``:
    resuming it would start from scratch silently, so it is compared (and refused) instead."""
    if fsdp:
        for path in (out / CHECKPOINT, out / PREVIOUS_CHECKPOINT):
            if path.exists():
                return _load_file(path, None).get("identity", {})
        return None
    ck, _ = _read_dcp_checkpoint(out)
    return None if ck is None else ck.get("identity", {})


def _plain(obj):
    """``obj`` as it reads back from JSON (tuples as lists), to compare identities."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _identity_error(out: Path, old: dict, identity: dict) -> CheckpointMismatchError:
    old, new = _plain(old), _plain(identity)
    diff = [f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in dict.fromkeys([*new, *old])
            if old.get(k) != new.get(k)]
    return CheckpointMismatchError(
        f"checkpoint in {out} was written by another run configuration (differs in: "
        f"{', '.join(diff)}); use the same settings, another --out, or --overwrite to start over"
    )


def _save_dcp(out: Path, model, opt, comm, identity: dict, epoch: int, extra: dict,
              is_main: bool) -> None:
    """FSDP: write a sharded checkpoint (a collective) to ``checkpoint_dcp.tmp/``, then rank 0
    writes ``run.json`` into it and rotates it into place (the previous one kept as
    ``checkpoint_dcp.prev/``). A kill at any moment leaves a complete one once the first exists:
    between the two renames only the previous one exists, and it is found."""
    import shutil

    import torch.distributed as dist

    from gradcomp.integration.fsdp import save_sharded

    tmp = out / (DCP_CHECKPOINT + ".tmp")
    if is_main and tmp.exists():
        shutil.rmtree(tmp)  # left by a save that was killed half-way
    dist.barrier()
    save_sharded(tmp, model, opt, comm, extra=extra)
    if is_main:
        _kill_point(f"save:{epoch + 1}:written")
        marker = tmp / _DCP_IDENTITY
        with open(marker, "w") as f:
            json.dump({"identity": identity, "identity_digest": _digest(identity),
                       "epoch": epoch}, f, default=str)
            f.flush()
            os.fsync(f.fileno())
        cur, prev = out / DCP_CHECKPOINT, out / PREVIOUS_DCP_CHECKPOINT
        if cur.exists():
            if prev.exists():
                shutil.rmtree(prev)
            os.replace(cur, prev)
        _kill_point(f"save:{epoch + 1}:rotated")
        os.replace(tmp, cur)
    dist.barrier()


def _average_grads(params: list, world: int) -> None:
    """FSDP: average the gradients of the parameters it does not shard (one all-reduce of their
    concatenation, dense fp32, not counted in the comm's bytes); a missing gradient counts 0."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    for p, g in zip(params, flat.split([q.numel() for q in params])):
        p.grad = g.view_as(p).to(p.dtype)


def _broadcast_buffers(model: nn.Module) -> None:
    """FSDP: rank 0's buffers (BatchNorm statistics) to every rank, as DDP does before each
    forward; FSDP2 leaves buffers unsynchronised, so the replicas would drift apart."""
    import torch.distributed as dist

    for b in model.buffers():
        dist.broadcast(b, 0)


def _kill_point(name: str) -> None:
    """Test only (``benchmarks/kill_matrix.py``): with ``GRADCOMP_KILL_AT=name`` in the
    environment this process sends itself SIGKILL here, as ``kill -9`` would (no cleanup, no
    flush), so that a resume can be tested from an exact moment. Names: ``step:N`` (every rank,
    before global step N, 0-based), ``save:E:written`` (epoch E's checkpoint, 1-based, written to
    its temporary file/directory and not yet renamed) and ``save:E:rotated`` (between the two
    renames: only the previous checkpoint is in place)."""
    if os.environ.get(KILL_AT_ENV) == name:
        sys.stderr.write(f"{KILL_AT_ENV}={name}: SIGKILL\n")  # the caller checks the moment
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _save_checkpoint(out: Path, ck: dict) -> None:
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save(ck, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    _kill_point(f"save:{ck['epoch'] + 1}:written")
    cur = out / CHECKPOINT
    if cur.exists():
        os.replace(cur, out / PREVIOUS_CHECKPOINT)
    _kill_point(f"save:{ck['epoch'] + 1}:rotated")
    os.replace(tmp, cur)  # atomic: a kill before this leaves the previous checkpoint


class _StopFlag:
    """SIGINT (Ctrl-C) asks the loop to stop after the current step; a second one aborts."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _world_stop(flag: _StopFlag, dev) -> bool:
    """Data parallel: stop when any rank got a Ctrl-C (an all-reduce of one number)."""
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag.requested else 0.0], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _silent_peers(rank: int, world: int, wait: float) -> list[int]:
    """Which ranks do not answer: every live rank marks itself in the rendezvous store, waits
    ``wait`` seconds, and reports the ranks that never marked. The store lives with rank 0, so
    a store that does not answer means rank 0 is the silent one."""
    import datetime

    import torch.distributed as dist

    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=max(1.0, wait)))
        store.set(f"gradcomp/alive/{rank}", "1")
        deadline = time.monotonic() + wait
        missing = list(range(world))
        while missing and time.monotonic() < deadline:
            missing = [p for p in missing if not store.check([f"gradcomp/alive/{p}"])]
            time.sleep(0.2)
        return missing
    except Exception:  # noqa: BLE001 - the store itself does not answer
        return [0] if rank != 0 else []


def _is_peer_failure(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(s in text for s in ("timed out", "timeout", "connection closed", "connection reset",
                                   "broken pipe", "connection refused"))


def train(cfg: TrainConfig, hook: StepHook | None = None) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.dataset`` with ``cfg.recipe``; see the module docstring."""
    rank, world = _dist_info()
    try:
        return _train(cfg, hook or StepHook(), rank, world)
    except RuntimeError as exc:
        if (world == 1 or isinstance(exc, (PeerTimeoutError, CompressionNotAppliedError))
                or not _is_peer_failure(exc)):
            raise
        silent = [p for p in _silent_peers(rank, world, min(10.0, cfg.timeout)) if p != rank]
        who = (f"rank {', '.join(map(str, silent))}" if silent else "a peer")
        raise PeerTimeoutError(
            f"rank {rank}: {who} stopped answering (no reply within --timeout {cfg.timeout:g} s "
            f"or the connection closed); stopping. The last checkpoint in {cfg.out} is kept: "
            "resume with --resume"
        ) from None


def _train(cfg: TrainConfig, hook: StepHook, rank: int, world: int) -> TrainResult:
    from gradcomp.integration.wrap import compress_gradients

    recipe = cfg.recipe_obj()
    apply_malloc_policy(cfg.malloc)  # in every rank: spawned processes start with the default
    dev = resolve_device(cfg.device)
    if world > 1 and dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(dev)
    if cfg.fsdp and world == 1:
        raise ValueError("fsdp needs data-parallel training on >= 2 ranks: gradcomp train "
                         "--fsdp --nproc N (N >= 2), or torchrun with several processes")
    out = Path(cfg.out) if cfg.out else None
    is_main = rank == 0
    identity = cfg.identity(world)
    problem = None
    if is_main:
        try:
            _prepare_out(out, cfg)
        except (ValueError, FileNotFoundError) as exc:
            if world == 1:
                raise
            problem = str(exc)

    torch.manual_seed(cfg.seed)
    data, model = _data_and_model(cfg)
    model = model.to(dev)
    text_task = getattr(data, "task", None)  # "lm" / "classify" for text, None for images
    loader = make_loader(_shard(data.train, rank, world), cfg.batch_size, shuffle=True,
                         seed=cfg.seed, drop_last=True, workers=cfg.workers, device=dev)
    # every rank runs the same number of steps: that of the smallest shard
    steps_per_epoch = min(len(loader), (len(data.train) // world) // cfg.batch_size)
    if steps_per_epoch == 0 and problem is None:
        problem = (f"--batch-size {cfg.batch_size} is larger than the training split per rank "
                   f"({len(data.train)} images / {world} rank(s)); allowed: 1.."
                   f"{len(data.train) // world}")
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    if world > 1:
        _agree(run_fingerprint(cfg, world, data, model, steps_per_epoch), problem)
    elif problem is not None:
        raise ValueError(problem)
    epochs = cfg.epochs if cfg.max_steps is None else -(-cfg.max_steps // steps_per_epoch)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch

    fwd_handle = None
    if recipe.forward is not None:
        from gradcomp.integration.forward import quantize_forward

        fwd_handle = quantize_forward(model, **recipe.forward.kwargs())
    bwd_handle = None
    if recipe.backward is not None:
        from gradcomp.integration.gemm import quantize_backward

        # each rank (and each run seed) its own stochastic-rounding stream; RHT signs depend
        # only on the recipe's RHTSpec seed, so they agree across ranks
        bwd_cfg = dataclasses.replace(
            recipe.backward, seed=(recipe.backward.seed + cfg.seed * 1_000_003 + rank) % (1 << 62))
        bwd_handle = quantize_backward(model, bwd_cfg)

    net: nn.Module = model
    comm_state = None
    fsdp_comm = None
    replicated: list = []  # FSDP: parameters left unsharded, gradients averaged here
    if world > 1 and cfg.fsdp:
        from gradcomp.integration.fsdp import setup_fsdp

        # after quantize_forward (its PACT clips are parameters: sharded with the rest), before
        # compress_gradients (its forward hooks then run after FSDP's on the same layers)
        # fully_shard cannot shard 0-dim parameters (the PACT clips): they stay replicated and
        # their gradients are averaged by one small all-reduce per step (_average_grads)
        replicated = [p for p in model.parameters() if p.dim() == 0]
        shard_kw = {"ignored_params": set(replicated)} if replicated else {}
        net, fsdp_comm = setup_fsdp(model, cfg.comm, cfg.comm_options,
                                    seed=cfg.comm_options.get("seed", cfg.seed), **shard_kw)
        comm_state = fsdp_comm
        replicated = [p for p in replicated if p.requires_grad]
    elif world > 1:
        from gradcomp.integration.ddp_hooks import make_comm_hook

        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None
        )
        comm_state, ddp_hook = make_comm_hook(cfg.comm, **cfg.comm_options)
        if ddp_hook is not None:
            net.register_comm_hook(comm_state, ddp_hook)

    # text datasets are evaluated on their validation split, images on their test split
    test = data.val if text_task else data.test
    if cfg.max_test is not None:
        test = type(test)(test.x[: cfg.max_test], test.y[: cfg.max_test])
    test_loader = make_loader(test, 512, shuffle=False, device=dev)
    opt = _make_optimizer(cfg, model.parameters())
    sched = _make_schedule(cfg, opt, total_steps)

    def rank_state() -> dict:
        return {
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
            "compressor": handle.state_dict() if handle is not None else None,
            # FSDP: the PACT clips are model parameters and the comm's state is written by
            # save_sharded, both in the sharded checkpoint
            "forward": fwd_handle.state_dict() if fwd_handle is not None and fsdp_comm is None
            else None,
            "backward": bwd_handle.state_dict() if bwd_handle is not None else None,
            "comm": comm_state.state_dict() if hasattr(comm_state, "state_dict")
            and fsdp_comm is None else None,
        }

    history: list[dict] = []
    start_epoch = 0
    comm_totals = {"bytes_sent": 0, "dense_bytes": 0}
    ck = _resume_payload(out, identity, is_main, world, cfg.fsdp) if cfg.resume else None
    if ck is not None and fsdp_comm is not None:
        from gradcomp.integration.fsdp import load_sharded

        # model shards, optimizer shards and the comm's state; the rest is this rank's extra
        ck = load_sharded(ck["path"], model, opt, fsdp_comm)
    elif ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
    if ck is not None:
        sched.load_state_dict(ck["scheduler"])
        mine = ck["ranks"][rank]
        torch.set_rng_state(mine["rng_cpu"])
        if dev.type == "cuda" and mine.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(mine["rng_cuda"], dev)
        if fwd_handle is not None and mine.get("forward") is not None:
            fwd_handle.load_state_dict(mine["forward"])
        if bwd_handle is not None:
            bwd_handle.load_state_dict(mine["backward"])
        if comm_state is not None and mine.get("comm") is not None:
            comm_state.load_state_dict(mine["comm"])
        history = ck["history"]
        comm_totals = dict(ck.get("comm_totals", comm_totals))
        start_epoch = ck["epoch"] + 1
        if comm_state is not None and fsdp_comm is None:
            # DDP buckets all parameters together for its first step and re-buckets after it;
            # a resumed process must meet the re-bucketed layout (the one the hook's state was
            # built on) from its first step: one forward/backward with the hook suspended that
            # changes nothing else. Before the neural-gradient compressor is attached, so that
            # it does not see this backward either.
            from gradcomp.integration.ddp_hooks import prime_buckets

            prime_buckets(net, comm_state, test.x[: cfg.batch_size].to(dev))
    # attached after the resume's bucket priming; its hooks only observe the backward. Each
    # rank its own noise (rank 0: the run seed): identical noise on every rank would not
    # average down in the gradient all-reduce
    handle = compress_gradients(model, recipe.compression,
                                seed=(cfg.seed + 1_000_003 * rank) % (1 << 64)) \
        if recipe.compression is not None else None
    if handle is not None and ck is not None:
        handle.load_state_dict(ck["ranks"][rank]["compressor"])
    hook.attach(model)

    t_start = time.perf_counter()
    step_times: list[float] = []
    trace: list[torch.Tensor] = []
    global_step = start_epoch * steps_per_epoch
    steps_run = 0
    interrupted = False
    kill_at = os.environ.get(KILL_AT_ENV)  # test only: read once, not per step
    try:
        with _StopFlag() as stop:
            for epoch in range(start_epoch, epochs):
                loader.set_epoch(epoch)
                if handle is not None:
                    handle.on_epoch_start(epoch)
                comm_before = _comm_metrics(comm_state)
                net.train()
                loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
                correct = torch.zeros((), dtype=torch.int64, device=dev)
                seen, skipped = 0, 0
                t_epoch = time.perf_counter()
                n_steps = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
                bar = tqdm(total=n_steps, desc=f"{recipe.name} epoch {epoch + 1}/{epochs}",
                           disable=not (cfg.progress and is_main), leave=False)
                for i, (x, y) in enumerate(loader):
                    if i >= n_steps:
                        break
                    t0 = time.perf_counter()
                    if fsdp_comm is not None:
                        _broadcast_buffers(model)
                    if kill_at is not None:
                        _kill_point(f"step:{global_step}")
                    with hook.around(global_step):
                        out_, y = flatten_logits(net(x), y)
                        loss = nn.functional.cross_entropy(out_, y)
                        if fwd_handle is not None:
                            loss = loss + fwd_handle.alpha_regularization()
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                    if replicated:
                        _average_grads(replicated, world)
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
                    global_step += 1
                    steps_run += 1
                    bar.update(1)
                    if world == 1:
                        interrupted = stop.requested
                    elif (i + 1) % _STOP_CHECK_EVERY == 0 or i + 1 == n_steps:
                        interrupted = _world_stop(stop, dev)
                    if interrupted:
                        break
                bar.close()
                if interrupted:
                    break
                epoch_seconds = time.perf_counter() - t_epoch
                if fsdp_comm is not None:
                    # the state every rank evaluates and saves (the next forward's broadcast
                    # would give the same): rank 0's
                    _broadcast_buffers(model)
                if cfg.evaluate:
                    test_loss, test_acc = evaluate(model, test_loader, dev)
                else:
                    test_loss, test_acc = math.nan, math.nan
                row = {
                    "epoch": epoch + 1,
                    "train_loss": float(loss_sum) / max(seen, 1),
                    "train_accuracy": float(correct) / max(seen, 1),
                    **_eval_columns(text_task, test_loss, test_acc),
                    "lr": opt.param_groups[0]["lr"],
                    "seconds": epoch_seconds,
                    "skipped_steps": skipped,
                }
                if handle is not None:
                    row.update(handle.metrics(reset=True)["overall"])
                else:
                    row.update({"sparsity": 0.0, "bits_per_element": 32.0,
                                "overflow": 0.0, "underflow": 0.0})
                comm_line = ""
                if comm_before is not None:
                    row.update(_comm_row(comm_before, _comm_metrics(comm_state), comm_totals))
                    comm_line = (f" comm ratio {row['comm_ratio_epoch']:.2f} "
                                 f"(cumulative {row['comm_ratio_cumulative']:.2f})")
                history.append(row)
                if is_main and cfg.progress:
                    acc_txt = _eval_text(text_task, row) if cfg.evaluate else "(not evaluated)"
                    sp, bits = row.get("sparsity"), row.get("bits_per_element")
                    comp_txt = (f"sparsity {sp:.3f} bits/elem {bits:.2f}"
                                if sp is not None and math.isfinite(sp) else
                                "sparsity - (no metric step ran yet)")
                    if row["skipped_steps"]:  # non-finite gradients or a loss-scale overflow
                        comp_txt += f" skipped {row['skipped_steps']} step(s)"
                    print(f"[{recipe.name}] epoch {epoch + 1}/{epochs}: loss "
                          f"{row['train_loss']:.4f} {acc_txt} {comp_txt}"
                          f"{comm_line} ({epoch_seconds:.1f}s)", flush=True)
                if out is not None and fsdp_comm is not None:
                    _save_dcp(out, model, opt, fsdp_comm, identity, epoch, {
                        "epoch": epoch, "scheduler": sched.state_dict(), "history": history,
                        "comm_totals": comm_totals, "ranks": {rank: rank_state()},
                    }, is_main)
                    if is_main:
                        _write_metrics(out, history, cfg, recipe)
                elif out is not None:
                    states = _gather_rank_states(rank_state(), world)
                    if is_main:
                        _save_checkpoint(out, {
                            "identity": identity, "identity_digest": _digest(identity),
                            "epoch": epoch, "model": model.state_dict(),
                            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                            "ranks": states, "history": history, "comm_totals": comm_totals,
                        })
                        _write_metrics(out, history, cfg, recipe)
    finally:
        hook.detach()
        if handle is not None:
            handle.remove()
        if fwd_handle is not None:
            fwd_handle.remove()
        if bwd_handle is not None:
            bwd_handle.remove()
    if fsdp_comm is not None and fsdp_comm.compressing and not interrupted:
        try:
            fsdp_comm.require_compressed(MIN_COMM_RATIO)
        except RuntimeError as exc:
            raise CompressionNotAppliedError(
                f"rank {rank}: --fsdp --comm {cfg.comm} asked for a compressed reduce-scatter "
                f"and did not get it: {exc}") from None
    if interrupted and is_main:
        where = f"the last checkpoint in {out} is kept" if out else "no checkpoint (no --out)"
        print(f"interrupted after step {global_step} (epoch {epoch + 1}); {where}: run the same "
              "command with --resume to continue", flush=True)
    final = history[-1] if history else {}
    return TrainResult(
        history=history, test_accuracy=final.get("test_accuracy", math.nan),
        test_loss=final.get("test_loss", math.nan), val_loss=final.get("val_loss", math.nan),
        val_accuracy=final.get("val_accuracy", math.nan),
        val_perplexity=final.get("val_perplexity", math.nan),
        out=out, seconds=time.perf_counter() - t_start,
        step_seconds=statistics.median(step_times) if step_times else math.nan,
        loss_trace=torch.stack(trace).float().cpu().tolist() if trace else [],
        interrupted=interrupted, steps=steps_run,
    )


def _data_and_model(cfg: TrainConfig):
    """The dataset and the model built for it (image sizes and classes, or the text task's
    vocabulary and context); a model whose task does not match the dataset's is refused."""
    context = cfg.text_context()
    kw = {} if context is None else {"context": context}
    data = load_dataset(cfg.dataset, cfg.data_dir, max_train=cfg.max_train, **kw)
    return data, model_for_data(cfg.model, cfg.dataset, data, cfg.width)


def model_for_data(model: str, dataset: str, data, width: int | None):
    """``model`` built for a loaded dataset: image channels, classes and size, or a text
    task's vocabulary and context; a model whose task does not fit the data is refused with
    one line naming the models that fit."""
    if getattr(data, "task", None) is None:
        net = build_model(model, in_channels=data.in_channels, num_classes=data.num_classes,
                          image_size=data.image_size, width=width)
        if getattr(net, "task", None) is not None:
            raise ValueError(f"model {model!r} reads token sequences; dataset "
                             f"{dataset!r} is images: use a text dataset (shakespeare, "
                             "shakespeare-works) or an image model")
        return net
    fits = {"lm": "gpt or gpt-tiny", "classify": "bert or bert-tiny"}[data.task]
    try:
        net = build_model(model, width=width, **data.model_kwargs())
    except ValueError as exc:
        raise ValueError(f"model {model!r} cannot be built for dataset {dataset!r} "
                         f"(task {data.task}; models that fit: {fits}): {exc}") from None
    if getattr(net, "task", None) != data.task:
        raise ValueError(f"model {model!r} does not fit dataset {dataset!r} (task "
                         f"{data.task}): use {fits}")
    return net


def _eval_columns(task: str | None, loss: float, acc: float) -> dict:
    """The evaluation columns of an epoch row: test_* for images, val_* for text."""
    if task is None:
        return {"test_loss": loss, "test_accuracy": acc}
    cols = {"val_loss": loss, "val_accuracy": acc}
    if task == "lm":
        # perplexity per byte: exp of the mean next-byte cross-entropy (nats)
        cols["val_perplexity"] = math.exp(loss) if math.isfinite(loss) else math.nan
    return cols


def _eval_text(task: str | None, row: dict) -> str:
    if task is None:
        return f"test acc {100 * row['test_accuracy']:.2f}%"
    if task == "lm":
        return f"val loss {row['val_loss']:.4f} perplexity {row['val_perplexity']:.3f}"
    return f"val loss {row['val_loss']:.4f} val acc {100 * row['val_accuracy']:.2f}%"


def _resume_payload(out: Path | None, identity: dict, is_main: bool, world: int,
                    fsdp: bool = False) -> dict | None:
    """Rank 0 reads and checks the checkpoint and sends it to every rank; every rank raises the
    same error when it cannot be used. None: nothing to resume yet (start from scratch).
    ``fsdp``: the DCP checkpoint's identity and path only (every rank then reads its shards)."""
    payload: list = [None]
    if is_main:
        try:
            if out is None:
                raise ValueError("--resume needs --out (the directory of the run to continue)")
            ck, note = _read_dcp_checkpoint(out) if fsdp else _read_checkpoint(out)
            if ck is None:
                other = _other_kind_identity(out, fsdp)
                if other is not None:  # a DDP checkpoint resumed as FSDP, or vice versa
                    raise _identity_error(out, other, identity)
            if note:
                print(f"gradcomp train: {note}", flush=True)
            if ck is not None and ck["identity_digest"] != _digest(identity):
                raise _identity_error(out, ck.get("identity", {}), identity)
            if ck is not None and not fsdp and len(ck.get("ranks", ())) != world:
                raise CheckpointMismatchError(f"checkpoint in {out} holds {len(ck['ranks'])} "
                                              f"rank state(s) for world size {world}")
            payload[0] = ("ok", ck)
        except (ValueError, FileNotFoundError) as exc:
            if world == 1:
                raise
            payload[0] = ("error", exc)
    if world > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(payload, src=0)
    kind, value = payload[0]
    if kind == "error":
        raise value
    return value


def _gather_rank_states(state: dict, world: int) -> list[dict] | None:
    if world == 1:
        return [state]
    import torch.distributed as dist

    out: list | None = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(state, out, dst=0)
    return out


def _comm_metrics(comm_state) -> dict | None:
    if comm_state is None or not hasattr(comm_state, "metrics"):
        return None
    m = comm_state.metrics()
    return {"bytes_sent": int(m.get("bytes_sent") or 0),
            "dense_bytes": int(m.get("dense_bytes") or 0)}


def _comm_row(before: dict, after: dict, totals: dict) -> dict:
    """This epoch's and the cumulative bytes and compression ratio (fp32 bytes / bytes sent).

    The epoch's bytes are the difference of the hook's counters over the epoch, so they are right
    whether or not the hook restored its counters on resume; the cumulative ones add up the
    epochs (restored from the checkpoint)."""
    sent = after["bytes_sent"] - before["bytes_sent"]
    dense = after["dense_bytes"] - before["dense_bytes"]
    totals["bytes_sent"] += sent
    totals["dense_bytes"] += dense
    ratio = dense / sent if sent else math.nan
    cum = totals["dense_bytes"] / totals["bytes_sent"] if totals["bytes_sent"] else math.nan
    return {"comm_bytes_epoch": sent, "comm_bytes_sent": totals["bytes_sent"],
            "comm_ratio_epoch": ratio, "comm_ratio_cumulative": cum}


def _write_metrics(out: Path, history: list[dict], cfg: TrainConfig, recipe: Recipe) -> None:
    keys = list(dict.fromkeys(k for row in history for k in row))
    with open(out / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    cfg_dict = dataclasses.asdict(cfg) | {"recipe": recipe.to_dict()}
    write_json(out / "metrics.json", {"config": cfg_dict, "history": history})
