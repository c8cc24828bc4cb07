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

    magic b"GCPE" | version u8 | dtype code u8 | ndim u8 | reserved u8 (0) | numel u64
    | counts 4 x u64 | threshold f64 | ANS words u64 | escape bytes u64 | dims ndim x u64
    | ANS stream (u32 words) | escape payload | CRC-32 of everything before it (u32)

Every element costs bits (version 2). A plain ANS coder starts from state 0, where a symbol
whose cumulative frequency is 0 leaves the state at 0: a tensor of zeros would cost no bits
at all, so no stream length could bound the element count. Two rules make the element count
provable from the stream length:

* the coder starts from a fixed two-word seed (state >= 2**32) that the decoder must find
  again, exactly, after the last symbol (an end-of-stream check as well);
* every symbol's model probability is at least ``2**-7`` before normalisation, so the most
  likely symbol has probability <= 1 / (1 + 3 * 2**-7) and costs >= 0.0334 bits. This costs
  a real stream at most 0.034 bits per element, and only when a symbol is rarer than 1/128.

From the state >= 2**32 invariant of the coder (32-bit words, 24-bit probabilities), one
encoding step multiplies the state by at least ``(1 / q) * (1 - 2**-8)`` and a word flush
loses at most ``log2(1 + 2**-8)`` bits, so symbol ``i`` of model probability ``q_i`` adds at
least ``-log2(q_i) - 2 log2(256 / 255)`` bits and ``32 * (words - 1) >= sum_i count_i * that``.
The decoder checks this before it allocates anything; it implies at most
``MAX_ELEMENTS_PER_WORD`` (1600) elements per 32-bit word, i.e. an output at most 1600 x (fp32)
or 3200 x (fp64) the stream's size (an all-zeros stream holds about 960 per word).

``decode_pruned`` raises ``ValueError`` (and only that, for any byte string) when the input is
not exactly what ``encode_pruned`` writes: a truncated, padded or corrupted string, or header
values the encoder never writes (unknown dtype code, non-zero reserved byte, NaN / infinite /
negative threshold or one not representable in the dtype, counts that disagree with the shape
or the payload sizes, more elements than the stream length allows, escaped values that the
encoder would have coded as a symbol or NaN). Decoding never reads past the header's stated
sizes and never loops on bad data.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from gradcomp.numerics._checks import require_float_tensor

__all__ = ["EncodingStats", "MAGIC", "MAX_ELEMENTS_PER_WORD", "VERSION", "decode_pruned",
           "encode_pruned", "encoding_stats"]

MAGIC = b"GCPE"
VERSION = 2
MAX_ELEMENTS_PER_WORD = 1600  # implied by the checked bound: 32 / (0.0334 - 0.0123) < 1520
_FIXED = struct.Struct("<4sBBBBQ4QdQQ")
_CRC = struct.Struct("<I")
_DTYPES = {1: torch.float16, 2: torch.bfloat16, 3: torch.float32, 4: torch.float64}
_CODES = {v: k for k, v in _DTYPES.items()}
_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16,
             torch.float32: torch.int32, torch.float64: torch.int64}
_NP_INT = {torch.int16: np.dtype("<i2"), torch.int32: np.dtype("<i4"),
           torch.int64: np.dtype("<i8")}
_SYMBOL_FLOOR = 2.0 ** -7
# initial coder state 2**32 + 0x9E3779B9 (the words as get_compressed lists them); the decoder
# must end on exactly these words
_ANS_SEED = (0x9E3779B9, 1)
# bits one encoding step can lose against -log2(q): rounding of the state (<= 2**-8 relative,
# state >= 2**32, q >= 2**-24) and one word flush (<= log2(1 + 2**-8)), plus 2**-10 for the
# 24-bit quantisation of the model (< 50 units of 2**-24 at probabilities >= 2**-8)
_STEP_LOSS = 2 * math.log2(256 / 255) + 2.0 ** -10
_MAX_DIM = (1 << 63) - 1


def _coder():
    # imported lazily: only the codec needs it, and importing gradcomp stays light
    import constriction  # submodules are attributes of the extension, not importable paths

    return constriction.stream.model.Categorical, constriction.stream.stack.AnsCoder


def _probabilities(counts) -> list[float]:
    """Model probabilities from the stored counts: each >= 2**-7 before normalisation."""
    n = max(sum(counts), 1)
    p = [max(c / n, _SYMBOL_FLOOR) for c in counts]
    z = sum(p)
    return [v / z for v in p]


