"""Compressed FSDP2 reduce-scatter on CPU gloo workers: time per step and bytes on the wire.

    python benchmarks/bench_fsdp.py [--world 2] [--width 512] [--depth 3] [--rounds 5]
                                    [--steps 4] [--batch 64]

Every method of ``gradcomp.integration.fsdp.METHODS`` trains its own copy of an MLP
(``--depth`` hidden layers of ``--width``, one FSDP group per Linear) on the same synthetic
batches, next to uncompressed FSDP with torch's own reduce-scatter, in the same processes.
Rounds are interleaved (each round times ``--steps`` steps of every model in turn, with a
barrier around each, the slowest rank's time counted), so that load changes of a shared machine
hit every method alike; the table gives the median time per step over the rounds, its ratio to
uncompressed FSDP, and the compression ratio from the bytes each comm actually handed to the
collectives (against an fp32 reduce-scatter of the same gradients).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard

from gradcomp.integration import fsdp as F

RUNS = [  # (label, method, options); method None: torch's own reduce-scatter
    ("FSDP fp32 (torch)", None, {}),
    ("fp32 counted (allreduce)", "allreduce", {}),
    ("FP8 e4m3 agreed scale, SR", "fp8", {"compile": False}),
    ("MXFP8 e4m3 agreed block scales, SR", "block", {"fmt": "mxfp8_e4m3", "compile": False}),
    ("MXFP4 agreed block scales, SR", "block", {"fmt": "mxfp4", "compile": False}),
    ("NVFP4 agreed block scales, SR", "block", {"fmt": "nvfp4", "compile": False}),
    ("QSGD s=8 d=256 int8", "qsgd", {"levels": 8, "bucket_size": 256}),
    ("prune 90% lognormal", "prune", {"sparsity": 0.9}),
    ("FP e4m3 per-rank scale", "fp", {"compile": False}),
    ("top-k 1% + EF", "topk", {"ratio": 0.01}),
    ("ScaleCom 1%", "scalecom", {"ratio": 0.01}),
]


def _model(args) -> torch.nn.Module:
    torch.manual_seed(0)
    layers, d = [], 784
    for _ in range(args.depth):
        layers += [torch.nn.Linear(d, args.width), torch.nn.ReLU()]
        d = args.width
    layers.append(torch.nn.Linear(d, 10))
    return torch.nn.Sequential(*layers)


def _worker(rank, world, port, args, out):
    torch.set_num_threads(1)
    os.environ["GRADCOMP_COMPILE"] = "0"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        runs = []
        for label, method, opts in RUNS:
            if method is None:
                model = _model(args)
                for m in model:
                    if isinstance(m, torch.nn.Linear):
                        fully_shard(m)
                fully_shard(model)
                comm = None
            else:
                model, comm = F.setup_fsdp(_model(args), method, opts, seed=0)
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            runs.append((label, model, opt, comm, []))
        g = torch.Generator().manual_seed(rank)
        xs = torch.randn(args.steps, args.batch, 784, generator=g)
        ys = torch.randint(10, (args.steps, args.batch), generator=g)

        def steps(model, opt):
            for x, y in zip(xs, ys):
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()

        for _, model, opt, _, _ in runs:  # warm-up: lazy init, first-call allocations
            steps(model, opt)
        for _ in range(args.rounds):
            for _, model, opt, _, times in runs:
                dist.barrier()
                t0 = time.perf_counter()
                steps(model, opt)
                dt = torch.tensor([time.perf_counter() - t0])
                dist.all_reduce(dt, op=dist.ReduceOp.MAX)
                times.append(float(dt) / args.steps)
        if rank == 0:
            rows = [(label, statistics.median(times), comm.metrics() if comm else None)
                    for label, _, _, comm, times in runs]
            torch.save(rows, out)
    finally:
        dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rows.pt")
        mp.spawn(_worker, args=(args.world, port, args, out), nprocs=args.world, join=True)
        rows = torch.load(out, weights_only=False)
    numel = sum(p.numel() for p in _model(args).parameters())
    print(f"FSDP2, {args.world} gloo ranks, MLP {args.depth}x{args.width} ({numel} parameters),"
          f" batch {args.batch}; median of {args.rounds} interleaved rounds of {args.steps} "
          "steps (the machine may be shared: ratios, not absolute times, are the result)\n")
    print("| method | ms / step | time vs FSDP fp32 | compression (bytes sent) |")
    print("|---|---:|---:|---:|")
    base = rows[0][1]
    for label, t, m in rows:
        ratio = f"{m['compression_ratio']:.1f}x" if m else "1.0x (torch)"
        print(f"| {label} | {1e3 * t:.1f} | {t / base:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
