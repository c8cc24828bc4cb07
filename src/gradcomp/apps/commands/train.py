"""``gradcomp train``: train with a recipe (compressed neural gradients, DDP compression)."""

from __future__ import annotations

import argparse
import json
import math
import os

from gradcomp.apps.commands._common import add_data_args
from gradcomp.apps.runtime import MALLOC_POLICIES
from gradcomp.apps.train import DEFAULT_TIMEOUT

DEFAULT_OUT = "runs/train"


def add_parser(sub):
    p = sub.add_parser(
        "train",
        help="train a model with a recipe of compressed gradients",
        description="Train MODEL on DATASET with RECIPE (see `gradcomp recipes`). Writes "
        "metrics.csv, metrics.json and checkpoint.pt (each epoch) to --out; --resume continues "
        "a killed run bit for bit. --nproc N trains data-parallel on N local processes with "
        "--comm compression of the weight gradients (under torchrun, leave --nproc out); with "
        "--fsdp the model is sharded (FSDP2), --comm chooses the compressed reduce-scatter and the "
        "checkpoints are sharded (OUT/checkpoint_dcp/).",
    )
    p.add_argument("--recipe", default="baseline",
                   help="built-in recipe name or a .toml/.json recipe file (default baseline)")
    add_data_args(p)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--optimizer", default="sgd", help="sgd, adam or adamw")
    p.add_argument("--schedule", default="cosine", help="cosine, step or constant")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--width", type=int, default=None, help="model base width")
    p.add_argument("--context", type=int, default=None,
                   help="text datasets: bytes per sequence (default 64)")
    p.add_argument("--max-train", type=int, default=None, help="use at most N training images")
    p.add_argument("--max-steps-per-epoch", type=int, default=None,
                   help="truncate each epoch to N >= 1 steps (default: the whole split)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt (--fsdp: OUT/checkpoint_dcp/)")
    g.add_argument("--overwrite", action="store_true",
                   help="start over in an OUT that holds another run's checkpoint")
    p.add_argument("--nproc", type=int, default=1, help="data-parallel processes on this machine")
    p.add_argument("--fsdp", action="store_true",
                   help="shard the model with FSDP2 instead of DDP (needs --nproc N >= 2 or "
                   "torchrun)")
    p.add_argument("--comm", default="allreduce",
                   help="gradient communication; DDP: allreduce, fp16, powersgd, qsgd, topk, "
                   "scalecom, prune, fp, block; --fsdp: allreduce, fp8, qsgd, prune, fp, topk, "
                   "scalecom, block")
    p.add_argument("--comm-options", default="{}",
                   help='JSON keyword arguments of the communication hook, e.g. \'{"levels": 16}\'')
    p.add_argument("--backend", default=None, help="torch.distributed backend (default: gloo on "
                   "CPU, nccl on CUDA)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help="seconds a data-parallel collective waits for a silent peer before the "
                   f"run stops with a line naming it (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--malloc", default="retain", choices=MALLOC_POLICIES,
                   help="retain (default): glibc keeps the memory a step frees for the next "
                   "step, so its tensors do not page-fault in again; default: the C library's "
                   "policy as it is (gradcomp.apps.runtime)")
    p.add_argument("--quiet", action="store_true")
    return p


def config_from_args(args):
    from gradcomp.apps.train import TrainConfig

    try:
        comm_options = json.loads(args.comm_options)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--comm-options must be a JSON object: {exc}") from None
    if not isinstance(comm_options, dict):
        raise ValueError("--comm-options must be a JSON object")
    try:
        return TrainConfig(
            recipe=args.recipe, model=args.model, dataset=args.dataset, epochs=args.epochs,
            batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
            schedule=args.schedule, weight_decay=args.weight_decay, seed=args.seed,
            device=args.device, out=args.out, resume=args.resume, overwrite=args.overwrite,
            data_dir=args.data_dir, timeout=args.timeout,
            max_train=args.max_train, width=args.width, workers=args.workers,
            progress=not args.quiet, max_steps_per_epoch=args.max_steps_per_epoch,
            comm=args.comm, comm_options=comm_options, context=args.context,
            fsdp=args.fsdp, malloc=args.malloc,
        )
    except ValueError as exc:
        raise ValueError(_as_flag(str(exc))) from None


def _as_flag(msg: str) -> str:
    """'max_steps_per_epoch must be ...' -> '--max-steps-per-epoch must be ...' (CLI wording)."""
    field = msg.split(" ", 1)[0]
    if field.isidentifier() and field.islower():
        return "--" + field.replace("_", "-") + msg[len(field):]
    return msg


def run(args: argparse.Namespace) -> int:
    from gradcomp.apps.distributed import (
        EXIT_INTERRUPTED,
        finished,
        launch_local,
        running_under_torchrun,
        validate_comm_args,
        worker_main,
    )
    from gradcomp.apps.train import train

    cfg = config_from_args(args)
    cfg.recipe_obj()  # fail fast on an unknown recipe
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if running_under_torchrun():
        if args.nproc != 1:
            raise ValueError("--nproc spawns processes on this machine; under torchrun each "
                             "process is one rank (torchrun's --nproc_per_node): leave it out")
        validate_comm_args(cfg.comm, cfg.comm_options, fsdp=cfg.fsdp)
        res = worker_main(cfg, backend=args.backend)
        finished(EXIT_INTERRUPTED if res.interrupted else 0)  # a torchrun rank: no teardown
    if args.nproc > 1:
        # before spawning: one line, not N
        validate_comm_args(cfg.comm, cfg.comm_options, fsdp=cfg.fsdp)
        _check_out(cfg)
        return launch_local(cfg, args.nproc, backend=args.backend)
    if cfg.fsdp:
        raise ValueError("--fsdp needs data-parallel training on >= 2 ranks: add --nproc N "
                         "(N >= 2), or run under torchrun")
    if args.comm != "allreduce":
        raise ValueError("--comm needs data-parallel training: add --nproc N (or run under "
                         "torchrun)")
    res = train(cfg)
    if res.interrupted:
        return EXIT_INTERRUPTED
    if math.isfinite(res.val_perplexity):
        final = f"validation perplexity {res.val_perplexity:.3f} (loss {res.val_loss:.4f})"
    elif math.isfinite(res.val_accuracy):
        final = f"validation accuracy {100 * res.val_accuracy:.2f}%"
    else:
        final = f"test accuracy {100 * res.test_accuracy:.2f}%"
    print(f"{final} after {len(res.history)} epoch(s); outputs in {os.path.abspath(cfg.out)}")
    return 0


def _check_out(cfg) -> None:
    """The launcher checks --out before spawning, so a bad path is one line, not one per rank
    (rank 0 checks it again, under torchrun the only check)."""
    from pathlib import Path

    from gradcomp.apps.train import (
        CHECKPOINT,
        DCP_CHECKPOINT,
        PREVIOUS_CHECKPOINT,
        PREVIOUS_DCP_CHECKPOINT,
    )

    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory (created if missing)")
    if (not cfg.resume and not cfg.overwrite
            and any((out / n).exists() for n in (CHECKPOINT, PREVIOUS_CHECKPOINT, DCP_CHECKPOINT,
                                                 PREVIOUS_DCP_CHECKPOINT))):
        raise ValueError(f"--out {out} already holds a run ({CHECKPOINT}); add --resume to "
                         "continue it, --overwrite to start it over, or choose another --out")
