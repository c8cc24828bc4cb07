"""Compressed data-parallel communication on CPU gloo workers: ratio, throughput, accuracy.

    python benchmarks/bench_comm.py [--world 2] [--epochs 6] [--numel 1000000]

Part 1 (one process): encode/decode time of each compressor on ``--numel`` fp32 gradients,
as a ratio to ``x.clone()`` timed in the same run (median of 5 repeats; the machine is shared),
and QSGD's measured bits per coordinate of the Elias bit stream against QSGD's bound
(section 3.2).
Part 2 (``--world`` gloo workers): a 64-64-10 MLP trained on sklearn digits with each hook:
final test accuracy, compression ratio of the steady state (last step, after the fp32 warm-up
iterations) against an fp32 all-reduce, and time per step relative to uncompressed DDP.
Prints markdown tables.
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
from torch.nn.parallel import DistributedDataParallel as DDP

from gradcomp.compressors.comm import (
    QSGD,
    FPCompress,
    ScaleCom,
    StochasticPrune,
    TopK,
    qsgd_bits_bound,
)
from gradcomp.integration import ddp_hooks as H

RUNS = [  # (label, registry method, options)
    ("allreduce fp32", "allreduce", {}),
    ("fp16 (torch)", "fp16", {}),
    ("PowerSGD r=2 (torch)", "powersgd", {"matrix_approximation_rank": 2}),
    ("QSGD s=8 d=256 int8", "qsgd", {"levels": 8, "bucket_size": 256}),
    ("QSGD s=8 d=256 Elias", "qsgd", {"levels": 8, "bucket_size": 256, "bitstream": True}),
    ("top-k 1% + EF", "topk", {"ratio": 0.01}),
    ("top-k 10% + EF", "topk", {"ratio": 0.1}),
    ("ScaleCom 1%", "scalecom", {"ratio": 0.01}),
    ("ScaleCom 10%", "scalecom", {"ratio": 0.1}),
    ("prune 90% lognormal", "prune", {"sparsity": 0.9}),
    ("FP e4m3fn stochastic", "fp", {"fmt": "e4m3fn", "compile": False}),
]


def _median_time(fn, reps=5) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def throughput(numel: int) -> list[str]:
    torch.manual_seed(0)
    x = torch.randn(numel) * torch.exp(torch.randn(numel))
    g = torch.Generator().manual_seed(0)
    ref = _median_time(lambda: x.clone())
    comps = [
        ("QSGD s=8 d=256", QSGD(levels=8, bucket_size=256)),
        ("top-k 1%", TopK(ratio=0.01)),
        ("FP e4m3fn", FPCompress(fmt="e4m3fn", compile=False)),
    ]
    comps.append(("prune 90%", StochasticPrune(sparsity=0.9)))
    rows = ["| compressor | encode ms | decode ms | encode / clone | decode / clone |",
            "|---|---|---|---|---|"]
    for name, c in comps:
        c.compress(x, g)  # warm-up
        p = c.compress(x, g)
        te = _median_time(lambda c=c: c.compress(x, g))
        td = _median_time(lambda c=c, p=p: c.decompress(p, numel))
        rows.append(f"| {name} | {1e3 * te:.1f} | {1e3 * td:.1f} | {te / ref:.1f} | "
                    f"{td / ref:.1f} |")
    sc = ScaleCom(ratio=0.01)
    te = _median_time(lambda: sc.compress(x, indices=sc.select(x)))
    idx = sc.select(x)
    td = _median_time(lambda: sc.decompress(sc.compress(x, indices=idx), numel, indices=idx))
    rows.append(f"| ScaleCom 1% (select+gather) | {1e3 * te:.1f} | {1e3 * td:.1f} | "
                f"{te / ref:.1f} | {td / ref:.1f} |")
    q = QSGD(levels=8, bucket_size=256)
    norms, lv = q.compress(x, g)
    te = _median_time(lambda: q.encode(norms, lv, numel), reps=3)
    data = q.encode(norms, lv, numel)
    td = _median_time(lambda: q.decode(data), reps=3)
    rows.append(f"| QSGD Elias-omega stream (on top) | {1e3 * te:.1f} | {1e3 * td:.1f} | "
                f"{te / ref:.1f} | {td / ref:.1f} |")
    rows.append(f"\nreference x.clone() of {numel} fp32: {1e3 * ref:.2f} ms")
    return rows


def bits_table(numel: int) -> list[str]:
    torch.manual_seed(1)
    x = torch.randn(numel) * torch.exp(torch.randn(numel))
    rows = ["| s | d | code | measured bits/coord | QSGD bound bits/coord | int8 levels + norms |",
            "|---|---|---|---|---|---|"]
    for s, d, code in [(1, 256, "omega"), (2, 512, "omega"), (8, 256, "omega"),
                       (8, 256, "gamma"), (16, 256, "omega"), (16, 4096, "omega")]:
        q = QSGD(levels=s, bucket_size=d, code=code)
        norms, lv = q.compress(x, torch.Generator().manual_seed(0))
        bits = q.encoded_bits(norms, lv, numel) / numel
        plain = 8 + 32 / d
        rows.append(f"| {s} | {d} | {code} | {bits:.3f} | {qsgd_bits_bound(s, d):.3f} | "
                    f"{plain:.3f} |")
    return rows


def _digits(rank, world):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[360:][rank::world], y[360:][rank::world], x[:360], y[:360]


def _worker(rank, world, port, outdir, epochs):
    torch.set_num_threads(1)
    # eager FP / pruning kernels in training: a torch.compile per bucket size would dominate
    os.environ["GRADCOMP_COMPILE"] = "0"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    xs, ys, xt, yt = _digits(rank, world)
    results = []
    for label, method, kw in RUNS:
        if method not in H.available_methods():
            continue
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                    torch.nn.Linear(128, 10))
        ddp = DDP(model, bucket_cap_mb=0.02)
        state, hook = H.make_comm_hook(method, **kw)
        ddp.register_comm_hook(state, hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        gen = torch.Generator().manual_seed(1 + rank)
        steps = 0
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(epochs):
            perm = torch.randperm(len(ys), generator=gen)
            for i in range(0, len(ys) - 31, 32):
                idx = perm[i : i + 32]
                opt.zero_grad()
                torch.nn.functional.cross_entropy(ddp(xs[idx]), ys[idx]).backward()
                opt.step()
                steps += 1
        elapsed = time.perf_counter() - t0
        with torch.no_grad():
            acc = (model(xt).argmax(1) == yt).float().mean().item()
        m = state.metrics()
        results.append((label, acc, m["last_step_ratio"], m["compression_ratio"], elapsed / steps))
    if rank == 0:
        torch.save(results, os.path.join(outdir, "bench.pt"))
    dist.destroy_process_group()


def training(world: int, epochs: int) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(world, port, d, epochs), nprocs=world, join=True)
        results = torch.load(os.path.join(d, "bench.pt"), weights_only=False)
    base_acc, base_t = results[0][1], results[0][4]
    rows = [f"| method ({world} workers, {epochs} epochs) | compression ratio (steady) | "
            "ratio incl. warm-up | test acc | acc - fp32 DDP | time/step ms | time vs DDP |",
            "|---|---|---|---|---|---|---|"]
    for label, acc, steady, total, t in results:
        rows.append(f"| {label} | {steady:.1f} | {total:.1f} | {acc:.3f} | {acc - base_acc:+.3f} |"
                    f" {1e3 * t:.2f} | {t / base_t:.2f}x |")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2, help="gloo workers (default 2)")
    ap.add_argument("--epochs", type=int, default=6, help="training epochs (default 6)")
    ap.add_argument("--numel", type=int, default=1_000_000, help="elements for throughput")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("\n".join(throughput(args.numel)), "\n")
    print("\n".join(bits_table(args.numel)), "\n")
    print("\n".join(training(args.world, args.epochs)))


if __name__ == "__main__":
    main()
