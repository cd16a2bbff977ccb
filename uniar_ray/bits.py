"""Bit utilities: BSQ bits <-> codes <-> packed uint8, and the reference's legacy 64-bit index codec.

Bits travel bit-packed everywhere (32 KiB per 512x512 image: 256 tokens x 4 levels x 4 sub-patches x 64 bits / 8).
The legacy index codec exists only to reproduce the published code's indices, quirk included (spec §3.2).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

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
# Bits files: one generated image's bits on disk (jobs.generate --save-bits writes them, jobs.chat --bits reads them)
# --------------------------------------------------------------------------------------------------------------

BITS_FILE_SUFFIX = ".bits.npz"
BITS_FILE_VERSION = 1


def bits_file_path(image_path: str | Path) -> Path:
    """``apple.png`` -> ``apple.bits.npz`` beside it."""
    p = Path(image_path)
    return p.with_name(p.stem + BITS_FILE_SUFFIX)


def save_bits_file(path: str | Path, bits: torch.Tensor | np.ndarray, ar_height: int, ar_width: int,
                   prompt: str = "") -> Path:
    """bits [N, L, U, D] in {0, 1} -> an .npz holding them packed (``packed`` uint8, ``shape`` [4]), the AR size
    and the prompt; plain arrays only, so loading never unpickles."""
    shape = tuple(int(x) for x in np.shape(bits))
    if len(shape) != 4 or shape[0] != (ar_height // 32) * (ar_width // 32):
        raise ValueError(f"bits of shape {shape} do not fit a {ar_height}x{ar_width} image ([N, L, U, D], "
                         f"N = {(ar_height // 32) * (ar_width // 32)})")
    path = Path(path)
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to a str path
        np.savez(f, version=np.int64(BITS_FILE_VERSION), packed=pack_bits(bits), shape=np.array(shape, np.int64),
                 ar_height=np.int64(ar_height), ar_width=np.int64(ar_width), prompt=np.str_(prompt))
    return path


@dataclasses.dataclass
class BitsFile:
    bits: torch.Tensor  # [N, L, U, D] uint8
    ar_height: int
    ar_width: int
    prompt: str


def load_bits_file(path: str | Path) -> BitsFile:
    """Inverse of ``save_bits_file``; a file that is not one is a ValueError naming it."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            fields = {k: z[k] for k in ("version", "packed", "shape", "ar_height", "ar_width", "prompt")}
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise ValueError(f"{path}: not a bits file written by save_bits_file / jobs.generate --save-bits ({e})") \
            from None
    if int(fields["version"]) != BITS_FILE_VERSION:
        raise ValueError(f"{path}: bits file version {int(fields['version'])}, this code reads {BITS_FILE_VERSION}")
    shape = tuple(int(x) for x in fields["shape"])
    return BitsFile(unpack_bits(fields["packed"], shape), int(fields["ar_height"]), int(fields["ar_width"]),
                    str(fields["prompt"]))


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
