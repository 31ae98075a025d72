"""One layer's skip-list table built from its bit-packed masks in one Triton launch.

The same table as masks/skiplists.py `packed_to_table` (kept key blocks ascending, padded to the layer's width by
repeating the last one, counts per row), written into caller-owned memory: the sparse runner rebuilds a layer's
table right before its attention call, into one buffer that every layer reuses (kernels/tables/__init__.py). The
torch version is ~10 launches and a few transient tensors; this is one launch that reads the packed bits (1.8 MB
per layer at Wan 720p) and writes the table, with no transient memory and no host sync.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _packed_rows_to_table(BITS, FULL, IDX, CNT, n_rows, NQ, NK, NB, W,
                          COLS: tl.constexpr, ROWS: tl.constexpr, HAS_FULL: tl.constexpr):
    """ROWS mask rows per program (row = head * NQ + query block). A row's bits are expanded across COLS lanes
    (COLS >= NK), a prefix sum gives each kept block its column, a scatter store writes it there, and the columns
    from the row's count up to W take the last kept block."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, COLS)
    col_ok = cols < NK
    byte = tl.load(BITS + rows64[:, None] * NB + (cols // 8)[None, :], mask=row_ok[:, None] & col_ok[None, :],
                   other=0)
    bit = (byte.to(tl.int32) >> (7 - cols % 8)[None, :]) & 1  # most significant bit first (packing.pack_bits)
    if HAS_FULL:
        full = tl.load(FULL + rows // NQ, mask=row_ok, other=0)
        bit = tl.where((full != 0)[:, None] & col_ok[None, :], 1, bit)
    pos = tl.cumsum(bit, axis=1) - 1
    cnt = tl.sum(bit, axis=1)
    last = tl.maximum(tl.max(tl.where(bit != 0, cols[None, :], -1), axis=1), 0)
    row_ptr = IDX + rows64[:, None] * W
    cols2 = tl.broadcast_to(cols[None, :], (ROWS, COLS))
    tl.store(row_ptr + pos, cols2.to(IDX.dtype.element_ty), mask=(bit != 0) & row_ok[:, None] & (pos < W))
    pad = row_ok[:, None] & (cols2 >= cnt[:, None]) & (cols2 < W)
    tl.store(row_ptr + cols2, tl.broadcast_to(last[:, None], (ROWS, COLS)).to(IDX.dtype.element_ty), mask=pad)
    tl.store(CNT + rows, cnt, mask=row_ok)


def packed_to_table_triton(packed: torch.Tensor, nk: int, kv_indices: torch.Tensor, kv_counts: torch.Tensor,
                           full: Optional[torch.Tensor] = None):
    """packed: [H, nq, ceil(nk/8)] uint8, contiguous. Writes kv_indices [H, nq, W] (int16 or int32, contiguous; W
    at least the longest row, else rows are cut at W) and kv_counts [H, nq] int32. full: optional [H] uint8/bool,
    heads whose rows list every key block. All on one device; nothing is read back."""
    H, nq, nb = packed.shape
    W = kv_indices.shape[-1]
    if not (packed.is_contiguous() and kv_indices.is_contiguous() and kv_counts.is_contiguous()):
        raise ValueError("packed masks, kv_indices and kv_counts must be contiguous")
    if tuple(kv_indices.shape[:2]) != (H, nq) or tuple(kv_counts.shape) != (H, nq) or W > nk:
        raise ValueError(f"table {tuple(kv_indices.shape)} / counts {tuple(kv_counts.shape)} do not fit masks "
                         f"{tuple(packed.shape)} of {nk} key blocks")
    cols = triton.next_power_of_2(max(nk, 16))
    rows_per = max(1, min(64, 4096 // cols))  # ~4K lanes a program: 4 rows at Wan 720p's 591 key blocks
    n_rows = H * nq
    flags = full.to(torch.uint8) if full is not None else kv_counts  # never read without HAS_FULL
    _packed_rows_to_table[(triton.cdiv(n_rows, rows_per),)](
        packed, flags, kv_indices, kv_counts, n_rows, nq, nk, nb, W,
        COLS=cols, ROWS=rows_per, HAS_FULL=full is not None, num_warps=4)
    return kv_indices, kv_counts
