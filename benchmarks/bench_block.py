"""Time block quantization of a 16M-element float32 tensor against ``x.clone()`` in the same run.

``x.clone()`` is one read + one write, the memory roofline of any elementwise op; block
quantization reads x twice (block amax, then the elements) and writes once, so about 1.5x
clone is its floor on a memory-bound machine (target: <= 2x on the CPU, fused path).
Prints min and median of ``--repeat`` runs and ratios to clone (min / min). Run:

    python benchmarks/bench_block.py [--n 16777216] [--repeat 7] [--device cpu]
        [--formats mxfp8_e4m3,mxfp4,nvfp4,fp8_block128] [--eager]
"""

from __future__ import annotations

import argparse

import torch

from _timing import time_call  # noqa: E402  (a sibling script module)
from gradcomp.numerics.block import BlockFormat, quantize_block


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1 << 24, help="elements (default 16M)")
    p.add_argument("--repeat", type=int, default=7, help="timed runs per case")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--formats", default="mxfp8_e4m3,mxfp4,nvfp4,fp8_block128",
                   help="comma-separated block format names")
    p.add_argument("--eager", action="store_true", help="also time the (slow) eager path")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    fmts = [BlockFormat.from_name(f) for f in args.formats.split(",")]
    x = torch.randn(args.n // 1024, 1024, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    cases = {"clone": lambda: x.clone()}
    for bf in fmts:
        for compiled in (True, False) if args.eager else (True,):
            tag = "fused" if compiled else "eager"
            cases[f"{bf.name} nearest ({tag})"] = (
                lambda bf=bf, c=compiled: quantize_block(x, bf, compile=c))
            cases[f"{bf.name} stochastic ({tag})"] = (
                lambda bf=bf, c=compiled: quantize_block(x, bf, "stochastic", generator=g,
                                                         compile=c))
    # clone is timed again between the cases: the ratio uses the clone nearest in time
    results, ref = {}, None
    for name, fn in cases.items():
        if name != "clone":
            ref = time_call(cases["clone"], args.repeat, device)[0]
        results[name] = (*time_call(fn, args.repeat, device), ref)
    print(f"{x.numel()} float32 on {device}, threads {torch.get_num_threads()}")
    print(f"{'case':<36s} {'min ms':>9s} {'median ms':>10s} {'clone ms':>9s} {'x clone':>8s}")
    for name, (tmin, tmed, r) in results.items():
        r = tmin if r is None else r
        print(f"{name:<36s} {tmin * 1e3:9.2f} {tmed * 1e3:10.2f} {r * 1e3:9.2f} {tmin / r:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
