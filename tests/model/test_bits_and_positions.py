"""Bit packing, the legacy index codec quirk, and M-RoPE positions (spec §3.2, §4.2)."""
from __future__ import annotations

import torch

from uniar_ray import bits as B
from uniar_ray.model.positions import rope_positions


def test_pack_unpack_round_trip_and_size():
    g = torch.Generator().manual_seed(1)
    bits = torch.randint(0, 2, (256, 4, 4, 64), generator=g, dtype=torch.uint8)
    packed = B.pack_bits(bits)
    assert packed.nbytes == 32 * 1024  # 512x512 image: 32 KiB
    assert torch.equal(B.unpack_bits(packed, tuple(bits.shape)), bits)
    assert torch.equal(B.unpack_bits(packed.tobytes(), tuple(bits.shape)), bits)


def test_unpack_rejects_wrong_length():
    import pytest

    with pytest.raises(ValueError, match="hold 3 bytes"):
        B.unpack_bits(bytes(3), (4, 4, 4))


def test_codes_round_trip():
    bits = torch.randint(0, 2, (10, 64), dtype=torch.uint8)
    assert torch.equal(B.codes_to_bits(B.bits_to_codes(bits)), bits)


def test_legacy_codec_swaps_exactly_two_codes():
    g = torch.Generator().manual_seed(2)
    bits = torch.randint(0, 2, (1000, 64), generator=g, dtype=torch.uint8)
    assert torch.equal(B.legacy_roundtrip(bits), bits)  # every ordinary code round-trips
    zeros = torch.zeros(1, 64, dtype=torch.uint8)
    msb = zeros.clone()
    msb[0, 0] = 1
    assert B.legacy_bits_to_index(msb).item() == -(2**63)
    assert torch.equal(B.legacy_roundtrip(zeros), msb)  # index 0 decodes with the MSB set
    assert torch.equal(B.legacy_roundtrip(msb), zeros)  # -2^63 decodes as all zeros


def _pos(ids, mask, grids):
    return rope_positions(torch.tensor(ids), torch.tensor(mask), grids, image_token_id=9, vision_start_token_id=8)


def test_golden_positions_unpadded_prefix_2x2_grid():
    ids = [[1, 2, 3, 4, 5, 6, 8, 9, 9, 9, 9]]  # 7 prefix tokens (last is vision_start) + 4 image tokens
    pos = _pos(ids, [[1] * 11], [[1, 4, 4]])
    assert pos[:, 0, 7:].T.tolist() == [[7, 7, 7], [7, 7, 8], [7, 8, 7], [7, 8, 8]]
    assert pos[:, 0, :7].tolist() == [list(range(7))] * 3


def test_padding_gets_one_and_shifts_nothing_else():
    ids = [[0, 0, 1, 2, 8, 9, 9], [5, 1, 2, 3, 8, 9, 9]]
    mask = [[0, 0, 1, 1, 1, 1, 1], [1] * 7]
    pos = _pos(ids, mask, [[1, 2, 4], [1, 2, 4]])  # 1 x 2 merged grid (non-square)
    assert pos[:, 0, :2].tolist() == [[1, 1]] * 3
    assert pos[:, 0, 2:].T.tolist() == [[0, 0, 0], [1, 1, 1], [2, 2, 2], [3, 3, 3], [3, 3, 4]]
    assert pos[:, 1, 5:].T.tolist() == [[5, 5, 5], [5, 5, 6]]


def test_edit_mode_text_after_input_image_restarts_at_max_plus_one():
    # text, input image 2x2 merged (grid 1,4,4), text, vision_start + output image 1x1 merged (grid 1,2,2)
    ids = [[1, 8, 9, 9, 9, 9, 7, 6, 8, 9]]
    pos = _pos(ids, [[1] * 10], [[1, 4, 4], [1, 2, 2]])
    assert pos[:, 0, 2:6].T.tolist() == [[2, 2, 2], [2, 2, 3], [2, 3, 2], [2, 3, 3]]
    assert pos[:, 0, 6:9].tolist() == [[4, 5, 6]] * 3
    assert pos[:, 0, 9].tolist() == [7, 7, 7]
