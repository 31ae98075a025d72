"""Plain-PyTorch block energy: per (head, query block, key block) attention probability mass, summed.

Never materialises N x N: it walks query blocks, computing one [B, H, block_q, N] score slab at a time (the first
pass gives each row's log-sum-exp over all keys, text included, with the optional text bias added to the text keys'
scores; the second sums exp(s - lse) per key block). The text may sit after the video or before it (video_start,
kernels/layouts.py token_spans); rows, blocks and the output number the video tokens from 0 either way.
This is the specification the Triton statistics kernel must match.

Row subsampling (row_stride > 1, calibration's cheap mode): a query block of n rows uses only its local rows
i = o, o + s, o + 2s, ... < n with s = row_stride and o = (row_offset mod s) mod n (the second mod keeps at least one
row in a partial last block shorter than o), and scales their mass by n / (rows used), so out still estimates the sum
over ALL rows of the block. Rows of one block are strongly correlated in video attention (neighbouring tokens), so a
strided sample estimates the block's mean row well; callers rotate row_offset across steps so that every row is seen.
"""

from __future__ import annotations

import math

import torch

from ...masks.skiplists import BlockGeometry
from ..layouts import token_spans
from ..text_bias import as_text_bias


def sampled_rows(n: int, row_stride: int, row_offset: int) -> tuple[int, int]:
    """(first local row, rows used) of a query block of n rows under (row_stride, row_offset)."""
    o = (row_offset % row_stride) % n
    return o, (n - o + row_stride - 1) // row_stride


def check_row_stride(row_stride, row_offset) -> tuple[int, int]:
    if isinstance(row_stride, bool) or int(row_stride) != row_stride or int(row_stride) < 1:
        raise ValueError(f"block_energy: row_stride must be an integer >= 1 (1 = every query row), got {row_stride!r}")
    if isinstance(row_offset, bool) or int(row_offset) != row_offset or int(row_offset) < 0:
        raise ValueError(f"block_energy: row_offset must be an integer >= 0, got {row_offset!r}")
    return int(row_stride), int(row_offset)


def block_energy_reference(q: torch.Tensor, k: torch.Tensor, geometry: BlockGeometry, *, scale: float | None = None,
                           out: torch.Tensor | None = None, row_stride: int = 1,
                           row_offset: int = 0, text_bias: torch.Tensor | None = None,
                           video_start: int = 0) -> torch.Tensor:
    """q, k: (B, H, N, D), N >= geometry.num_tokens: the video tokens from video_start on (0, or the text token
    count when the text comes first), the rest text (they count in the softmax normaliser but get no column).
    Returns out [H, nq, nk] float32 with out += sum over batch and the query rows of each block of the probability
    mass that lands in each key block. Divide by (B * rows in the block) for the
    mean mass; rows of one query block then sum to (1 - their mass on text).
    row_stride > 1: the same quantity estimated from every row_stride-th row of each block (module docstring);
    row_stride = 1 is exact (and ignores row_offset).
    text_bias ((T,), (1, T) or (B, T), kernels/text_bias.py): added to the text keys' scores, so padded text keys
    (-inf / -max) leave the normaliser and the video blocks get the mass the masked attention gives them."""
    row_stride, row_offset = check_row_stride(row_stride, row_offset)
    B, H, N, D = q.shape
    g = geometry
    Nv = g.num_tokens
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if out is None:
        out = torch.zeros(H, g.nq, g.nk, dtype=torch.float32, device=q.device)
    if out.shape != (H, g.nq, g.nk) or out.dtype != torch.float32:
        raise ValueError(f"out must be float32 [{H}, {g.nq}, {g.nk}], got {out.dtype} {tuple(out.shape)}")
    vs, ts, Nt = token_spans(N, Nv, video_start)
    kf = k.float()
    tb = as_text_bias(text_bias, B, Nt)
    tb = None if tb is None else tb.to(q.device)[:, None, None, :]  # [Bb, 1, 1, T]
    pad = g.nk * g.block_k - Nv
    for qb in range(g.nq):
        r0, r1 = vs + qb * g.block_q, vs + min((qb + 1) * g.block_q, Nv)
        if row_stride == 1:
            qr, used, weight = q[:, :, r0:r1], r1 - r0, None
        else:
            o, used = sampled_rows(r1 - r0, row_stride, row_offset)
            qr, weight = q[:, :, r0 + o:r1:row_stride], (r1 - r0) / used
        s = torch.matmul(qr.float(), kf.transpose(-1, -2)) * scale  # [B, H, rows, N]
        if tb is not None:
            s[..., ts:ts + Nt] += tb
        p = torch.exp(s - torch.logsumexp(s, dim=-1, keepdim=True))[..., vs:vs + Nv]
        if pad:
            p = torch.nn.functional.pad(p, (0, pad))
        e = p.reshape(B, H, used, g.nk, g.block_k).sum(dim=(0, 2, 4))
        out[:, qb] += e if weight is None else e * weight
    return out


def block_row_counts(geometry: BlockGeometry) -> torch.Tensor:
    """[nq] number of query rows in each block (the last may be partial)."""
    g = geometry
    starts = torch.arange(g.nq) * g.block_q
    return (torch.clamp(starts + g.block_q, max=g.num_tokens) - starts).to(torch.float32)
