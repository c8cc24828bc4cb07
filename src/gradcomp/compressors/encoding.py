"""Codec for stochastically pruned tensors (design for the paper's missing appendix A.10).

After Eq. 5 almost every element is 0 or +-a. Each element becomes one symbol

    0: +0.0     1: +a     2: -a     3: escape (any other value, stored verbatim)

and the symbol stream goes through an asymmetric-numeral-systems (ANS) coder with the
empirical symbol frequencies as a static categorical model (``constriction``, a maintained
Rust library with Python bindings: near-optimal ANS, ~1e8 symbols/s, deterministic models
from the stored counts, so encoder and decoder agree exactly). Escaped values are stored as
the raw bits of the input dtype, so decoding is bit-exact (-0.0, +-inf and subnormals
included). Their size bound is 16/32/64 bits each; storing them in a narrower FP format is
left for when ``gradcomp.numerics.formats`` exists.

Layout (little endian)::

    magic b"GCPE" | version u8 | dtype code u8 | ndim u8 | reserved u8 | numel u64
    | counts 4 x u64 | threshold f64 | ANS words u64 | escape bytes u64 | dims ndim x u64
    | ANS stream (u32 words) | escape payload | CRC-32 of everything before it (u32)

A truncated, padded or corrupted byte string raises ``ValueError`` saying which; decoding
never reads past the header's stated sizes and never loops on bad data.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from gradcomp.numerics._checks import require_float_tensor

__all__ = ["EncodingStats", "MAGIC", "VERSION", "decode_pruned", "encode_pruned",
           "encoding_stats"]

MAGIC = b"GCPE"
VERSION = 1
_FIXED = struct.Struct("<4sBBBBQ4QdQQ")
_CRC = struct.Struct("<I")
_DTYPES = {1: torch.float16, 2: torch.bfloat16, 3: torch.float32, 4: torch.float64}
_CODES = {v: k for k, v in _DTYPES.items()}
_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16,
             torch.float32: torch.int32, torch.float64: torch.int64}


def _coder():
    # imported lazily: only the codec needs it, and importing gradcomp stays light
    import constriction  # submodules are attributes of the extension, not importable paths

    return constriction.stream.model.Categorical, constriction.stream.stack.AnsCoder


def _model(counts):
    Categorical, _ = _coder()
    p = np.asarray(counts, dtype=np.float64)
    # perfect=False: the fast fixed-point quantisation; it is a deterministic function of the
    # stored counts, so the decoder rebuilds the identical model
    return Categorical(p / max(p.sum(), 1.0), perfect=False)


def _infer_threshold(flat: torch.Tensor) -> float:
    nz = flat[flat != 0].abs()
    if nz.numel() == 0:
        return 0.0
    vals, cnt = torch.unique(nz, return_counts=True)
    return float(vals[cnt.argmax()])


def _symbols(flat: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    pos_zero = (flat == 0) & ~torch.signbit(flat)
    sym = torch.full(flat.shape, 3, dtype=torch.int32, device=flat.device)
    if bool(a > 0):
        sym = torch.where(flat == a, 1, sym)
        sym = torch.where(flat == -a, 2, sym)
    return torch.where(pos_zero, 0, sym).to(torch.int32)


def encode_pruned(x: torch.Tensor, threshold=None) -> bytes:
    """Encode a pruned tensor into bytes; ``decode_pruned`` restores it bit for bit.

    Args:
        x: float16/bfloat16/float32/float64 tensor, any shape and device (copied to the host).
        threshold: the pruning threshold a (float or 0-d tensor; rounded to x's dtype, as
            ``stochastic_prune`` does). None infers it as the most frequent non-zero |x|
            (one sort of the tensor). Values equal to +-a cost only their symbol.
    Raises ValueError if x contains NaN (a NaN gradient is a bug upstream, not data to keep)
    or the threshold is negative / non-finite. Any other value (inf, huge, -0.0) is escaped.
    """
    require_float_tensor(x, "x")
    if x.dtype not in _CODES:
        raise TypeError(f"x must have dtype one of {sorted(str(d) for d in _CODES)}, "
                        f"got {x.dtype}")
    flat = x.detach().reshape(-1).cpu()
    if bool(torch.isnan(flat).any()):
        raise ValueError("x contains NaN: the pruned-tensor codec refuses NaN input")
    a_f = _infer_threshold(flat) if threshold is None else float(threshold)
    if not math.isfinite(a_f) or a_f < 0:
        raise ValueError(f"threshold must be finite and >= 0, got {threshold!r}")
    a = torch.tensor(a_f, dtype=torch.float64).to(x.dtype)
    sym = _symbols(flat, a)
    counts = torch.bincount(sym.to(torch.int64), minlength=4).tolist()
    esc = flat[sym == 3].contiguous()
    esc_bytes = esc.view(_INT_VIEW[x.dtype]).numpy().tobytes()
    if flat.numel():
        _, AnsCoder = _coder()
        enc = AnsCoder()
        enc.encode_reverse(sym.numpy(), _model(counts))
        words = enc.get_compressed().astype("<u4").tobytes()
    else:
        words = b""
    head = _FIXED.pack(MAGIC, VERSION, _CODES[x.dtype], x.dim(), 0, flat.numel(), *counts,
                       float(a), len(words) // 4, len(esc_bytes))
    dims = struct.pack(f"<{x.dim()}Q", *x.shape)
    body = head + dims + words + esc_bytes
    return body + _CRC.pack(zlib.crc32(body))


def decode_pruned(data: bytes, device=None) -> torch.Tensor:
    """Decode ``encode_pruned`` output to a tensor of the original dtype and shape.

    Raises ValueError naming the problem for: a wrong magic or version, a truncated or padded
    string (sizes are checked against the header before anything is decoded), a checksum
    mismatch (corruption), or symbol counts that disagree with the header.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < _FIXED.size + _CRC.size:
        raise ValueError(f"truncated: {len(data)} bytes, the header alone needs "
                         f"{_FIXED.size + _CRC.size}")
    magic, ver, code, ndim, _, n, c0, c1, c2, c3, a, n_words, n_esc = _FIXED.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"not a gradcomp pruned-tensor stream (magic {magic!r}, expected "
                         f"{MAGIC!r})")
    if ver != VERSION:
        raise ValueError(f"unsupported version {ver} (this reader knows {VERSION})")
    expected = _FIXED.size + 8 * ndim + 4 * n_words + n_esc + _CRC.size
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "trailing bytes"
        raise ValueError(f"{what}: {len(data)} bytes, the header announces {expected}")
    body, (crc,) = data[:-_CRC.size], _CRC.unpack_from(data, len(data) - _CRC.size)
    if zlib.crc32(body) != crc:
        raise ValueError("corrupted: CRC-32 mismatch")
    if code not in _DTYPES:
        raise ValueError(f"corrupted: unknown dtype code {code}")
    dtype = _DTYPES[code]
    counts = [c0, c1, c2, c3]
    shape = struct.unpack_from(f"<{ndim}Q", data, _FIXED.size)
    if math.prod(shape) != n or sum(counts) != n:
        raise ValueError("corrupted: shape, numel and symbol counts disagree")
    itemsize = torch.empty((), dtype=dtype).element_size()
    if n_esc != c3 * itemsize:
        raise ValueError("corrupted: escape payload size disagrees with the escape count")
    off = _FIXED.size + 8 * ndim
    out = torch.zeros(n, dtype=dtype)
    if n:
        _, AnsCoder = _coder()
        words = np.frombuffer(data, dtype="<u4", count=n_words, offset=off).astype(np.uint32)
        sym = torch.from_numpy(AnsCoder(words).decode(_model(counts), n).astype(np.int64))
        if torch.bincount(sym, minlength=4)[:4].tolist() != counts:
            raise ValueError("corrupted: decoded symbol counts disagree with the header")
        at = torch.tensor(a, dtype=torch.float64).to(dtype)
        out = torch.where(sym == 1, at, out)
        out = torch.where(sym == 2, -at, out)
        esc_np = np.frombuffer(data, dtype=np.dtype(str(_INT_VIEW[dtype]).split(".")[1]),
                               count=c3, offset=off + 4 * n_words).copy()
        out[sym == 3] = torch.from_numpy(esc_np).view(dtype)
    out = out.view(shape)
    return out if device is None else out.to(device)


