"""Fuzzing the decoders, fast subset (the long run is benchmarks/fuzz_decoders.py).

Property for every decoder and every input: it returns a well-formed result (equal to the
original when the input is an unmodified valid stream) or raises ValueError - never another
exception, never an allocation the input cannot justify. Hypothesis runs derandomized with a
bounded number of examples, so the subset is deterministic and takes seconds.
"""

import math
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradcomp.compressors.comm import QSGD
from gradcomp.compressors.elias import CODES, MAX_VALUE, elias_decode, elias_encode
from gradcomp.compressors.encoding import MAGIC, VERSION, decode_pruned, encode_pruned

FUZZ = settings(derandomize=True, max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
_HEAD = struct.Struct("<4sBBBBQ4QdQQ")
# (offset, format) of each fixed header field after magic and version
_FIELDS = [(5, "<B"), (6, "<B"), (7, "<B"), (8, "<Q"), (16, "<Q"), (24, "<Q"), (32, "<Q"),
           (40, "<Q"), (48, "<d"), (56, "<Q"), (64, "<Q")]
_DTYPE_OF = {1: torch.float16, 2: torch.bfloat16, 3: torch.float32, 4: torch.float64}
_EXTREME_INTS = st.sampled_from([0, 1, 2, 255, 256, 2**32, 10**12, 2**63 - 1, 2**64 - 1])
_THRESHOLDS = st.sampled_from([math.nan, math.inf, -math.inf, -1.0, -0.0, 0.0, 1e300, 3.4e38,
                               0.1, 0.25])


def _bits_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and bool(
        (a.reshape(-1).view(torch.uint8) == b.reshape(-1).view(torch.uint8)).all())


def _corpus():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, generator=g)
    pruned = torch.where(x.abs() < 1, 0.25 * torch.sign(x) * (torch.rand(200, generator=g) < .3),
                         x)
    cases = [
        (pruned, 0.25), (pruned.to(torch.float16).view(10, 20), None),
        (pruned.to(torch.bfloat16), 0.25), (pruned.double(), None), (torch.zeros(50), None),
        (torch.tensor([math.inf, -0.0, 1e-40, -math.inf, 3.0, 3.0]), None),
        (torch.empty(0, 4), 0.25), (torch.tensor(1.5), None),
    ]
    return [(encode_pruned(t, a), t) for t, a in cases]


_STREAMS = _corpus()
_WHICH = st.integers(0, len(_STREAMS) - 1)


def _decode_or_value_error(data):
    try:
        return decode_pruned(data)
    except ValueError:
        return None


def _crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def test_valid_streams_round_trip():
    for data, x in _STREAMS:
        assert _bits_equal(decode_pruned(data), x)


@FUZZ
@given(st.binary(max_size=200), st.booleans())
def test_pruned_random_bytes(raw, with_magic):
    data = (MAGIC + bytes([VERSION]) + raw) if with_magic else raw
    with pytest.raises(ValueError):  # a random string never carries a matching CRC-32 here
        decode_pruned(data)


@FUZZ
@given(_WHICH, st.integers(0, 10**9), st.integers(1, 3))
def test_pruned_bit_flips_are_detected(which, where, nflips):
    data, _ = _STREAMS[which]
    buf = bytearray(data)
    positions = {(where * (k + 1) * 7919) % (8 * len(buf)) for k in range(nflips)}
    for p in positions:  # CRC-32 detects every error of up to 3 bits at these lengths
        buf[p >> 3] ^= 0x80 >> (p & 7)
    with pytest.raises(ValueError):
        decode_pruned(bytes(buf))


@FUZZ
@given(_WHICH, st.integers(0, 10**9), st.binary(min_size=1, max_size=9))
def test_pruned_truncated_or_extended(which, cut, extra):
    data, _ = _STREAMS[which]
    with pytest.raises(ValueError, match="truncated"):
        decode_pruned(data[: cut % len(data)])
    with pytest.raises(ValueError, match="trailing"):
        decode_pruned(data + extra)


@FUZZ
@given(_WHICH, st.integers(0, len(_FIELDS) - 1), _EXTREME_INTS, _THRESHOLDS,
       st.integers(-2, 2))
def test_pruned_header_mutation_with_valid_crc(which, field, big, threshold, delta):
    data, x = _STREAMS[which]
    off, fmt = _FIELDS[field]
    body = bytearray(data[:-4])
    if fmt == "<d":
        value = threshold
    elif fmt == "<B":
        value = (body[off] + delta) % 256 if delta else big % 256
    else:
        old = struct.unpack_from(fmt, body, off)[0]
        value = (old + delta) % 2**64 if delta else big
    struct.pack_into(fmt, body, off, value)
    out = _decode_or_value_error(_crc(bytes(body)))
    if out is not None:  # a forged but consistent header (e.g. float16 read as bfloat16)
        _, _, code, _, _, n, *_ = _HEAD.unpack_from(body)
        assert out.dtype == _DTYPE_OF[code] and out.numel() == n
        # one field alone cannot change the element count: shape, numel and counts must agree
        assert out.numel() == x.numel()


