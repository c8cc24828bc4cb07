"""Count bit mismatches of ``quantize_block`` against torchao 0.18.0 on >= 10^6 values per case.

Cases: every MX format (E4M3, E5M2, E3M2, E2M3, E2M1 elements, 32-element blocks) under both
scale rules (floor, rceil) and NVFP4 with and without the per-tensor scale, on float32 and
bfloat16 lognormal data (sigma of ln|x| in {1, 3, 5}, random signs), finite inputs only; plus
fp8_block128, nvfp4_2d and fp8_block128x128 (no oracle has them) against an independent
reference written from the rules (numpy float32 operations, the element grid enumerated).
Prints one line per case: values compared, mismatches.

    python benchmarks/block_exactness.py [--n 1048576]
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.constants import DTYPE_FP6_E2M3, DTYPE_FP6_E3M2
    from torchao.prototype.mx_formats.kernels import f4_unpacked_to_f32, unpack_uint4
    from torchao.prototype.mx_formats.mx_tensor import to_dtype, to_mx
    from torchao.prototype.mx_formats.nvfp4_tensor import nvfp4_quantize, per_tensor_amax_to_scale

from gradcomp.numerics.block import BlockFormat, quantize_block
from gradcomp.numerics.formats import FPFormat

MX = {"mxfp8_e4m3": torch.float8_e4m3fn, "mxfp8_e5m2": torch.float8_e5m2,
      "mxfp6_e3m2": DTYPE_FP6_E3M2, "mxfp6_e2m3": DTYPE_FP6_E2M3,
      "mxfp4": torch.float4_e2m1fn_x2}
MODES = {"floor": ScaleCalculationMode.FLOOR, "rceil": ScaleCalculationMode.RCEIL}


def _data(n: int, sigma: float, seed: int, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp(sigma * torch.randn(n, generator=g, dtype=torch.float64))
    x = (mag * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)).float()
    return x.reshape(-1, 1024).to(dtype)


def _mismatch(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.float().view(torch.int32) != b.float().view(torch.int32)).sum())


def _grid_round(y: np.ndarray, fmt: FPFormat) -> np.ndarray:
    """Round half to even on the enumerated grid, saturating (independent of the library)."""
    grid = fmt.grid()
    a = np.minimum(np.abs(y), fmt.max_normal)
    i = np.clip(np.searchsorted(grid, a, side="right") - 1, 0, len(grid) - 2)
    lo, hi = grid[i], grid[i + 1]
    up = (hi - a < a - lo) | ((hi - a == a - lo) & ((i + 1) % 2 == 0))
    return np.copysign(np.where(up, hi, lo), y)


def _fp8_block128_reference(x: torch.Tensor) -> np.ndarray:
    xs = x.float().numpy().reshape(-1, 128)
    amax = np.abs(xs).max(1, keepdims=True)
    s = np.clip(amax / np.float32(448.0), np.float32(2.0**-126), np.finfo(np.float32).max)
    y = (xs / s).astype(np.float32)
    q = _grid_round(y.astype(np.float64), FPFormat.from_name("e4m3fn")).astype(np.float32)
    return (q * s).astype(np.float32).reshape(x.shape)


def _tile_reference(x: torch.Tensor, bf: BlockFormat) -> np.ndarray:
    """2-D tiles (r x c over the last two dims) by the rules, float32 numpy operations."""
    xs = x.float().numpy()
    R, C = xs.shape
    r, c = bf.block
    t4 = xs.reshape(R // r, r, C // c, c)
    amax = np.abs(t4).max(axis=(1, 3), keepdims=True)
    mx = np.float32(bf.elem.max_normal)
    if bf.scale == "fp32":
        s = np.clip(amax / mx, np.float32(2.0**-126), np.finfo(np.float32).max)
        y, deq = (t4 / s).astype(np.float32), s
    else:  # e4m3 scales with the per-tensor FP32 scale
        t = np.clip(np.abs(xs).max() / np.float32(448.0 * bf.elem.max_normal),
                    np.float32(2.0**-126), np.finfo(np.float32).max).astype(np.float32)
        sb = np.clip((amax / mx).astype(np.float32) / t, np.float32(2.0**-6), np.float32(448))
        s8 = _grid_round(sb.astype(np.float64), FPFormat.from_name("e4m3fn")).astype(np.float32)
        inv = ((np.float32(1.0) / t) / s8).astype(np.float32)
        y, deq = (t4 * inv).astype(np.float32), (t * s8).astype(np.float32)
    q = _grid_round(y.astype(np.float64), bf.elem).astype(np.float32)
    return (q * deq).astype(np.float32).reshape(R, C)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1 << 20, help="values per (case, sigma, dtype)")
    args = p.parse_args(argv)
    n = max(1024, args.n // 1024 * 1024)
    total = {}
    print(f"{'case':<28s} {'dtype':<9s} {'sigma':>5s} {'values':>9s} {'mismatch':>8s}")
    for dtype in (torch.float32, torch.bfloat16):
        for sigma in (1.0, 3.0, 5.0):
            x = _data(n, sigma, int(sigma * 10), dtype)
            cases = {}
            for name, el in MX.items():
                for rule, mode in MODES.items():
                    s, d = to_mx(x, el, 32, mode)
                    ref = to_dtype(d, s, el, 32, dtype)
                    bf = BlockFormat.from_name(name).replace(rule=rule)
                    cases[bf.name] = (quantize_block(x, bf, compile=False), ref)
            for ts in (True, False):
                pts = per_tensor_amax_to_scale(x.abs().amax()) if ts else None
                s8, d = nvfp4_quantize(x, 16, pts)
                q = f4_unpacked_to_f32(unpack_uint4(d)).reshape(x.shape[0], -1, 16)
                sc = s8.float() if pts is None else pts * s8.float()
                ref = (q * sc.unsqueeze(-1)).reshape(x.shape).to(dtype)
                bf = BlockFormat.from_name("nvfp4").replace(tensor_scale=ts)
                cases[bf.name] = (quantize_block(x, bf, compile=False), ref)
            ref = torch.from_numpy(_fp8_block128_reference(x)).to(dtype)
            cases["fp8_block128 (spec ref)"] = (quantize_block(x, "fp8_block128",
                                                               compile=False), ref)
            for name in ("nvfp4_2d", "fp8_block128x128"):
                bf = BlockFormat.from_name(name)
                ref = torch.from_numpy(_tile_reference(x, bf)).to(dtype)
                cases[f"{name} (spec ref)"] = (quantize_block(x, bf, compile=False), ref)
            for case, (ours, ref) in cases.items():
                mm = _mismatch(ours, ref)
                key = (case, str(dtype).replace("torch.", ""))
                v, m = total.get(key, (0, 0))
                total[key] = (v + x.numel(), m + mm)
                print(f"{case:<28s} {key[1]:<9s} {sigma:5.1f} {x.numel():9d} {mm:8d}")
    print("\ntotals per case:")
    for (case, dt), (v, m) in total.items():
        print(f"{case:<28s} {dt:<9s} {v:9d} values, {m} mismatches")
    return 0 if all(m == 0 for _, m in total.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
