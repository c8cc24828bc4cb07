"""Benchmark of stochastic pruning, threshold solves and the pruned-tensor codec.

Every time is the minimum over repeats, and pruning is reported as a ratio to ``x.clone()``
timed in the same run (the machine may be shared; ratios are what transfer). Usage:

    python benchmarks/bench_prune.py [--numel 16777216] [--repeats 7] [--device cpu]
    python benchmarks/bench_prune.py --fused --sizes 800000,3200000,16777216

``--fused`` times ``prune_quantize`` (prune + FP6 nearest with a scale, one pass, the hot path's
non-finite count) against ``stochastic_prune`` then ``quantize_fp`` at each of ``--sizes``.

``GRADCOMP_COMPILE=0`` benchmarks the eager path instead of the fused one.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from gradcomp.compressors.encoding import decode_pruned, encode_pruned
from gradcomp.numerics.pruning import prune_quantize, stochastic_prune
from gradcomp.numerics.rounding import quantize_fp
from gradcomp.numerics.sparsity import empirical_threshold, lognormal_threshold


def _best(fn, repeats: int, device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return min(times)


def _fused(args, dev) -> int:
    """Prune + quantize in one kernel vs the two calls, interleaved, per size."""
    g = torch.Generator(device=dev).manual_seed(0)
    s = torch.tensor(2.0**12, device=dev)
    nf = ("nonfinite",)
    print("| elements | clone ms | two calls ms | one pass ms | one pass / two calls |")
    print("|---:|---:|---:|---:|---:|")
    for n in (int(v) for v in args.sizes.split(",")):
        x = torch.exp(torch.randn(n, device=dev, generator=g) * 2 - 10)
        a = torch.tensor(lognormal_threshold(0.8, -10.0, 2.0), device=dev)

        def two(x=x, a=a):
            p, c = stochastic_prune(x, a, g, counts=nf)
            return quantize_fp(p, "e3m2", scale=s), c

        def one(x=x, a=a):
            return prune_quantize(x, a, "e3m2", "nearest", s, g, counts=nf)

        two(), one()  # compile
        best = {"clone": float("inf"), "two": float("inf"), "one": float("inf")}
        for _ in range(args.repeats):
            for k, fn in (("clone", x.clone), ("two", two), ("one", one)):
                best[k] = min(best[k], _best(fn, 3, dev))
        print(f"| {n} | {best['clone'] * 1e3:.2f} | {best['two'] * 1e3:.2f} | "
              f"{best['one'] * 1e3:.2f} | {best['one'] / best['two']:.2f} |")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--numel", type=int, default=1 << 24)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--fused", action="store_true", help="one pass vs two, at --sizes")
    p.add_argument("--sizes", default="800000,3200000,16777216")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    if args.fused:
        return _fused(args, dev)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.exp(torch.randn(args.numel, device=dev, generator=g) * 2 - 10)
    a = torch.tensor(lognormal_threshold(0.8, -10.0, 2.0), device=dev)
    path = "eager" if os.environ.get("GRADCOMP_COMPILE", "1") == "0" else "fused"

    t0 = time.perf_counter()
    stochastic_prune(x, a, g)  # warm-up (compiles on the first call)
    warm = time.perf_counter() - t0
    stochastic_prune(x, a, g, counts=True)
    # interleave the reference and the operator so both see the same machine load
    clone = prune = counted = float("inf")
    for _ in range(3):
        clone = min(clone, _best(lambda: x.clone(), args.repeats, dev))
        prune = min(prune, _best(lambda: stochastic_prune(x, a, g), args.repeats, dev))
        # the non-finite, zero and +-a counts of the hot path, reduced in the same pass
        counted = min(counted, _best(lambda: stochastic_prune(x, a, g, counts=True),
                                     args.repeats, dev))
    print(f"stochastic_prune ({path}) on {args.numel} float32: {prune * 1e3:.1f} ms, "
          f"x.clone() {clone * 1e3:.1f} ms, ratio {prune / clone:.2f}x "
          f"(first call {warm:.1f} s); with counts=True {counted / clone:.2f}x")

    layers = 100
    gen = torch.Generator().manual_seed(1)
    mu = -12 + 6 * torch.rand(layers, generator=gen, dtype=torch.float64)
    sig = 1 + 3 * torch.rand(layers, generator=gen, dtype=torch.float64)
    z = 0.5 * torch.rand(layers, generator=gen, dtype=torch.float64)
    t_ln = _best(lambda: lognormal_threshold(0.8, mu, sig, z), args.repeats, torch.device("cpu"))
    samples = torch.exp(torch.randn(layers, 4096, device=dev, generator=g) * 2)
    t_emp = _best(lambda: empirical_threshold(samples, 0.8), args.repeats, dev)
    print(f"threshold solve for {layers} layers: lognormal (Eq. 8) {t_ln * 1e3:.2f} ms, "
          f"empirical (4096-value samples) {t_emp * 1e3:.2f} ms")

    y = stochastic_prune(x, a, g)
    data = encode_pruned(y, a)
    t_enc = _best(lambda: encode_pruned(y, a), 3, dev)
    t_dec = _best(lambda: decode_pruned(data), 3, dev)
    mb = args.numel * 4 / 1e6
    print(f"codec at 80% sparsity: {8 * len(data) / args.numel:.3f} bits/element; encode "
          f"{mb / t_enc:.0f} MB/s ({args.numel / t_enc / 1e6:.0f} Melem/s), decode "
          f"{mb / t_dec:.0f} MB/s ({args.numel / t_dec / 1e6:.0f} Melem/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
