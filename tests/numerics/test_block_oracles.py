"""Block formats bit for bit against torchao 0.18.0's pure-PyTorch MX and NVFP4 emulation.

The full count (>= 10^6 values per format and scale rule) is benchmarks/block_exactness.py;
here a smaller sample plus the adversarial blocks, with torchao's documented differences
(E8M0 byte-0 blocks, its float log2 in RCEIL) checked to be exactly what differs.
"""

from __future__ import annotations

import warnings

import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.constants import DTYPE_FP6_E2M3, DTYPE_FP6_E3M2
    from torchao.prototype.mx_formats.kernels import f4_unpacked_to_f32, unpack_uint4
    from torchao.prototype.mx_formats.mx_tensor import get_fp_scale, to_dtype, to_mx
    from torchao.prototype.mx_formats.nvfp4_tensor import nvfp4_quantize, per_tensor_amax_to_scale

from gradcomp.numerics.block import BlockFormat, block_scales, quantize_block

MX = {"mxfp8_e4m3": torch.float8_e4m3fn, "mxfp8_e5m2": torch.float8_e5m2,
      "mxfp6_e3m2": DTYPE_FP6_E3M2, "mxfp6_e2m3": DTYPE_FP6_E2M3,
      "mxfp4": torch.float4_e2m1fn_x2}
MODES = {"floor": ScaleCalculationMode.FLOOR, "rceil": ScaleCalculationMode.RCEIL}


def torchao_mx(x: torch.Tensor, name: str, rule: str):
    """(dequantized tensor in x's dtype, per-block scale as float32) from torchao."""
    s, d = to_mx(x, MX[name], 32, MODES[rule])
    return to_dtype(d, s, MX[name], 32, x.dtype), get_fp_scale(s).reshape(-1)


def torchao_nvfp4(x: torch.Tensor, tensor_scale: bool) -> torch.Tensor:
    pts = per_tensor_amax_to_scale(x.abs().amax()) if tensor_scale else None
    s8, d = nvfp4_quantize(x, 16, pts)
    q = f4_unpacked_to_f32(unpack_uint4(d)).reshape(x.shape[0], -1, 16)
    s = s8.to(torch.float32) if pts is None else pts * s8.to(torch.float32)
    return (q * s.unsqueeze(-1)).reshape(x.shape).to(x.dtype)


def lognormal(shape, sigma, seed):
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp(sigma * torch.randn(shape, generator=g, dtype=torch.float64))
    return (mag * torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)).float()


def adversarial(max_elem: float, emax: int) -> torch.Tensor:
    """Rows of 32: zeros, one huge value, amax at and around powers of two (of amax and of
    amax / max), tiny and huge amax, float32 subnormal values."""
    lin = torch.linspace(-1, 1, 32, dtype=torch.float64)
    rows = [torch.zeros(32), torch.cat([torch.tensor([3e38]), torch.full((31,), 1.0)]),
            torch.cat([torch.tensor([1e20]), lin[1:] * 1e-3])]
    for j in range(-100, 101, 7):
        for f in (1.0, 1 + 2**-23, 1 - 2**-24, 1 + 2**-10, 1.5, 1.9999999):
            rows.append(lin * 2.0**j * f)
            rows.append(lin * max_elem * 2.0**j * f)
    rows.append(lin * 2.0 ** (emax - 125))  # byte 1 under floor: the smallest normal scale
    return torch.stack([r.float() for r in rows])


def byte0_blocks(x: torch.Tensor, bf: BlockFormat) -> torch.Tensor:
    """Blocks whose E8M0 scale is 2^-127 (byte 0): torchao uses another scale there."""
    return block_scales(x, bf).reshape(x.shape[0], -1) == 2.0**-127


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.float().view(torch.int32)


@pytest.mark.parametrize("rule", ["floor", "rceil"])
@pytest.mark.parametrize("name", list(MX))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mx_random_bit_exact(name, rule, dtype):
    bf = BlockFormat.from_name(name).replace(rule=rule)
    x = lognormal((128, 256), 3.0, seed=hash((name, rule)) % 1000).to(dtype)
    ref, ref_scale = torchao_mx(x, name, rule)
    out = quantize_block(x, bf, compile=False)
    assert out.dtype == dtype
    assert torch.equal(bits(out), bits(ref))
    assert torch.equal(block_scales(x, bf), ref_scale)


