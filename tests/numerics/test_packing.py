"""k-bit code packing: exact round trip, byte counts, the documented bit order."""

from __future__ import annotations

import pytest
import torch

from gradcomp.numerics.packing import MAX_BITS, pack_codes, packed_bytes, unpack_codes


def _codes(n: int, bits: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.int64)


def _reference_pack(codes: torch.Tensor, bits: int) -> bytes:
    """Independent oracle: one big Python integer, code i at bit offset i * bits."""
    acc = 0
    for i, c in enumerate(codes.tolist()):
        acc |= int(c) << (i * bits)
    return acc.to_bytes(packed_bytes(codes.numel(), bits), "little")


@pytest.mark.parametrize("bits", list(range(1, MAX_BITS + 1)))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 200])
def test_round_trip_and_bytes_match_the_oracle(bits, n):
    codes = _codes(n, bits, seed=bits * 1000 + n)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == packed_bytes(n, bits) == -(-n * bits // 8)
    assert bytes(packed.tolist()) == _reference_pack(codes, bits)
    back = unpack_codes(packed, bits, n)
    want_dtype = torch.uint8 if bits <= 8 else torch.int32 if bits <= 31 else torch.int64
    assert back.dtype == want_dtype
    assert torch.equal(back.to(torch.int64), codes)


def test_documented_layouts():
    # 4-bit: first code in the low nibble (torchao's pack_uint4 order)
    assert pack_codes(torch.tensor([0x1, 0xF, 0x7], dtype=torch.uint8), 4).tolist() == [0xF1, 0x07]
    # 6-bit: four codes in three bytes
    p = pack_codes(torch.tensor([0b000001, 0b100000, 0b111111, 0b010101]), 6)
    assert p.tolist() == [0b00_000001, 0b1111_1000, 0b010101_11]
    # 8-bit codes are the bytes
    c = torch.arange(256).to(torch.uint8)
    assert torch.equal(pack_codes(c, 8), c)


def test_high_bits_are_discarded_and_input_dtypes():
    c = torch.tensor([0x1F, -1, 3], dtype=torch.int32)  # 0x1F and -1 keep their low 4 bits
    assert unpack_codes(pack_codes(c, 4), 4, 3).tolist() == [0xF, 0xF, 3]
    for dt in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        c = torch.tensor([0, 5, 2, 7], dtype=dt)
        assert unpack_codes(pack_codes(c, 3), 3, 4).tolist() == [0, 5, 2, 7]


def test_bad_arguments():
    with pytest.raises(TypeError, match="codes must be an integer tensor"):
        pack_codes(torch.zeros(3), 4)
    with pytest.raises(ValueError, match=r"bits must be in \[1, 32\]"):
        pack_codes(torch.zeros(3, dtype=torch.int32), 33)
    with pytest.raises(TypeError, match="bits must be an int"):
        packed_bytes(3, 4.0)
    with pytest.raises(ValueError, match="data holds 2 bytes; 5 codes of 4 bits pack into 3"):
        unpack_codes(torch.zeros(2, dtype=torch.uint8), 4, 5)
    with pytest.raises(TypeError, match="1-D torch.uint8"):
        unpack_codes(torch.zeros(3, dtype=torch.int32), 4, 5)