def _model(counts):
    Categorical, _ = _coder()
    # perfect=False: the fast fixed-point quantisation; it is a deterministic function of the
    # stored counts, so the decoder rebuilds the identical model
    return Categorical(np.array(_probabilities(counts), dtype=np.float64), perfect=False)


def _min_stream_bits(counts) -> float:
    """Lower bound on the bits the coder must emit (beyond its seed) for these counts."""
    return sum(c * max(0.0, -math.log2(p) - _STEP_LOSS)
               for c, p in zip(counts, _probabilities(counts)) if c)


def _infer_threshold(flat: torch.Tensor) -> float:
    # only finite values can be the threshold; +-inf are escaped like any other value
    nz = flat[(flat != 0) & torch.isfinite(flat)].abs()
    if nz.numel() == 0:
        return 0.0  # nothing to code as +-a: every non-zero value is escaped
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
            An empty tensor is encoded too (header only).
        threshold: the pruning threshold a (float or 0-d tensor; rounded to x's dtype to
            nearest, ties to even, as ``stochastic_prune`` does). None infers it as the most
            frequent finite non-zero |x| (one sort of the tensor; 0 when there is none, which
            escapes every non-zero value). Values equal to +-a cost only their symbol.
    Raises ValueError if x contains NaN (a NaN gradient is a bug upstream, not data to keep),
    or the threshold is negative / non-finite or overflows to inf in x's dtype. Any other value
    (inf, huge, -0.0, subnormal) is escaped; -0.0 as the threshold means 0.
    """
    require_float_tensor(x, "x")
    if x.dtype not in _CODES:
        raise TypeError(f"x must have dtype one of {sorted(str(d) for d in _CODES)}, "
                        f"got {x.dtype}")
    flat = x.detach().reshape(-1).cpu()
    if bool(torch.isnan(flat).any()):
        raise ValueError("x contains NaN: the pruned-tensor codec refuses NaN input")
    if threshold is None:
        a_f = _infer_threshold(flat)
    else:
        a_f = float(threshold)
        if not math.isfinite(a_f) or a_f < 0:
            raise ValueError(f"threshold must be finite and >= 0 (the pruning threshold a), "
                             f"got {a_f!r}")
    a = torch.tensor(a_f + 0.0, dtype=torch.float64).to(x.dtype)  # + 0.0: -0.0 becomes +0.0
    if not bool(torch.isfinite(a)):
        raise ValueError(f"threshold {a_f!r} overflows to inf in {x.dtype} (largest finite "
                         f"{torch.finfo(x.dtype).max}); pass a smaller threshold")
    sym = _symbols(flat, a)
    counts = torch.bincount(sym.to(torch.int64), minlength=4).tolist()
    esc = flat[sym == 3].contiguous()
    esc_bytes = esc.view(_INT_VIEW[x.dtype]).numpy().astype(_NP_INT[_INT_VIEW[x.dtype]])
    esc_bytes = esc_bytes.tobytes()
    if flat.numel():
        _, AnsCoder = _coder()
        enc = AnsCoder(np.array(_ANS_SEED, dtype=np.uint32))
        enc.encode_reverse(sym.numpy(), _model(counts))
        words = enc.get_compressed().astype("<u4").tobytes()
    else:
        words = b""
    head = _FIXED.pack(MAGIC, VERSION, _CODES[x.dtype], x.dim(), 0, flat.numel(), *counts,
                       float(a), len(words) // 4, len(esc_bytes))
    dims = struct.pack(f"<{x.dim()}Q", *x.shape)
    body = head + dims + words + esc_bytes
    return body + _CRC.pack(zlib.crc32(body))


def _corrupt(msg: str) -> ValueError:
    return ValueError(f"corrupted pruned-tensor stream: {msg}")


def decode_pruned(data: bytes, device=None) -> torch.Tensor:
    """Decode ``encode_pruned`` output to a tensor of the original dtype and shape.

    Raises TypeError if ``data`` is not bytes-like. For every byte string that ``encode_pruned``
    cannot have written it raises ValueError (never another exception) naming the problem: a
    wrong magic or version, a truncated or padded string (sizes are checked against the header
    before anything is decoded), a checksum mismatch (corruption), or header values the encoder
    never writes (see the module docstring). Memory: the element count is checked against the
    stream length before any allocation (at most ``MAX_ELEMENTS_PER_WORD`` per ANS word), so the
    output and the temporaries stay within a fixed multiple of ``len(data)``.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < _FIXED.size + _CRC.size:
        raise ValueError(f"truncated: {len(data)} bytes, the header alone needs "
                         f"{_FIXED.size + _CRC.size}")
    magic, ver, code, ndim, reserved, n, c0, c1, c2, c3, a, n_words, n_esc = \
        _FIXED.unpack_from(data)
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
        raise _corrupt("CRC-32 mismatch")
    # the checksum matches: what follows refuses well-formed strings the encoder never writes
    if reserved != 0:
        raise _corrupt(f"reserved header byte is {reserved}, the encoder writes 0")
    if code not in _DTYPES:
        raise _corrupt(f"unknown dtype code {code} (known: {sorted(_DTYPES)})")
    dtype = _DTYPES[code]
    counts = [c0, c1, c2, c3]
    shape = struct.unpack_from(f"<{ndim}Q", data, _FIXED.size)
    if any(s > _MAX_DIM for s in shape):
        raise _corrupt(f"a dimension exceeds {_MAX_DIM}")
    if math.prod(shape) != n or sum(counts) != n:
        raise _corrupt(f"shape {shape}, numel {n} and symbol counts {counts} disagree")
    if not math.isfinite(a) or math.copysign(1.0, a) < 0:
        raise _corrupt(f"threshold {a!r}; the encoder writes a finite value >= +0.0")
    at = torch.tensor(a, dtype=torch.float64).to(dtype)
    if float(at) != a:
        raise _corrupt(f"threshold {a!r} is not representable in {dtype}")
    if a == 0 and (c1 or c2):
        raise _corrupt("+-a symbols with threshold 0")
    int_dtype = _NP_INT[_INT_VIEW[dtype]]
    if n_esc != c3 * int_dtype.itemsize:
        raise _corrupt("escape payload size disagrees with the escape count")
    if n == 0:
        if n_words:
            raise _corrupt("an empty tensor with a non-empty ANS stream")
        return _shaped(torch.zeros(0, dtype=dtype), shape, device)
    if n_words < len(_ANS_SEED) or 32 * (n_words - 1) < _min_stream_bits(counts):
        raise _corrupt(f"{n} elements with counts {counts} cannot fit in {n_words} ANS words")
    off = _FIXED.size + 8 * ndim
    words = np.frombuffer(data, dtype="<u4", count=n_words, offset=off).astype(np.uint32)
    _, AnsCoder = _coder()
    try:
        dec = AnsCoder(words)
        sym = dec.decode(_model(counts), n)
        rest = dec.get_compressed()
    except (ValueError, RuntimeError, OverflowError, TypeError) as e:  # constriction's refusals
        raise _corrupt(f"ANS stream rejected ({e})") from e
    if tuple(int(w) for w in rest) != _ANS_SEED:
        raise _corrupt("ANS stream does not end on the coder's seed")
    if np.bincount(sym, minlength=4)[:4].tolist() != counts or sym.size != n:
        raise _corrupt("decoded symbol counts disagree with the header")
    esc_np = np.frombuffer(data, dtype=int_dtype, count=c3, offset=off + 4 * n_words)
    esc = torch.from_numpy(esc_np.astype(int_dtype.newbyteorder("="))).view(dtype)
    # escapes are exactly the values the encoder could not code as a symbol
    if bool(torch.isnan(esc).any()):
        raise _corrupt("NaN among the escaped values (the encoder refuses NaN)")
    if bool((esc_np == 0).any()) or (a > 0 and bool((esc.abs() == at).any())):
        raise _corrupt("an escaped value is +0.0 or +-threshold (the encoder codes those "
                       "as symbols)")
    symt = torch.from_numpy(sym)
    out = torch.zeros(n, dtype=dtype)
    out[symt == 1] = at
    out[symt == 2] = -at
    out[symt == 3] = esc
    return _shaped(out, shape, device)


def _shaped(out: torch.Tensor, shape, device) -> torch.Tensor:
    try:
        out = out.view(shape)
    except RuntimeError as e:  # e.g. a zero-element shape torch cannot index
        raise _corrupt(f"shape {shape} is not a valid tensor shape ({e})") from e
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
