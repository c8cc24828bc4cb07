"""``gradcomp train``: train with a recipe (compressed neural gradients, DDP compression)."""

from __future__ import annotations

import argparse
import json
import os

from gradcomp.apps.commands._common import add_data_args

DEFAULT_OUT = "runs/train"


def add_parser(sub):
    p = sub.add_parser(
        "train",
        help="train a model with a recipe of compressed gradients",
        description="Train MODEL on DATASET with RECIPE (see `gradcomp recipes`). Writes "
        "metrics.csv, metrics.json and checkpoint.pt (each epoch) to --out; --resume continues "
        "a killed run bit for bit. --nproc N trains data-parallel on N local processes with "
        "--comm compression of the weight gradients (under torchrun, leave --nproc out).",
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
    p.add_argument("--max-train", type=int, default=None, help="use at most N training images")
    p.add_argument("--max-steps-per-epoch", type=int, default=None)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--nproc", type=int, default=1, help="data-parallel processes on this machine")
    p.add_argument("--comm", default="allreduce",
                   help="DDP gradient communication: allreduce, fp16, powersgd, qsgd, topk, "
                   "scalecom, prune, fp")
    p.add_argument("--comm-options", default="{}",
                   help='JSON keyword arguments of the communication hook, e.g. \'{"levels": 16}\'')
    p.add_argument("--backend", default=None, help="torch.distributed backend (default: gloo on "
                   "CPU, nccl on CUDA)")
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
    return TrainConfig(
        recipe=args.recipe, model=args.model, dataset=args.dataset, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
        schedule=args.schedule, weight_decay=args.weight_decay, seed=args.seed,
        device=args.device, out=args.out, resume=args.resume, data_dir=args.data_dir,
        max_train=args.max_train, width=args.width, workers=args.workers,
        progress=not args.quiet, max_steps_per_epoch=args.max_steps_per_epoch,
        comm=args.comm, comm_options=comm_options,
    )


def run(args: argparse.Namespace) -> int:
    from gradcomp.apps.distributed import launch_local, running_under_torchrun, worker_main
    from gradcomp.apps.train import train

    cfg = config_from_args(args)
    cfg.recipe_obj()  # fail fast on an unknown recipe
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if running_under_torchrun():
        worker_main(cfg, backend=args.backend)
        return 0
    if args.nproc > 1:
        launch_local(cfg, args.nproc, backend=args.backend)
        return 0
    if args.comm != "allreduce":
        raise ValueError("--comm needs data-parallel training: add --nproc N (or run under "
                         "torchrun)")
    res = train(cfg)
    print(f"test accuracy {100 * res.test_accuracy:.2f}% after {len(res.history)} epoch(s); "
          f"outputs in {os.path.abspath(cfg.out)}")
    return 0
