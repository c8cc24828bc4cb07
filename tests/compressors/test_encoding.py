"""Pruned-tensor codec: exact round trips, size against the entropy bound, bad input."""

import math
import struct
import zlib

import pytest
import torch

from gradcomp.compressors.encoding import decode_pruned, encode_pruned, encoding_stats
from gradcomp.compressors.pruning import stochastic_prune
from gradcomp.numerics.sparsity import lognormal_threshold


@pytest.fixture(autouse=True)
def eager(monkeypatch):
    monkeypatch.setenv("GRADCOMP_COMPILE", "0")


def _bits_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and bool(
        (a.reshape(-1).view(torch.uint8) == b.reshape(-1).view(torch.uint8)).all())


def _pruned(n, sparsity, zero_fraction, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(-10 + 2 * torch.randn(n, generator=g)) * torch.sign(torch.randn(n, generator=g))
    x[torch.rand(n, generator=g) < zero_fraction] = 0
    a = lognormal_threshold(sparsity, -10.0, 2.0, zero_fraction)
    return stochastic_prune(x.to(dtype), a, g), a


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_round_trip_random(dtype):
    y, a = _pruned(20_000, 0.8, 0.3, seed=1, dtype=dtype)
    y = y.view(100, 200)
    assert _bits_equal(decode_pruned(encode_pruned(y, a)), y)
    assert _bits_equal(decode_pruned(encode_pruned(y)), y)  # inferred threshold


@pytest.mark.parametrize("case", ["zeros", "no_zeros", "one", "huge", "neg_zero", "empty",
                                  "only_a", "scalar"])
def test_round_trip_adversarial(case):
    g = torch.Generator().manual_seed(2)
    x = {
        "zeros": torch.zeros(1000),
        "no_zeros": torch.randn(1000, generator=g),
        "one": torch.tensor([3.5]),
        "huge": torch.tensor([3.4e38, -3.4e38, math.inf, -math.inf, 1e-45, 2.0, -2.0, 0.0]),
        "neg_zero": torch.tensor([-0.0, 0.0, -0.0, 1.0]),
        "empty": torch.empty(0, 3),
        "only_a": torch.tensor([2.0, -2.0] * 300),
        "scalar": torch.tensor(-7.25),
    }[case]
    for threshold in (None, 2.0):
        assert _bits_equal(decode_pruned(encode_pruned(x, threshold)), x)


def test_size_close_to_entropy_bound_and_about_4_bits_at_80_percent():
    y, a = _pruned(1 << 20, 0.8, 0.3, seed=3)
    st = encoding_stats(y, a)
    assert st.overhead < 0.05 and st.overhead > -1e-9  # never below the bound, < 5% above
    # the paper's claim is ~4 bits at 80%; escapes (|x| > a) cost 32 bits each here
    assert st.bits_per_element < 4.5
    y9, a9 = _pruned(1 << 20, 0.9, 0.3, seed=4)
    assert encoding_stats(y9, a9).bits_per_element < st.bits_per_element


def test_bad_input_raises_clearly():
    x = torch.tensor([1.0, math.nan])
    with pytest.raises(ValueError, match="NaN"):
        encode_pruned(x, 1.0)
    with pytest.raises(ValueError, match="threshold"):
        encode_pruned(torch.ones(3), -1.0)
    with pytest.raises(TypeError):
        encode_pruned(torch.ones(3, dtype=torch.int32), 1.0)
    y, a = _pruned(5000, 0.8, 0.0, seed=5)
    data = encode_pruned(y, a)
    for cut in (0, 10, 60, len(data) // 2, len(data) - 1):
        with pytest.raises(ValueError, match="truncated"):
            decode_pruned(data[:cut])
    with pytest.raises(ValueError, match="trailing"):
        decode_pruned(data + b"\0")
    with pytest.raises(ValueError, match="magic"):
        decode_pruned(b"XXXX" + data[4:])
    with pytest.raises(ValueError, match="version"):
        decode_pruned(data[:4] + bytes([9]) + data[5:])
    for pos in (20, 100, len(data) // 2, len(data) - 6):  # header, stream, payload
        bad = bytearray(data)
        bad[pos] ^= 0x40
        with pytest.raises(ValueError, match="corrupted|truncated|trailing"):
            decode_pruned(bytes(bad))
    # a consistent forgery (valid CRC) with counts that do not add up is still refused
    body = bytearray(data[:-4])
    struct.pack_into("<Q", body, 16 + 8, struct.unpack_from("<Q", body, 24)[0] + 1)
    forged = bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))
    with pytest.raises(ValueError, match="corrupted"):
        decode_pruned(forged)


# ---- hardened decoder: header values the encoder never writes, allocation bounded by length --

_HEAD = struct.Struct("<4sBBBBQ4QdQQ")  # the documented fixed header


def _forge(data: bytes, **fields) -> bytes:
    """Rewrite documented header fields of a valid stream and recompute its CRC."""
    names = ["magic", "version", "dtype", "ndim", "reserved", "numel", "c0", "c1", "c2", "c3",
             "threshold", "words", "escape_bytes"]
    vals = dict(zip(names, _HEAD.unpack_from(data)))
    vals.update(fields)
    body = _HEAD.pack(*(vals[k] for k in names)) + data[_HEAD.size:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def _valid():
    y, a = _pruned(2000, 0.8, 0.3, seed=7)
    return encode_pruned(y, a), y, a


def test_small_stream_announcing_1e12_elements_is_refused_fast():
    import time

    n = 10**12
    body = _HEAD.pack(b"GCPE", 2, 3, 1, 0, n, n, 0, 0, 0, 1.0, 2, 0) + struct.pack("<Q", n)
    body += struct.pack("<2I", 0x9E3779B9, 1)  # just the coder's seed: no room for any symbol
    data = body + struct.pack("<I", zlib.crc32(body))
    assert len(data) < 100
    t = time.perf_counter()
    with pytest.raises(ValueError, match="cannot fit"):
        decode_pruned(data)
    # an old-style stream with no ANS words at all is refused the same way
    with pytest.raises(ValueError, match="cannot fit"):
        decode_pruned(_forge(data[:-12] + data[-4:], words=0))
    assert time.perf_counter() - t < 1.0


@pytest.mark.parametrize("n", [1, 1000, 300_000])
def test_element_count_within_documented_ratio_of_stream_length(n):
    from gradcomp.compressors.encoding import MAX_ELEMENTS_PER_WORD

    for x in (torch.zeros(n), torch.full((n,), -3.0)):  # the most compressible tensors
        data = encode_pruned(x, 3.0)
        words = _HEAD.unpack_from(data)[11]
        assert n <= MAX_ELEMENTS_PER_WORD * (words - 1)
        assert _bits_equal(decode_pruned(data), x)
    # the price of the bound: about 0.034 bits per element for a constant tensor
    assert 8 * len(encode_pruned(torch.zeros(300_000))) / 300_000 < 0.04


@pytest.mark.parametrize("threshold", [math.nan, -1.0, -0.0, math.inf, -math.inf, 1e300, 0.1])
def test_forged_threshold_refused(threshold):
    data, _, _ = _valid()  # float32: 1e300 and 0.1 are not float32 values
    with pytest.raises(ValueError, match="threshold"):
        decode_pruned(_forge(data, threshold=threshold))


@pytest.mark.parametrize("field,value,match", [
    ("dtype", 0, "dtype code"), ("dtype", 9, "dtype code"), ("reserved", 1, "reserved"),
    ("numel", 10**12, "disagree"), ("c0", 0, "disagree"), ("c3", 2**64 - 1, "disagree"),
    ("escape_bytes", 4, "truncated|trailing"), ("words", 2**64 - 1, "truncated"),
    ("ndim", 255, "truncated"),
])
def test_forged_header_fields_refused(field, value, match):
    data, _, _ = _valid()
    with pytest.raises(ValueError, match=match):
        decode_pruned(_forge(data, **{field: value}))


def test_forged_payloads_refused():
    # +-a symbols with threshold 0
    data = encode_pruned(torch.tensor([0.0, 2.0, -2.0]), 2.0)
    with pytest.raises(ValueError, match="threshold 0"):
        decode_pruned(_forge(data, threshold=0.0))
    # escaped values the encoder codes as symbols (+0.0, +-a) or refuses (NaN)
    x = torch.tensor([0.0, 2.0, 5.0])
    data = encode_pruned(x, 2.0)
    esc_at = len(data) - 8
    for bits, match in ((0, r"\+0\.0"), (0x40000000, "threshold"), (0xC0000000, "threshold"),
                        (0x7FC00000, "NaN")):
        body = data[:esc_at] + struct.pack("<I", bits)
        with pytest.raises(ValueError, match=match):
            decode_pruned(body + struct.pack("<I", zlib.crc32(body)))
    # an ANS stream that does not end on the coder's seed (word changed, CRC recomputed)
    data, _, _ = _valid()
    off = _HEAD.size + 8
    body = bytearray(data[:-4])
    body[off + 1] ^= 0x10
    with pytest.raises(ValueError, match="corrupted"):
        decode_pruned(bytes(body) + struct.pack("<I", zlib.crc32(bytes(body))))
    # a dimension torch cannot hold (zero-element shape, so numel still agrees)
    body = _HEAD.pack(b"GCPE", 2, 3, 2, 0, 0, 0, 0, 0, 0, 0.0, 0, 0) + struct.pack(
        "<2Q", 0, 2**64 - 1)
    with pytest.raises(ValueError, match="dimension"):
        decode_pruned(body + struct.pack("<I", zlib.crc32(body)))


def test_old_version_refused():
    data, _, _ = _valid()
    with pytest.raises(ValueError, match="unsupported version 1"):
        decode_pruned(_forge(data, version=1))


def test_infinite_values_infer_a_finite_threshold():
    # an inferred threshold comes from finite values only; +-inf are escaped verbatim
    x = torch.tensor([math.inf, math.inf, 1.0])
    data = encode_pruned(x)
    assert _HEAD.unpack_from(data)[10] == 1.0
    assert _bits_equal(decode_pruned(data), x)
    for x in (torch.tensor([math.inf, -math.inf, 0.0, -0.0]), torch.full((5,), -math.inf)):
        assert _bits_equal(decode_pruned(encode_pruned(x)), x)  # threshold 0: all escaped


def test_threshold_errors_name_the_cause():
    with pytest.raises(ValueError, match=r"finite and >= 0.*got inf"):
        encode_pruned(torch.tensor([math.inf, 1.0]), math.inf)
    with pytest.raises(ValueError, match="overflows to inf in torch.float16"):
        encode_pruned(torch.ones(3, dtype=torch.float16), 1e6)
    # -0.0 as the threshold means 0 (written as +0.0, which the decoder requires)
    x = torch.tensor([-0.0, 1.0])
    assert _bits_equal(decode_pruned(encode_pruned(x, -0.0)), x)


@pytest.mark.parametrize("shape", [(0,), (0, 3), (4, 0, 2)])
def test_empty_tensor_round_trips(shape):
    for dtype in (torch.float16, torch.float64):
        x = torch.empty(shape, dtype=dtype)
        for threshold in (None, 0.5):
            assert _bits_equal(decode_pruned(encode_pruned(x, threshold)), x)
