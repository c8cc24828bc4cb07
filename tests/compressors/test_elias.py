"""Elias gamma / omega codes: exact round trip, known code words, truncated/corrupted streams."""

import numpy as np
import pytest

from gradcomp.compressors.elias import (
    CODES,
    MAX_VALUE,
    code_lengths,
    elias_decode,
    elias_encode,
    pack_bits,
    unpack_bits,
)


def _bits(s):
    return np.array([int(c) for c in s], dtype=np.uint8)


def test_known_code_words():
    # textbook code words (Elias 1975): gamma 1,2,3,4 and omega 1,2,3,4,17
    assert elias_encode([1, 2, 3, 4], "gamma").tolist() == _bits("1" "010" "011" "00100").tolist()
    want = "0" "100" "110" "101000" "10100100010"
    assert elias_encode([1, 2, 3, 4, 17], "omega").tolist() == _bits(want).tolist()


@pytest.mark.parametrize("code", CODES)
def test_round_trip_random_and_edges(code):
    rng = np.random.default_rng(0)
    edges = [1, 2, 3, 7, 8, 255, 256, 2**31 - 1, 2**32, 2**40 + 1, 2**56, MAX_VALUE]
    v = np.concatenate([edges, rng.integers(1, 50, 3000), rng.integers(1, 2**50, 200), edges])
    rng.shuffle(v)
    bits = elias_encode(v, code)
    assert bits.size == code_lengths(v, code).sum()
    out, end = elias_decode(bits, v.size, code)
    assert end == bits.size
    np.testing.assert_array_equal(out, v)
    # through bytes, and decoding a section that starts mid-stream
    packed, n = pack_bits(np.concatenate([_bits("101"), bits]))
    out2, end2 = elias_decode(unpack_bits(packed, n), v.size, code, start=3)
    np.testing.assert_array_equal(out2, v)
    assert end2 == n


@pytest.mark.parametrize("code", CODES)
def test_single_values_and_empty(code):
    for x in (1, 2, MAX_VALUE):
        out, end = elias_decode(elias_encode([x], code), 1, code)
        assert out.tolist() == [x]
    out, end = elias_decode(np.zeros(0, np.uint8), 0, code)
    assert out.size == 0 and end == 0


@pytest.mark.parametrize("code", CODES)
def test_truncated_stream_raises(code):
    v = np.arange(1, 200)
    bits = elias_encode(v, code)
    for cut in (1, 3, bits.size // 2):
        with pytest.raises(ValueError, match="truncated|corrupted"):
            elias_decode(bits[:-cut], v.size, code)
    with pytest.raises(ValueError, match="truncated"):
        elias_decode(np.zeros(0, np.uint8), 1, code)


def test_corrupted_stream_raises():
    # gamma: 60 zeros announce a 61-bit value, longer than any allowed code
    with pytest.raises(ValueError, match="corrupted|truncated"):
        elias_decode(np.concatenate([np.zeros(60, np.uint8), np.ones(70, np.uint8)]), 1, "gamma")
    # omega: an all-ones stream never terminates (group widths grow past 57 bits)
    with pytest.raises(ValueError, match="corrupted|truncated"):
        elias_decode(np.ones(400, np.uint8), 1, "omega")


@pytest.mark.parametrize("bad", [[0], [-3], [MAX_VALUE + 1]])
def test_out_of_range_values_raise(bad):
    with pytest.raises(ValueError, match="values must lie in"):
        elias_encode(np.array(bad, dtype=np.int64))
    with pytest.raises(ValueError, match="code must be one of"):
        elias_encode([1], "delta")
    with pytest.raises(TypeError, match="integer"):
        elias_encode([1.5])
