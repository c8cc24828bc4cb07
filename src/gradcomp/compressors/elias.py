"""Elias gamma and omega (recursive) integer codes, vectorised (QSGD's encoding).

QSGD (Alistarh et al., "Communication vs. Convergence", sublinear theorem) sends the gaps
between non-zero coordinates and the quantization levels as Elias recursive integer codes.
Both codes here map an integer ``v >= 1`` to a prefix-free bit string:

* gamma: ``L = floor(log2 v)`` zeros, then the ``L + 1`` binary digits of ``v`` (MSB first);
  length ``2 L + 1``.
* omega (recursive): the binary digits of ``v``, preceded recursively by the code of
  ``bitlength(v) - 1`` while that is > 1, terminated by a single 0; ``1`` codes as ``"0"``.

Bits are numpy ``uint8`` arrays holding 0/1 (one element per bit, MSB first); ``pack_bits`` /
``unpack_bits`` convert to and from bytes. Encoding is a handful of array passes (no Python
loop over values). Decoding is vectorised too although the stream is sequential: every bit
position is decoded speculatively as if a code started there (a bounded number of array
passes), which gives a "next code start" map; the chain of code starts from the stream's first
bit is then followed by pointer doubling (``O(N log count)`` array work).

Values must lie in ``[1, MAX_VALUE]`` (``2**57 - 1``, the widest field one 64-bit window read
covers); 0, negatives and larger values raise ``ValueError``.

Malformed input: the decoding functions (``elias_decode``, ``unpack_bits``, ``read_uint``)
raise ``TypeError`` for an argument of the wrong type (a float count, a float bit array) and
``ValueError`` - never another exception - for any malformed content: bits other than 0/1, a
count or position the stream cannot hold, a truncated stream, a malformed code (e.g. a run of
zeros longer than any valid code). Memory stays linear in the input: every code takes at least
one bit, so a count larger than the remaining bits is refused before anything is allocated,
and decoding ``N`` bits allocates about 100 N bytes of temporaries. A stream cut at a code
boundary, or with bits flipped into other valid codes, decodes without error: these codes carry
no checksum (a container format such as QSGD's stream adds one).
"""

from __future__ import annotations

import numpy as np

from gradcomp.numerics._checks import require_choice

__all__ = [
    "CODES",
    "MAX_VALUE",
    "code_lengths",
    "elias_decode",
    "elias_encode",
    "emit_fields",
    "pack_bits",
    "read_uint",
    "unpack_bits",
]

CODES = ("gamma", "omega")
MAX_VALUE = (1 << 57) - 1
_MAX_WIDTH = 57  # bits one unaligned 64-bit window read can return (64 - 7 bit offset)
_OMEGA_GROUPS = 6  # v < 2**57 needs at most 4 groups (v, 56, 5, 2); 6 leaves a margin


def _as_values(values) -> np.ndarray:
    v = np.asarray(values)
    if v.dtype.kind not in "iu":
        raise TypeError(f"values must be an integer array, got dtype {v.dtype}")
    v = v.astype(np.int64, copy=False).reshape(-1)
    if v.size and (int(v.min()) < 1 or int(v.max()) > MAX_VALUE):
        raise ValueError(
            f"values must lie in [1, {MAX_VALUE}] (Elias codes positive integers); "
            f"got min {int(v.min())}, max {int(v.max())}"
        )
    return v


def _bit_length(v: np.ndarray) -> np.ndarray:
    """bitlength of non-negative int64 values (0 -> 0), exact.

    ``frexp`` of the float64 value gives it in one pass; above 2**53 the conversion may round
    up to the next power of two, which the shift test undoes (rounding never goes below one).
    """
    v = np.asarray(v, dtype=np.int64)
    e = np.frexp(v.astype(np.float64))[1].astype(np.int64)
    return e - ((e > 0) & ((v >> np.maximum(e - 1, 0)) == 0))