@dataclass(frozen=True)
class EncodingStats:
    """Size of ``encode_pruned`` output against the empirical bound.

    bound_bits: n * H(symbol frequencies) + escapes * bits per escaped value (the size of an
    ideal coder of this symbol model plus the verbatim payload, no header).
    overhead: bits / bound_bits - 1 (header, checksum and coder inefficiency).
    """

    numel: int
    bytes: int
    bits_per_element: float
    bound_bits_per_element: float
    symbol_entropy: float
    escape_fraction: float
    overhead: float


def encoding_stats(x: torch.Tensor, threshold=None) -> EncodingStats:
    """Encode ``x`` (see ``encode_pruned``) and compare its size with the entropy bound."""
    data = encode_pruned(x, threshold)
    counts = np.array(_FIXED.unpack_from(data)[6:10], dtype=np.float64)
    n = max(int(counts.sum()), 1)
    p = counts[counts > 0] / n
    h = float(-(p * np.log2(p)).sum())
    esc_bits = 8 * torch.empty((), dtype=x.dtype).element_size()
    bound = n * h + counts[3] * esc_bits
    bits = 8 * len(data)
    return EncodingStats(numel=int(counts.sum()), bytes=len(data), bits_per_element=bits / n,
                         bound_bits_per_element=float(bound / n), symbol_entropy=h,
                         escape_fraction=float(counts[3] / n),
                         overhead=float(bits / bound - 1) if bound > 0 else math.inf)
