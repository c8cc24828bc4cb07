"""Exact k-bit code packing: n codes of ``bits`` bits in ceil(n * bits / 8) bytes.

Bit order (little-endian, the order torchao's ``pack_uint4`` and the OCP MX packed layouts
use for 4-bit codes): code i occupies bits [i * bits, (i + 1) * bits) of the stream, where bit
j of the stream is bit (j mod 8) of byte j // 8 (bit 0 = least significant). So two 4-bit codes
share a byte with the first in the low nibble, four 6-bit codes fill three bytes, and 8-bit
codes are the bytes themselves. The unused high bits of the last byte are zero.

Implementation: codes are grouped so that a group fills whole bytes (g = 8 / gcd(bits, 8)
codes, lcm(bits, 8) bits); a group is assembled in one integer word (uint8, int32 or int64,
the narrowest that holds it) with one shift-and-or per code position, then split into bytes.
Widths whose group would not fit 62 bits (odd widths above 7, and 18, 22, ...) go through
one bit per byte. Only tensor operations; the Python loops run over the <= 8 positions of a
group, never over elements.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gradcomp.numerics._checks import require_int_range

__all__ = ["MAX_BITS", "pack_codes", "packed_bytes", "unpack_codes"]

MAX_BITS = 32
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def packed_bytes(n: int, bits: int) -> int:
    """Bytes that :func:`pack_codes` returns for ``n`` codes: ceil(n * bits / 8)."""
    require_int_range(n, "n", 0, 1 << 62)
    require_int_range(bits, "bits", 1, MAX_BITS)
    return -(-n * bits // 8)


def _plan(bits: int):
    """(codes per group, bytes per group, word dtype) or None for the bit-per-byte path."""
    group_bits = bits * 8 // math.gcd(bits, 8)  # lcm(bits, 8)
    if group_bits == 8:
        return 8 // bits, 1, torch.uint8
    if group_bits <= 30:
        return group_bits // bits, group_bits // 8, torch.int32
    if group_bits <= 62:  # below the sign bit: shifts and masks stay non-negative
        return group_bits // bits, group_bits // 8, torch.int64
    return None


def _result_dtype(bits: int) -> torch.dtype:
    return torch.uint8 if bits <= 8 else torch.int32 if bits <= 31 else torch.int64


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack the integer ``codes`` (any shape, read flattened) at ``bits`` bits each.

    Returns a 1-D uint8 tensor of :func:`packed_bytes` bytes on the codes' device, in the bit
    order of the module docstring. Only the low ``bits`` bits of each code are stored (codes
    are expected in [0, 2^bits); checking that would cost a host sync).

    Raises TypeError for a non-integer tensor, ValueError for bits outside [1, 32].
    """
    if not isinstance(codes, torch.Tensor) or codes.dtype not in _INT_DTYPES:
        raise TypeError(f"codes must be an integer tensor ({', '.join(map(str, _INT_DTYPES))}), "
                        f"got {getattr(codes, 'dtype', type(codes).__name__)}")
    nbytes = packed_bytes(codes.numel(), bits)
    flat = codes.reshape(-1)
    n = flat.numel()
    mask = (1 << bits) - 1
    plan = _plan(bits)
    if plan is None:  # one bit per byte, then eight bits per byte
        c = flat.to(torch.int64) & mask
        shifts = torch.arange(bits, device=c.device, dtype=torch.int64)
        stream = ((c[:, None] >> shifts) & 1).to(torch.uint8).reshape(-1)
        stream = F.pad(stream, (0, nbytes * 8 - stream.numel())).view(-1, 8)
        weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8, device=c.device)
        return (stream * weights).sum(1, dtype=torch.uint8)
    g, gb, wdt = plan
    groups = -(-n // g)
    if wdt == torch.uint8:  # bits <= 8: stay in bytes (uint8 codes need no cast at all)
        c = flat if flat.dtype == torch.uint8 else flat.to(torch.int32).to(torch.uint8)
    else:
        c = flat.to(wdt)  # a narrowing cast keeps the low bits (two's complement)
    c = c & mask
    c = F.pad(c, (0, groups * g - n)).view(groups, g)
    word = c[:, 0].clone()
    for j in range(1, g):  # fields are disjoint, so | is the sum
        word |= c[:, j] << (bits * j)
    if gb == 1:
        out = word.to(torch.uint8)
    else:
        out = torch.stack([((word >> (8 * i)) & 0xFF).to(torch.uint8) for i in range(gb)], 1)
    return out.reshape(-1)[:nbytes]


def unpack_codes(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``n`` codes of the packed ``data``.

    ``data`` must be a 1-D uint8 tensor of exactly ``packed_bytes(n, bits)`` bytes (ValueError
    otherwise). Returns a 1-D tensor of n codes, dtype uint8 (bits <= 8), int32 (<= 31) or
    int64 (32).
    """
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 1:
        raise TypeError("data must be a 1-D torch.uint8 tensor")
    nbytes = packed_bytes(n, bits)
    if data.numel() != nbytes:
        raise ValueError(f"data holds {data.numel()} bytes; {n} codes of {bits} bits pack into "
                         f"{nbytes}")
    mask = (1 << bits) - 1
    plan = _plan(bits)
    if plan is None:
        shifts = torch.arange(8, device=data.device, dtype=torch.uint8)
        stream = ((data[:, None] >> shifts) & 1).reshape(-1)[: n * bits].to(torch.int64)
        weights = torch.tensor([1 << j for j in range(bits)], dtype=torch.int64,
                               device=data.device)
        return (stream.view(n, bits) * weights).sum(1).to(_result_dtype(bits))
    g, gb, wdt = plan
    groups = -(-n // g)
    d = F.pad(data, (0, groups * gb - nbytes)).view(groups, gb)
    word = d[:, 0].to(wdt)
    for i in range(1, gb):
        word |= d[:, i].to(wdt) << (8 * i)
    c = torch.stack([(word >> (bits * j)) & mask for j in range(g)], 1)
    return c.reshape(-1)[:n].to(_result_dtype(bits))
