"""Block-energy statistics for calibration: one entry point, dispatching by device.

Calls the Triton kernels take (kernels/support.py) -> the Triton kernel (triton_fwd.py); everything else (CPU,
float32) -> the plain-PyTorch reference (naive.py). Both accumulate into the same [H, nq, nk] float32 buffer.
"""

from __future__ import annotations

import torch

from ...masks.skiplists import BlockGeometry
from ..support import KernelUnsupported, triton_unsupported
from .naive import block_energy_reference, block_row_counts, check_row_stride

__all__ = ["block_energy", "block_row_counts"]


def block_energy(q: torch.Tensor, k: torch.Tensor, geometry: BlockGeometry, *, scale: float | None = None,
                 out: torch.Tensor | None = None, row_stride: int = 1, row_offset: int = 0,
                 text_bias: torch.Tensor | None = None, video_start: int = 0) -> torch.Tensor:
    """Same contract as block_energy_reference (q, k: (B, H, N, D); out [H, nq, nk] float32, accumulated).
    row_stride > 1 estimates the same sums from every row_stride-th query row of each block (starting at
    row_offset mod row_stride), about row_stride times cheaper; 1 is exact. text_bias: additive bias on the text
    keys' scores ((T,), (1, T) or (B, T); kernels/text_bias.py), e.g. a key-padding mask. video_start: 0 (text after
    the video) or the text token count (text first; kernels/layouts.py token_spans)."""
    row_stride, row_offset = check_row_stride(row_stride, row_offset)
    if triton_unsupported(q, k) is None and (out is None or out.is_contiguous()):
        from .triton_fwd import block_energy_triton
        try:
            return block_energy_triton(q, k, geometry, scale=scale, out=out, row_stride=row_stride,
                                       row_offset=row_offset, text_bias=text_bias, video_start=video_start)
        except KernelUnsupported:
            pass  # a mask block size outside the kernel's range: the reference handles any
    return block_energy_reference(q, k, geometry, scale=scale, out=out, row_stride=row_stride,
                                  row_offset=row_offset, text_bias=text_bias, video_start=video_start)
