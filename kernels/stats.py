"""Block-energy statistics for calibration: one entry point, dispatching by device."""

from __future__ import annotations

import torch

from ..masks.skiplists import BlockGeometry
from .stats_reference import block_energy_reference, block_row_counts

__all__ = ["block_energy", "block_row_counts"]


def block_energy(q: torch.Tensor, k: torch.Tensor, geometry: BlockGeometry, *, scale: float | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as block_energy_reference (q, k: (B, H, N, D); out [H, nq, nk] float32, accumulated)."""
    return block_energy_reference(q, k, geometry, scale=scale, out=out)