def emit_fields(vals: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Concatenate the ``widths[i]`` low bits of ``vals[i]`` (MSB first) into one bit array.

    Zero-width fields emit nothing. ``vals`` are non-negative int64 (a value wider than its field
    is truncated to its low bits); widths in [0, 64]. Raises ValueError otherwise (or when the
    two arrays differ in length), TypeError for non-integer arrays.
    """
    vals = _int_array(vals, "vals")
    widths = _int_array(widths, "widths")
    if vals.size != widths.size:
        raise ValueError(f"vals and widths must have the same length, got {vals.size} and "
                         f"{widths.size}")
    if vals.size and (int(vals.min()) < 0 or int(widths.min()) < 0 or int(widths.max()) > 64):
        raise ValueError("vals must be >= 0 and widths in [0, 64]")
    total = int(widths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.uint8)
    field = np.repeat(np.arange(vals.size), widths)
    starts = np.cumsum(widths) - widths
    j = np.arange(total, dtype=np.int64) - starts[field]
    return ((vals[field] >> (widths[field] - 1 - j)) & 1).astype(np.uint8)


def code_lengths(values, code: str = "omega") -> np.ndarray:
    """Length in bits of the Elias ``code`` of each value (int64 array)."""
    require_choice(code, "code", CODES)
    v = _as_values(values)
    if code == "gamma":
        return 2 * (_bit_length(v) - 1) + 1
    total = np.ones_like(v)  # the terminating 0
    g = v
    for _ in range(_OMEGA_GROUPS):
        bl = _bit_length(g)
        total += np.where(g > 1, bl, 0)
        g = np.where(g > 1, bl - 1, 0)
    return total


def elias_encode(values, code: str = "omega") -> np.ndarray:
    """Encode positive integers with Elias ``code`` ("gamma" or "omega") into one bit array.

    Args:
        values: integer array-like (any shape, flattened), each in [1, MAX_VALUE].
        code: "gamma" or "omega" (recursive).
    Returns:
        numpy uint8 array of 0/1 bits, the codes concatenated in order.
    Raises ValueError for a value outside [1, MAX_VALUE], TypeError for non-integer input.
    """
    require_choice(code, "code", CODES)
    v = _as_values(values)
    if v.size == 0:
        return np.zeros(0, dtype=np.uint8)
    bl = _bit_length(v)
    if code == "gamma":
        # fields per value: (0, L) zeros then (v, L + 1) digits
        vals = np.stack([np.zeros_like(v), v], axis=1)
        widths = np.stack([bl - 1, bl], axis=1)
        return emit_fields(vals.reshape(-1), widths.reshape(-1))
    # omega: groups g0 = v, g_{i+1} = bitlength(g_i) - 1 while g_i > 1; emitted deepest first
    groups, gw = [], []
    g = v
    for _ in range(_OMEGA_GROUPS):
        b = _bit_length(g)
        groups.append(np.where(g > 1, g, 0))
        gw.append(np.where(g > 1, b, 0))
        g = np.where(g > 1, b - 1, 0)
    if np.any(g > 1):  # cannot happen below MAX_VALUE; guards a future widening of the range
        raise ValueError("value needs more omega groups than supported")
    vals = np.stack(groups[::-1] + [np.zeros_like(v)], axis=1)
    widths = np.stack(gw[::-1] + [np.ones_like(v)], axis=1)
    return emit_fields(vals.reshape(-1), widths.reshape(-1))


def _int_array(a, name: str) -> np.ndarray:
    """``a`` as a flat int64 array; TypeError unless it holds integers (or bools)."""
    arr = np.asarray(a)
    if arr.dtype.kind not in "biu":
        raise TypeError(f"{name} must be an integer array, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{name} holds values above {np.iinfo(np.int64).max}")
    return arr.astype(np.int64, copy=False).reshape(-1)


def _as_bits(bits, name: str = "bits") -> np.ndarray:
    """``bits`` as a flat uint8 0/1 array; TypeError for a non-integer array, ValueError for
    any element other than 0 and 1."""
    arr = np.asarray(bits)
    if arr.dtype.kind not in "biu":
        raise TypeError(f"{name} must be an integer (0/1) array, got dtype {arr.dtype}")
    arr = arr.reshape(-1)
    if arr.dtype != np.uint8 and arr.dtype != np.bool_:
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 1):
            raise ValueError(f"{name} must hold only 0 and 1")
        return arr.astype(np.uint8)
    if arr.dtype == np.bool_:
        return arr.view(np.uint8)
    if arr.size and int(arr.max()) > 1:
        raise ValueError(f"{name} must hold only 0 and 1, got {int(arr.max())}")
    return arr


def _as_index(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return int(value)


def pack_bits(bits: np.ndarray) -> tuple[np.ndarray, int]:
    """Pack a 0/1 uint8 bit array into bytes (MSB first, zero padded); returns (bytes, nbits).

    Raises ValueError for elements other than 0/1, TypeError for a non-integer array.
    """
    bits = _as_bits(bits)
    return np.packbits(bits), int(bits.size)


def unpack_bits(packed: np.ndarray, nbits: int) -> np.ndarray:
    """Inverse of ``pack_bits``: the first ``nbits`` bits of ``packed`` as a 0/1 uint8 array.

    ``packed`` is a uint8 array (or bytes); raises ValueError when ``nbits`` lies outside
    ``[0, 8 * len(packed)]`` or an element is outside [0, 255], TypeError for a non-integer
    ``nbits`` or array.
    """
    if isinstance(packed, (bytes, bytearray, memoryview)):
        packed = np.frombuffer(packed, dtype=np.uint8)
    arr = np.asarray(packed)
    if arr.dtype.kind not in "biu":
        raise TypeError(f"packed must be a uint8 array or bytes, got dtype {arr.dtype}")
    arr = arr.reshape(-1)
    if arr.dtype != np.uint8:
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 255):
            raise ValueError("packed must hold bytes (values in [0, 255])")
        arr = arr.astype(np.uint8)
    nbits = _as_index(nbits, "nbits")
    if not 0 <= nbits <= 8 * arr.size:
        raise ValueError(f"nbits must be in [0, {8 * arr.size}], got {nbits}")
    return np.unpackbits(arr, count=nbits)


class _Windows:
    """Unaligned reads of up to 57 bits at any bit position (one uint64 window per byte)."""

    def __init__(self, bits: np.ndarray):
        self.n = bits.size
        by = np.packbits(np.concatenate([bits, np.zeros(72, dtype=np.uint8)]))
        # the big-endian 64-bit word starting at every byte: overlapping views, one copy
        self.words = np.ndarray((by.size - 8,), dtype=">u8", buffer=by, strides=(1,)).astype(
            np.uint64)

    def read(self, pos: np.ndarray, width: np.ndarray) -> np.ndarray:
        """Unsigned value of bits [pos, pos + width) (width in [1, 57]; zeros past the end)."""
        pos = pos.astype(np.int64)
        w = self.words[pos >> 3] << (pos & 7).astype(np.uint64)
        return (w >> (64 - width).astype(np.uint64)).astype(np.int64)


def read_uint(bits: np.ndarray, pos: int, width: int) -> int:
    """Unsigned integer stored in ``bits[pos:pos + width]`` (MSB first).

    Raises ValueError when the field does not lie inside ``bits`` or is wider than 64 bits (a
    header field, not a payload), TypeError for non-integer ``pos`` / ``width``.
    """
    bits = _as_bits(bits)
    pos, width = _as_index(pos, "pos"), _as_index(width, "width")
    if width > 64:
        raise ValueError(f"width must be in [0, 64], got {width}")
    if pos < 0 or width < 0 or pos + width > bits.size:
        raise ValueError(
            f"truncated stream: field of {width} bits at bit {pos} exceeds length {bits.size}"
        )
    if width == 0:
        return 0
    seg = bits[pos : pos + width].astype(np.int64)
    # fixed-width header fields only (<= 64 bits): Python int avoids int64 overflow
    return int("".join("1" if b else "0" for b in seg.tolist()), 2)


def _speculative(bits: np.ndarray, start: int, code: str):
    """Decode a code at every position >= start; returns (end, value, valid) arrays."""
    n = bits.size
    pos = np.arange(start, n, dtype=np.int64)
    win = _Windows(bits)
    padded = np.concatenate([bits, np.zeros(1, dtype=np.uint8)])
    if code == "gamma":
        ones = np.flatnonzero(bits)
        if ones.size == 0:  # no code can end: every position runs into the end of the stream
            nxt = np.full_like(pos, n)
        else:
            k = np.searchsorted(ones, pos)
            nxt = np.where(k < ones.size, ones[np.minimum(k, ones.size - 1)], n)
        z = nxt - pos
        end = pos + 2 * z + 1
        valid = (z < _MAX_WIDTH) & (end <= n)
        width = np.where(valid, z + 1, 1)
        value = win.read(np.where(valid, pos + z, 0), width)
        return end, value, valid
    cur = pos.copy()
    val = np.ones_like(pos)
    done = np.zeros(pos.size, dtype=bool)
    valid = np.ones(pos.size, dtype=bool)
    end = np.zeros_like(pos)
    for _ in range(_OMEGA_GROUPS + 1):
        active = ~done & valid
        if not active.any():
            break
        valid &= ~(active & (cur >= n))
        active &= valid
        bit = padded[np.minimum(cur, n)]
        stop = active & (bit == 0)
        end = np.where(stop, cur + 1, end)
        done |= stop
        go = active & (bit == 1)
        width = val + 1
        ok = go & (width <= _MAX_WIDTH) & (cur + width <= n)
        valid &= ~(go & ~ok)
        m = win.read(np.where(ok, cur, 0), np.where(ok, width, 1))
        val = np.where(ok, m, val)
        cur = np.where(ok, cur + width, cur)
    valid &= done
    return end, val, valid


def elias_decode(bits, count: int, code: str = "omega", start: int = 0):
    """Decode ``count`` consecutive Elias codes from ``bits`` starting at bit ``start``.

    Args:
        bits: 0/1 uint8 array (as from ``elias_encode`` / ``unpack_bits``).
        count: number of values to decode (>= 0).
        code: "gamma" or "omega"; must match the encoder.
        start: bit offset of the first code.
    Returns:
        (values int64 array of length ``count``, end) where ``end`` is the bit just after the
        last code (so a caller can read the next section).
    Raises ValueError when the stream ends before ``count`` complete codes (truncated), a code
    is malformed (corrupted: e.g. a run of zeros longer than any valid code), ``bits`` holds
    anything but 0/1, ``count`` < 0 or ``start`` lies outside ``[0, len(bits)]``; TypeError
    for a non-integer ``count`` / ``start`` / bit array. Every decoded value lies in
    ``[1, MAX_VALUE]``. Memory: O(len(bits) - start), whatever ``count`` says.
    """
    require_choice(code, "code", CODES)
    bits = _as_bits(bits)
    n = bits.size
    count, start = _as_index(count, "count"), _as_index(start, "start")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if not 0 <= start <= n:
        raise ValueError(f"start must be in [0, {n}], got {start}")
    if count == 0:
        return np.zeros(0, dtype=np.int64), start
    if count > n - start:  # every code takes at least one bit
        raise ValueError(f"truncated Elias stream: {count} codes announced, only {n - start} "
                         f"bits left")
    end, val, valid = _speculative(bits, start, code)
    bad, fin = n + 1, n  # sink states: malformed code, end of stream
    nxt = np.empty(n - start + 2, dtype=np.int64)
    nxt[: n - start] = np.where(valid, end - start, bad - start)
    nxt[n - start] = fin - start
    nxt[n - start + 1] = bad - start
    starts = np.zeros(1, dtype=np.int64)
    jump = nxt
    while starts.size < count:  # pointer doubling: starts of codes 0..2^k-1
        starts = np.concatenate([starts, jump[starts]])
        jump = jump[jump]
    starts = starts[:count]
    if np.any(starts >= n - start):
        got = int(np.argmax(starts >= n - start))
        kind = "truncated" if starts[got] == n - start else "corrupted"
        raise ValueError(f"{kind} Elias stream: decoded {got} of {count} codes")
    if not valid[starts].all():
        got = int(np.argmin(valid[starts]))
        raise ValueError(f"corrupted or truncated Elias stream: code {got} of {count} malformed")
    return val[starts], int(end[starts[-1]])
