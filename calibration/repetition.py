"""Repetition detection: heads whose query rows within a frame produce (near) the same attention output.

Choice of similarity (documented in docs/BENCHMARKS.md, Calibration): we do not compare attention ROWS (that needs
the N x N probabilities of many rows); we compare attention OUTPUTS, which the calibrator computes anyway (it returns
the dense output). Replacing row i by its anchor a(i) is exactly what the sparse kernel does for a repetitive head
(anchor rows are computed dense, the others copy them), so ||o_i - o_a(i)|| / ||o_i|| IS the error repetition
introduces on that row, not a proxy of it. Row similarity = 1 - that relative distance; a row is "repeated" when its
similarity >= gamma. The cost is O(N * D) per head and call: a gather and two norms.

Anchors: the plan is the same for every repetitive head: `anchors` in-frame positions spread over the (height,
width) grid by farthest-point sampling from the frame centre, each row mapped to its nearest anchor (Voronoi). A
data-driven plan per (step, layer, head) would have to be agreed across prompts and stored per entry; a fixed plan
is stored once by the bundle, and because the decision uses the measured error of THIS plan, a head is made
repetitive only where the plan is accurate (rows that cluster otherwise leave the head block-sparse, which is safe).

Decision (per step, layer, head, over the prompts): repetitive iff
  (1) the mean share of rows with similarity >= gamma is >= rep_min_fraction,
  (2) the relative output error of repetition is <= the estimated error of the head's block-sparse mask, estimated as
      the mass that mask's per-prompt selections dropped (first order: dropping mass d of a row changes its output by
      d * (o_kept - o_dropped), about d * ||o|| for rows whose far keys average out), and
  (3) repetition is cheaper: anchor rows per frame / frame rows < the mask's key-block density.
"""

from __future__ import annotations

import torch

from ..masks.geometry import TokenGrid


def anchor_plan(grid: TokenGrid, anchors: int):
    """(anchors [K] int64 in-frame positions, row_anchor [frame_tokens] int64 slot) for a frame of the grid."""
    Hh, Ww = grid.height, grid.width
    T = Hh * Ww
    K = max(1, min(int(anchors), T))
    hh, ww = torch.meshgrid(torch.arange(Hh, dtype=torch.float64), torch.arange(Ww, dtype=torch.float64),
                            indexing="ij")
    pos = torch.stack([hh.reshape(-1), ww.reshape(-1)], -1)  # [T, 2]
    centre = torch.tensor([(Hh - 1) / 2.0, (Ww - 1) / 2.0], dtype=torch.float64)
    first = int(torch.argmin(((pos - centre) ** 2).sum(-1)))
    chosen = [first]
    dist = ((pos - pos[first]) ** 2).sum(-1)
    for _ in range(1, K):
        nxt = int(torch.argmax(dist))  # first index on ties: deterministic
        chosen.append(nxt)
        dist = torch.minimum(dist, ((pos - pos[nxt]) ** 2).sum(-1))
    a = torch.tensor(sorted(chosen), dtype=torch.int64)
    d = ((pos[:, None, :] - pos[a][None, :, :]) ** 2).sum(-1)  # [T, K]
    row_anchor = torch.argmin(d, dim=-1)
    return a, row_anchor


def repetition_scores(out_bhld: torch.Tensor, grid: TokenGrid, anchors: torch.Tensor, row_anchor: torch.Tensor,
                      gamma: float, head_chunk: int = 8, video_start: int = 0):
    """Per head, for the given plan: (relative Frobenius error of repetition [H], share of rows with similarity >=
    gamma [H]), over video rows of all batch rows; the video rows start at sequence index video_start (the text
    token count when the text comes first). Device tensors; no host sync."""
    B, H, N, D = out_bhld.shape
    F, T = grid.frames, grid.frame_tokens
    dev = out_bhld.device
    anchors = anchors.to(dev)
    src = row_anchor.to(dev)
    err = torch.empty(H, dtype=torch.float32, device=dev)
    frac = torch.empty(H, dtype=torch.float32, device=dev)
    for h0 in range(0, H, head_chunk):
        h1 = min(H, h0 + head_chunk)
        o = out_bhld[:, h0:h1, video_start:video_start + F * T].float().reshape(B, h1 - h0, F, T, D)
        rep = o[:, :, :, anchors][:, :, :, src]  # [B, h, F, T, D]: each row's anchor output
        diff = (o - rep).norm(dim=-1)
        norm = o.norm(dim=-1)
        sim = 1.0 - diff / norm.clamp_min(1e-12)
        err[h0:h1] = diff.pow(2).sum(dim=(0, 2, 3)).sqrt() / norm.pow(2).sum(dim=(0, 2, 3)).sqrt().clamp_min(1e-12)
        frac[h0:h1] = (sim >= gamma).float().mean(dim=(0, 2, 3))
    return err, frac


def decide_repetitive(rep_err: torch.Tensor, rep_frac: torch.Tensor, bs_err: torch.Tensor,
                      mask_density: torch.Tensor, anchor_share: float, min_fraction: float) -> torch.Tensor:
    """[L, H] bool from mean scores over prompts (see the module docstring for the rule)."""
    return (rep_frac >= min_fraction) & (rep_err <= bs_err) & (anchor_share < mask_density)
