"""Bit packing of block masks, on any device (torch only), so a bucket's masks can be unpacked on the GPU."""

from __future__ import annotations

import numpy as np
import torch

_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)
_DEVICE_COPIES: dict = {}


def _on(const: torch.Tensor, device) -> torch.Tensor:
    """A module constant on `device`, copied once per device: a copy per call from pageable host memory waits for
    the GPU (these run per attention call in calibration and per sigma bucket at inference)."""
    key = (id(const), str(device))
    t = _DEVICE_COPIES.get(key)
    if t is None:
        t = _DEVICE_COPIES[key] = const.to(device)
    return t


def row_bytes(nk: int) -> int:
    return (nk + 7) // 8


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """[..., nk] bool -> [..., ceil(nk/8)] uint8, most significant bit first, zero padding bits."""
    if mask.device.type == "cpu":
        # numpy's packbits has the same layout (MSB first, zero padding) and is far faster than the torch ops.
        return torch.from_numpy(np.packbits(mask.to(torch.bool).numpy(), axis=-1))
    return _pack_bits_torch(mask)


def _pack_bits_torch(mask: torch.Tensor) -> torch.Tensor:
    """pack_bits in torch ops, for masks on a GPU."""
    pad = row_bytes(mask.shape[-1]) * 8 - mask.shape[-1]
    m = mask.to(torch.uint8)
    if pad:
        m = torch.nn.functional.pad(m, (0, pad))
    m = m.reshape(*mask.shape[:-1], -1, 8)
    return (m << _on(_SHIFTS, mask.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, nk: int) -> torch.Tensor:
    """[..., ceil(nk/8)] uint8 -> [..., nk] bool."""
    bits = (packed[..., None] >> _on(_SHIFTS, packed.device)) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :nk].to(torch.bool)


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.uint8)


def row_counts(packed: torch.Tensor, chunk_bytes: int = 1 << 26) -> torch.Tensor:
    """[..., rows, bytes] uint8 -> [..., rows] int32 number of set bits per row.

    Works in chunks of rows: a bundle's distinct masks can be hundreds of MB packed, and the lookup needs an int64
    index per byte."""
    table = _on(_POPCOUNT, packed.device)
    flat = packed.reshape(-1, packed.shape[-1]) if packed.dim() > 1 else packed.reshape(1, -1)
    rows_per = max(1, chunk_bytes // max(1, flat.shape[-1]))
    out = torch.empty(flat.shape[0], dtype=torch.int32, device=packed.device)
    for i in range(0, flat.shape[0], rows_per):
        out[i:i + rows_per] = table[flat[i:i + rows_per].long()].sum(-1, dtype=torch.int32)
    return out.reshape(packed.shape[:-1])
