"""Every float32 input through ``quantize_fp`` nearest: the float path against the integer path.

On the CPU, nearest rounding of float32 takes a float path (Veltkamp's splitting, see
:mod:`gradcomp.numerics.rounding`) for formats of 1 to 21 mantissa bits; the integer path
(rounding the bit pattern) is the one the ml_dtypes / grid-reference tests pinned first. This
script feeds every non-negative float32 bit pattern (2^31 values: zeros, subnormals, normals,
inf, every NaN payload) and every 97th negative one through both, compiled, and prints the
number of bit mismatches per format (NaN payloads included). The tests sweep only the boundary
binades (``tests/numerics/test_rounding.py``); this is the full sweep, about 20 s per format on
2 cores.

    python benchmarks/rounding_exactness.py [--formats e5m2,e4m3fn,...] [--scale 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from gradcomp.numerics.formats import FPFormat
from gradcomp.numerics.kernels import variant
from gradcomp.numerics.rounding import _float_path, _quantize_flat, prepare, quantize_fp

FORMATS = ("e5m2,e5m2_inf,e4m3,e4m3_inf,e4m3fn,e3m2fn,e2m3fn,e2m1fn,e3m4,e5m2_nosub,"
           "e2m1fn_nosub,e5m10,e4m15,e3m21,e6m7,1-2-1,1-3-2,1-4-1,1-4-3,1-5-2,1-3-4,1-2-5,"
           "1-5-10,1-6-7")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default=FORMATS)
    ap.add_argument("--chunk-log2", type=int, default=26, help="values per chunk: 2^N")
    ap.add_argument("--scale", type=float, default=None,
                    help="also pass this scale (Q(x*s)/s; the float path divides the same)")
    args = ap.parse_args()
    chunk = 1 << args.chunk_log2
    total_bad = 0
    for name in args.formats.split(","):
        fmt = FPFormat.from_name(name)
        probe = torch.zeros(1)
        if not _float_path(fmt, False):
            print(f"{name}: integer path only (not compared)")
            continue
        static = dict(prepare(probe, fmt, "nearest", args.scale, None).static)
        assert static["fast"]
        static["fast"] = static["overflow_inf"] = False
        integer = variant(_quantize_flat, "quantize_fp", count=(), **static)
        t0 = time.perf_counter()
        bad = seen = 0
        for start in range(0, 1 << 31, chunk):
            bits = torch.arange(start, start + chunk, dtype=torch.int32)
            for y in (bits.view(torch.float32), -bits[::97].view(torch.float32)):
                fast = quantize_fp(y, fmt, scale=args.scale, compile=True)
                ref = integer(y, *prepare(y, fmt, "nearest", args.scale, None).tensors,
                              compile=True)
                bad += int((fast.view(torch.int32) != ref.view(torch.int32)).sum())
                seen += y.numel()
        total_bad += bad
        print(f"{name}: {seen:,} values, {bad} mismatches "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"total mismatches: {total_bad}")


if __name__ == "__main__":
    main()
