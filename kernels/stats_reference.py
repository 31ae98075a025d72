"""Plain-PyTorch block energy: per (head, query block, key block) attention probability mass, summed.

Never materialises N x N: it walks query blocks, computing one [B, H, block_q, N] score slab at a time (the first
pass gives each row's log-sum-exp over all keys, text included; the second sums exp(s - lse) per key block).
This is the specification the Triton statistics kernel must match.
"""

from __future__ import annotations

import math

import torch

from ..masks.skiplists import BlockGeometry


def block_energy_reference(q: torch.Tensor, k: torch.Tensor, geometry: BlockGeometry, *, scale: float | None = None,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """q, k: (B, H, N, D), N >= geometry.num_tokens (trailing tokens are text: they count in the softmax
    normaliser but get no column). Returns out [H, nq, nk] float32 with out += sum over batch and the query rows
    of each block of the probability mass that lands in each key block. Divide by (B * rows in the block) for the
    mean mass; rows of one query block then sum to (1 - their mass on text)."""
    B, H, N, D = q.shape
    g = geometry
    Nv = g.num_tokens
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if out is None:
        out = torch.zeros(H, g.nq, g.nk, dtype=torch.float32, device=q.device)
    if out.shape != (H, g.nq, g.nk) or out.dtype != torch.float32:
        raise ValueError(f"out must be float32 [{H}, {g.nq}, {g.nk}], got {out.dtype} {tuple(out.shape)}")
    kf = k.float()
    pad = g.nk * g.block_k - Nv
    for qb in range(g.nq):
        r0, r1 = qb * g.block_q, min((qb + 1) * g.block_q, Nv)
        s = torch.matmul(q[:, :, r0:r1].float(), kf.transpose(-1, -2)) * scale  # [B, H, rows, N]
        p = torch.exp(s - torch.logsumexp(s, dim=-1, keepdim=True))[..., :Nv]
        if pad:
            p = torch.nn.functional.pad(p, (0, pad))
        out[:, qb] += p.reshape(B, H, r1 - r0, g.nk, g.block_k).sum(dim=(0, 2, 4))
    return out


def block_row_counts(geometry: BlockGeometry) -> torch.Tensor:
    """[nq] number of query rows in each block (the last may be partial)."""
    g = geometry
    starts = torch.arange(g.nq) * g.block_q
    return (torch.clamp(starts + g.block_q, max=g.num_tokens) - starts).to(torch.float32)