@pytest.mark.parametrize("rule", ["floor", "rceil"])
@pytest.mark.parametrize("name", list(MX))
def test_mx_adversarial(name, rule):
    bf = BlockFormat.from_name(name).replace(rule=rule)
    x = adversarial(bf.elem.max_normal, bf.elem.emax)
    ref, ref_scale = torchao_mx(x, name, rule)
    out = quantize_block(x, bf, compile=False)
    ours_scale = block_scales(x, bf).reshape(-1)
    differ = (bits(out) != bits(ref)).any(1)
    # the documented differences, and nothing else:
    byte0 = byte0_blocks(x, bf).reshape(-1)  # 2^-127 scale: torchao divides by 2^-126 or 1
    amax = x.abs().amax(1).double()
    # torchao's RCEIL rounds ceil(log2 d) down when d is just above a power of two: its scale
    # is then half of ours and breaks amax / scale <= max (the rule's promise)
    log2_edge = (ref_scale.double() * 2 == ours_scale.double()) & (
        amax / ref_scale.double() > bf.elem.max_normal)
    assert log2_edge.any() == (rule == "rceil")  # the probes do hit torchao's float log2
    assert not (differ & ~byte0 & ~log2_edge).any()
    assert (ref_scale[~byte0 & ~log2_edge] == ours_scale[~byte0 & ~log2_edge]).all()
    assert byte0.any()  # the probe rows do reach byte 0
    # ours keeps the rule's promise where torchao's float log2 does not
    if rule == "rceil":  # up to the rounding of d = amax / max
        assert (amax <= ours_scale.double() * bf.elem.max_normal * (1 + 2**-23)).all()


@pytest.mark.parametrize("name", list(MX))
def test_mx_nonfinite(name):
    bf = BlockFormat.from_name(name)
    x = lognormal((3, 32), 1.0, seed=5)
    x[0, 3] = float("nan")
    x[1, 4] = float("inf")
    x[1, 5] = -float("inf")
    for rule in ("floor", "rceil"):
        ref, _ = torchao_mx(x, name, rule)
        out = quantize_block(x, bf.replace(rule=rule), compile=False)
        assert torch.isnan(ref[0]).all() and torch.isnan(out[0]).all()
        torch.testing.assert_close(out[1:], ref[1:], rtol=0, atol=0)  # inf stays inf here


@pytest.mark.parametrize("tensor_scale", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nvfp4_bit_exact(tensor_scale, dtype):
    bf = BlockFormat.from_name("nvfp4").replace(tensor_scale=tensor_scale)
    for sigma, seed in ((1.0, 1), (3.0, 2)):
        x = lognormal((64, 512), sigma, seed).to(dtype)
        assert torch.equal(bits(quantize_block(x, bf, compile=False)),
                           bits(torchao_nvfp4(x, tensor_scale)))
    x = adversarial(6.0, 2)[:, :32].contiguous()
    if tensor_scale:
        x = x[1:] / 3e38 * 1e3  # the rows' range within float32 for a common tensor scale
    assert torch.equal(bits(quantize_block(x, bf, compile=False)),
                       bits(torchao_nvfp4(x, tensor_scale)))


def test_nvfp4_nonfinite():
    x = lognormal((3, 16), 1.0, seed=3)
    x[0, 1] = float("nan")
    x[1, 2] = float("inf")
    bf = BlockFormat.from_name("nvfp4").replace(tensor_scale=False)
    out, ref = quantize_block(x, bf, compile=False), torchao_nvfp4(x, False)
    assert torch.isnan(out[0]).all() and torch.isnan(ref[0]).all()
    torch.testing.assert_close(out[1:], ref[1:], rtol=0, atol=0)  # inf saturates to 6 * 448
    assert out[1, 2].item() == 6 * 448
