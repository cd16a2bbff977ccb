"""Bit utilities: BSQ bits <-> codes <-> packed uint8, and the reference's legacy 64-bit index codec.

Bits travel bit-packed everywhere (32 KiB per 512x512 image: 256 tokens x 4 levels x 4 sub-patches x 64 bits / 8).
The legacy index codec exists only to reproduce the published code's indices, quirk included (spec §3.2).
"""
from __future__ import annotations

import numpy as np
import torch


def bits_to_codes(bits: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """{0, 1} -> {-1, +1} (bit 1 is the positive code)."""
    return bits.to(dtype) * 2 - 1


def codes_to_bits(codes: torch.Tensor) -> torch.Tensor:
    """{-1, +1} (or any sign) -> {0, 1} uint8; zero maps to 0 like the quantiser."""
    return (codes > 0).to(torch.uint8)


def pack_bits(bits: torch.Tensor | np.ndarray) -> np.ndarray:
    """Any-shaped {0,1} array -> flat uint8 array, 8 bits per byte, big-endian within a byte (numpy packbits)."""
    arr = bits.detach().cpu().numpy() if isinstance(bits, torch.Tensor) else np.asarray(bits)
    if arr.size and arr.max(initial=0) > 1:
        raise ValueError("pack_bits expects values in {0, 1}")
    return np.packbits(arr.astype(np.uint8).reshape(-1))


def unpack_bits(packed: np.ndarray | bytes, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``pack_bits``: -> uint8 tensor of ``shape``. Raises if the byte count does not fit the shape."""
    buf = np.frombuffer(packed, dtype=np.uint8) if isinstance(packed, (bytes, bytearray)) else np.asarray(packed)
    count = int(np.prod(shape))
    if buf.size != (count + 7) // 8:
        raise ValueError(f"packed bits hold {buf.size} bytes, shape {tuple(shape)} needs {(count + 7) // 8}")
    return torch.from_numpy(np.unpackbits(buf, count=count).reshape(shape).copy())


def packed_nbytes(shape: tuple[int, ...]) -> int:
    return (int(np.prod(shape)) + 7) // 8


# --------------------------------------------------------------------------------------------------------------
# Legacy index codec (reference compatibility only)
# --------------------------------------------------------------------------------------------------------------


def legacy_bits_to_index(bits: torch.Tensor) -> torch.Tensor:
    """bits [..., D] -> int64 index, dimension 0 most significant, with the reference's int64 wrap-around.

    For D = 64 the MSB weight 2^63 wraps to -2^63, so indices are signed and may be negative.
    """
    d = bits.shape[-1]
    basis = _basis(d, bits.device)
    return (bits.to(torch.int64) * basis).sum(-1)


def legacy_index_to_bits(index: torch.Tensor, dim: int) -> torch.Tensor:
    """int64 index -> bits [..., dim] exactly as the reference's ``indexes_to_codes`` (then (c + 1) / 2).

    Quirk kept on purpose (D = 64 only): floor-division by the wrapped basis plus the MSB flip decodes index 0
    (all bits 0) with the MSB set, and index -2^63 (only the MSB set) as all zeros: those two codes are swapped.
    Every other index round-trips. Use plain bits (``pack_bits``) for anything new.
    """
    basis = _basis(dim, index.device)
    bits = torch.remainder(torch.floor_divide(index[..., None], basis), 2)
    if dim == 64:
        bits[..., :1] = 1 - bits[..., :1]
    return bits.to(torch.uint8)


def legacy_roundtrip(bits: torch.Tensor) -> torch.Tensor:
    """What the reference's bits -> index -> bits detour (generation output -> decoder) does to bits [..., D]."""
    return legacy_index_to_bits(legacy_bits_to_index(bits), bits.shape[-1])


def _basis(dim: int, device) -> torch.Tensor:
    return 2 ** torch.arange(dim - 1, -1, -1, dtype=torch.int64, device=device)
