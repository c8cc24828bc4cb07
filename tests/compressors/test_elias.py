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


# ---- malformed input: ValueError only (TypeError for wrong argument types), bounded memory --

def test_count_beyond_available_bits_refused_before_allocating():
    import time

    bits = elias_encode([3, 1, 4], "omega")
    t = time.perf_counter()
    for count in (10**12, 2**62, bits.size + 1):
        with pytest.raises(ValueError, match="truncated"):
            elias_decode(bits, count, "omega")
    assert time.perf_counter() - t < 0.5
    with pytest.raises(ValueError, match="count must be >= 0"):
        elias_decode(bits, -1)


@pytest.mark.parametrize("code", CODES)
def test_positions_and_bit_values_checked(code):
    bits = elias_encode([5, 6], code)
    for start in (-1, bits.size + 1, 10**15):
        with pytest.raises(ValueError, match="start must be in"):
            elias_decode(bits, 1, code, start)
    with pytest.raises(TypeError, match="start"):
        elias_decode(bits, 1, code, 1.5)
    with pytest.raises(TypeError, match="count"):
        elias_decode(bits, 2.0, code)
    bad = bits.copy()
    bad[0] = 2
    with pytest.raises(ValueError, match="only 0 and 1"):
        elias_decode(bad, 2, code)
    with pytest.raises(TypeError, match="integer"):
        elias_decode(bits.astype(np.float32), 2, code)
    # bool and wider integer arrays holding 0/1 are the same stream
    assert elias_decode(bits.astype(bool), 2, code)[0].tolist() == [5, 6]
    assert elias_decode(bits.astype(np.int64), 2, code)[0].tolist() == [5, 6]


@pytest.mark.parametrize("code", CODES)
def test_all_zero_and_all_one_sections_raise_value_error(code):
    # gamma used to index an empty array (IndexError) when no 1 bit followed the start.
    # "1" is gamma's code of 1 and "0" omega's: the other fill never ends a code
    bad_fill = 0 if code == "gamma" else 1
    for n in (1, 7, 64, 200):
        with pytest.raises(ValueError, match="truncated|corrupted"):
            elias_decode(np.full(n, bad_fill, np.uint8), 1, code)
        ones, _ = elias_decode(np.full(n, 1 - bad_fill, np.uint8), n, code)
        assert ones.tolist() == [1] * n
    tail = np.concatenate([elias_encode([9], code), np.full(9, bad_fill, np.uint8)])
    with pytest.raises(ValueError, match="truncated|corrupted"):
        elias_decode(tail, 2, code)


def test_unpack_bits_and_read_uint_validate():
    from gradcomp.compressors.elias import emit_fields, read_uint

    packed, n = pack_bits(np.array([1, 0, 1, 1], np.uint8))
    assert unpack_bits(packed, n).tolist() == [1, 0, 1, 1]
    assert unpack_bits(packed.tobytes(), 2).tolist() == [1, 0]
    for nbits in (-1, 9, 10**12):
        with pytest.raises(ValueError, match="nbits"):
            unpack_bits(packed, nbits)
    with pytest.raises(TypeError, match="nbits"):
        unpack_bits(packed, 2.0)
    with pytest.raises(ValueError, match="0, 255"):
        unpack_bits(np.array([256]), 8)
    with pytest.raises(ValueError, match="only 0 and 1"):
        pack_bits(np.array([0, 3]))
    bits = unpack_bits(np.array([0xA5, 0xFF], np.uint8), 16)
    assert read_uint(bits, 0, 8) == 0xA5 and read_uint(bits, 4, 12) == 0x5FF
    for pos, width in ((-1, 4), (10, 8), (0, 65), (0, -1)):
        with pytest.raises(ValueError):
            read_uint(bits, pos, width)
    with pytest.raises(ValueError, match="widths"):
        emit_fields(np.array([1]), np.array([65]))
    with pytest.raises(ValueError, match="same length"):
        emit_fields(np.array([1, 2]), np.array([3]))
    assert emit_fields(np.array([5, 1]), np.array([3, 64])).size == 67
