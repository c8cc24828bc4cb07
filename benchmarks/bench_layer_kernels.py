"""The hot-path kernels on one layer-sized tensor, hot in cache: time per call and ratio to a copy.

``bench_quantize.py`` and ``bench_prune.py`` time 16M elements, where every kernel is bound by
memory traffic; the layers of the benchmark models (0.4-1.6M float32 neural-gradient elements)
stay in cache, where the kernels' arithmetic decides. This script calls each kernel the way the
compressors' hot path does (the pruning kernel with the non-finite count, the fused amax
kernels, and the metric steps' variants with every count), interleaved with ``x.clone()``
(``--calls`` rounds), and the block quantizers on a 16-channel conv output of the same size
(where the size allows), and prints the minimum and median time per call and the minimum's ratio
to the clone's minimum. Run it with ``PYTHONPATH`` on another checkout's ``src`` to compare
versions:

    python benchmarks/bench_layer_kernels.py [--sizes 401408,1605632] [--calls 60]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gradcomp.compressors.quantizer import BlockQuantizer
from gradcomp.numerics.pruning import prune_quantize_amax, stochastic_prune
from gradcomp.numerics.rounding import quantize_fp_amax


def cases(x: torch.Tensor, g: torch.Generator) -> dict:
    """name -> a call as the compressors make it (FP6 = e3m2, threshold at about 1.5 sigma;
    the block formats on x taken as a 16-channel conv output (N, 16, 28, 28), blocks along the
    channels, as the block recipes quantize the first stage of the benchmark ResNets)."""
    thr = torch.tensor(1.5e-3, dtype=torch.float64)
    block = {}
    if x.numel() % (16 * 28 * 28) == 0:
        conv = x.view(-1, 16, 28, 28)
        for fmt in ("mxfp8_e4m3", "nvfp4"):
            for rounding in ("nearest", "stochastic"):
                q = BlockQuantizer(fmt, rounding)
                block[f"{fmt} {rounding}, channel blocks of a 16-channel conv output"] = (
                    lambda q=q: q.compress(conv, g, measure=False))
    return {
        "clone": lambda: x.clone(),
        "prune + non-finite count (hot path)":
            lambda: stochastic_prune(x, thr, g, counts=("nonfinite",)),
        "prune + all counts (metric step)": lambda: stochastic_prune(x, thr, g, counts=True),
        "prune + FP6 at the pruned amax": lambda: prune_quantize_amax(
            x, thr, "e3m2", generator=g, counts=("nonfinite",)),
        "FP6 at the current amax (hot path)": lambda: quantize_fp_amax(x, "e3m2"),
        "FP6 at the current amax + all counts": lambda: quantize_fp_amax(x, "e3m2", counts=True),
        **block,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="401408,1605632",
                    help="comma-separated element counts (default: ResNet-8's layer sizes)")
    ap.add_argument("--calls", type=int, default=60, help="interleaved rounds per case")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"float32, {args.threads} threads, {args.calls} interleaved calls per case, "
          "compiled kernels, inputs hot in cache")
    print("| elements | kernel | min ms | median ms | min x clone |")
    print("|---:|---|---:|---:|---:|")
    for n in (int(v) for v in args.sizes.split(",")):
        x = torch.randn(n, generator=g) * 1e-3
        calls = cases(x, g)
        for f in calls.values():  # compile and warm up
            for _ in range(3):
                f()
        times = {k: [] for k in calls}
        for _ in range(args.calls):
            for k, f in calls.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
        floor = min(times["clone"])
        for k, v in times.items():
            print(f"| {n} | {k} | {min(v) * 1e3:.3f} | {statistics.median(v) * 1e3:.3f} | "
                  f"{min(v) / floor:.2f} |")


if __name__ == "__main__":
    main()
