"""Block-energy statistics for calibration: one entry point, dispatching by device.

CUDA with float16/bfloat16 q, k -> the Triton kernel (kernels/triton_stats.py); everything else (CPU, float32)
-> the plain-PyTorch reference. Both accumulate into the same [H, nq, nk] float32 buffer.
"""

from __future__ import annotations

import torch

from ..masks.skiplists import BlockGeometry
from .stats_reference import block_energy_reference, block_row_counts, check_row_stride

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
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype:
        from .triton_attention import TritonUnsupported
        from .triton_stats import block_energy_triton
        try:
            if out is not None and not out.is_contiguous():
                raise TritonUnsupported("non-contiguous out")
            return block_energy_triton(q, k, geometry, scale=scale, out=out, row_stride=row_stride,
                                       row_offset=row_offset, text_bias=text_bias, video_start=video_start)
        except TritonUnsupported:
            pass  # head_dim or block size outside the kernel's range: the reference handles any
    return block_energy_reference(q, k, geometry, scale=scale, out=out, row_stride=row_stride,
                                  row_offset=row_offset, text_bias=text_bias, video_start=video_start)