@FUZZ
@given(_WHICH, st.integers(0, 10**9), st.integers(0, 255))
def test_pruned_payload_mutation_with_valid_crc(which, where, byte):
    data, x = _STREAMS[which]
    body = bytearray(data[:-4])
    if len(body) == _HEAD.size:
        return
    body[_HEAD.size + where % (len(body) - _HEAD.size)] = byte
    out = _decode_or_value_error(_crc(bytes(body)))
    if out is not None:  # the CRC was forged: a different tensor is possible, not a crash
        assert out.dtype == x.dtype and out.numel() == x.numel()


def test_pruned_huge_announcement_refused():
    n = 10**12
    body = _HEAD.pack(MAGIC, VERSION, 3, 1, 0, n, n, 0, 0, 0, 1.0, 2, 0) + struct.pack(
        "<QII", n, 0x9E3779B9, 1)
    with pytest.raises(ValueError, match="cannot fit"):
        decode_pruned(_crc(body))


# ---- Elias -------------------------------------------------------------------------------

_VALUES = st.lists(st.one_of(st.integers(1, 40), st.integers(1, MAX_VALUE)), min_size=1,
                   max_size=30)


def _check_elias(bits, count, code, start):
    """Decode; on success the values must re-encode to exactly the consumed bits."""
    try:
        vals, end = elias_decode(bits, count, code, start)
    except ValueError:
        return None
    assert vals.dtype == np.int64 and vals.size == count and start <= end <= bits.size
    if count:
        assert 1 <= vals.min() and vals.max() <= MAX_VALUE
    assert np.array_equal(elias_encode(vals, code), bits[start:end])  # unique parse
    return vals


@FUZZ
@given(_VALUES, st.sampled_from(CODES), st.integers(0, 8))
def test_elias_round_trip_with_offset(values, code, start):
    bits = np.concatenate([np.ones(start, np.uint8), elias_encode(values, code)])
    assert _check_elias(bits, len(values), code, start).tolist() == values


@FUZZ
@given(_VALUES, st.sampled_from(CODES), st.lists(st.integers(0, 10**6), min_size=1,
                                                   max_size=3),
       st.integers(0, 10**6), st.sampled_from([0, 1, -1, 2, 10**12, 2**62]))
def test_elias_mutated_streams(values, code, flips, cut, dcount):
    bits = elias_encode(values, code)
    bits[[f % bits.size for f in flips]] ^= 1
    bits = bits[: bits.size - cut % 4]
    count = len(values) + dcount if dcount != 1 else 0
    if count < 0:
        with pytest.raises(ValueError):
            elias_decode(bits, count, code)
    else:
        _check_elias(bits, count, code, 0)


@FUZZ
@given(st.lists(st.integers(0, 1), max_size=300), st.integers(0, 400), st.integers(-2, 310),
       st.sampled_from(CODES))
def test_elias_random_bits_and_positions(bits, count, start, code):
    bits = np.array(bits, np.uint8)
    if not 0 <= start <= bits.size:
        with pytest.raises(ValueError, match="start"):
            elias_decode(bits, count, code, start)
    else:
        _check_elias(bits, count, code, start)


def test_elias_huge_count_refused():
    with pytest.raises(ValueError, match="truncated"):
        elias_decode(np.ones(320, np.uint8), 10**12, "gamma")


# ---- QSGD stream (public API: quantize / encode / decode) ---------------------------------

def _qsgd_corpus():
    out = []
    for i, (s, d, code) in enumerate([(4, 8, "omega"), (127, 32, "gamma"), (300, 16, "omega")]):
        qs = QSGD(levels=s, bucket_size=d, code=code, bitstream=True)
        g = torch.Generator().manual_seed(i)
        x = torch.randn(100, generator=g) * (torch.rand(100, generator=g) < 0.5)
        norms, q = qs.quantize(x, g)
        out.append((qs, np.asarray(qs.encode(norms, q, x.numel()), np.uint8), (norms, q, 100)))
    return out


_QSGD = _qsgd_corpus()


def _check_qsgd(qs, data):
    try:
        norms, q, n = qs.decode(data)
    except ValueError:
        return None
    assert q.numel() == norms.numel() * qs.bucket_size and int(n) <= q.numel()
    assert q.numel() == 0 or int(q.abs().max()) <= qs.levels
    return norms, q, n


def test_qsgd_valid_streams_round_trip():
    for qs, data, (norms, q, n) in _QSGD:
        dn, dq, dnum = qs.decode(data)
        assert torch.equal(dn, norms) and torch.equal(dq.reshape(-1), q.reshape(-1)) and dnum == n


@FUZZ
@given(st.integers(0, len(_QSGD) - 1), st.integers(0, 10**9), st.integers(1, 4),
       st.integers(0, 10**9), st.binary(max_size=6))
def test_qsgd_mutated_streams(which, where, nflips, cut, extra):
    qs, data, _ = _QSGD[which]
    buf = bytearray(data.tobytes())
    for k in range(nflips):
        p = (where * (k + 1) * 7919) % (8 * len(buf))
        buf[p >> 3] ^= 0x80 >> (p & 7)
    mutated = bytes(buf[: len(buf) - cut % 3]) + extra
    _check_qsgd(qs, np.frombuffer(mutated, np.uint8))


@FUZZ
@given(st.binary(max_size=120), st.integers(0, len(_QSGD) - 1))
def test_qsgd_random_bytes(raw, which):
    _check_qsgd(_QSGD[which][0], np.frombuffer(raw, np.uint8))
