"""Synthetic attention with planted structure, for tests and benchmarks of the calibrator (a test fixture: bench/
scripts put tests/ on sys.path to import it).

q/k are built so that the attention of each head has a known shape over a (frames, height, width) token grid:
  "local"   3D window: logits -beta * |p_i - p_j|^2 over (t, h, w)
  "stripes" temporal stripes: the same window over (h, w) only, so every frame's same place is attended
  "repeat"  repetitive: every row of a frame has the same query (its frame's), so a frame's rows are identical
  "global"  the 3D window plus a few global key columns that every row attends strongly
Each "prompt" adds its own noise to q and k and draws its own v; `sigma` sharpens the windows as it falls, so steps
differ the way real schedules do (more local late). With logits written directly, calls use scale = 1.
"""

from __future__ import annotations

import math

import torch

from calibatt.masks.geometry import TokenGrid

KINDS = ("local", "stripes", "repeat", "global")


def token_positions(grid: TokenGrid) -> torch.Tensor:
    t, h, w = torch.meshgrid(torch.arange(grid.frames), torch.arange(grid.height), torch.arange(grid.width),
                             indexing="ij")
    return torch.stack([t.reshape(-1), h.reshape(-1), w.reshape(-1)], -1).to(torch.float64)


def global_columns(grid: TokenGrid, count: int = 4) -> torch.Tensor:
    """Token indices of the planted global key columns (spread over the middle frame)."""
    mid = grid.frames // 2
    T = grid.frame_tokens
    return mid * T + torch.linspace(0, T - 1, count).round().long()


def planted_layer(grid: TokenGrid, kinds, head_dim: int, *, prompt: int, layer: int, sigma: float = 1.0,
                  noise: float = 0.35, beta: float = 0.6, global_logit: float = 0.0, dtype=torch.float32,
                  extra_global: bool = False):
    """(q, k, v) as (1, H, N, D) for one layer; N = video + text tokens of the grid.

    extra_global: plant one more global column (in the last frame) that only some prompts have (vote tests)."""
    if head_dim < 8:
        raise ValueError("head_dim must be >= 8 for the planted features")
    g = torch.Generator().manual_seed(1_000_003 * (prompt + 1) + 7919 * layer)
    gs = torch.Generator().manual_seed(424242 + layer)  # structure shared by all prompts
    pos = token_positions(grid)
    Nv, Nt = grid.video_tokens, grid.text_tokens
    N = Nv + Nt
    H, D = len(kinds), head_dim
    sharp = beta * (1.0 + 1.0 / (1.0 + float(sigma)))  # sharper windows at low sigma
    q = torch.zeros(H, N, D, dtype=torch.float64)
    k = torch.zeros(H, N, D, dtype=torch.float64)
    cols = global_columns(grid)
    if extra_global:
        cols = torch.cat([cols, torch.tensor([Nv - 1 - grid.width // 2])])
    for h, kind in enumerate(kinds):
        if kind in ("local", "stripes", "global"):
            p = pos if kind != "stripes" else pos * torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
            a = math.sqrt(2.0 * sharp)
            # q_i . k_j = -sharp * |p_i - p_j|^2 + sharp * |p_i|^2: a window around i (the last term is per row).
            q[h, :Nv, 0:3] = a * p
            q[h, :Nv, 3] = 1.0
            k[h, :Nv, 0:3] = a * p
            k[h, :Nv, 3] = -sharp * (p ** 2).sum(-1)
            if kind == "global":
                # Global columns score the row's own peak plus global_logit, wherever the row is.
                q[h, :Nv, 4] = sharp * (p ** 2).sum(-1) + global_logit
                k[h, cols] = 0.0
                k[h, cols, 4] = 1.0
        elif kind == "repeat":
            frame_q = torch.randn(grid.frames, D, generator=gs, dtype=torch.float64) * 0.6
            q[h, :Nv] = frame_q.repeat_interleave(grid.frame_tokens, dim=0)
            k[h, :Nv] = torch.randn(Nv, D, generator=gs, dtype=torch.float64) * 0.6
        else:
            raise ValueError(f"unknown planted head kind {kind!r}; expected one of {KINDS}")
    # Per-prompt noise on the free dimensions, so prompts differ; per frame (not per row) for repetitive heads.
    rep = torch.tensor([kind == "repeat" for kind in kinds])
    qn = noise * torch.randn(H, Nv, D - 5, generator=g, dtype=torch.float64)
    frame_noise = noise * torch.randn(H, grid.frames, D - 5, generator=g, dtype=torch.float64)
    qn[rep] = frame_noise[rep].repeat_interleave(grid.frame_tokens, dim=1)
    q[:, :Nv, 5:] += qn
    k[:, :Nv, 5:] += noise * torch.randn(H, Nv, D - 5, generator=g, dtype=torch.float64)
    q[rep, :Nv] += 0.003 * torch.randn(int(rep.sum()), Nv, D, generator=g, dtype=torch.float64)
    if Nt:
        q[:, Nv:] = 0.5 * torch.randn(H, Nt, D, generator=g, dtype=torch.float64)
        k[:, Nv:] = 0.5 * torch.randn(H, Nt, D, generator=g, dtype=torch.float64)
    v = torch.randn(H, N, D, generator=g, dtype=torch.float64)
    return q[None].to(dtype), k[None].to(dtype), v[None].to(dtype)


def sparse_error(bundle, qkv, prompt: int, sigmas, layers: int) -> float:
    """Mean relative error of the bundle's sparse attention (the reference) against dense attention, over the
    given steps and layers of one synthetic prompt; qkv(prompt, layer, sigma) -> (q, k, v) with scale 1."""
    from calibatt.kernels.attention.naive import sparse_attention_reference

    errs = []
    for s in sigmas:
        sl = bundle.skip_lists(bundle.bucket_for_sigma(s))
        for layer in range(layers):
            q, k, v = (t.double() for t in qkv(prompt, layer, s))
            dense = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
            out = sparse_attention_reference(q, k, v, sl.layer(layer), scale=1.0)
            errs.append(float((out - dense).norm() / dense.norm()))
    return sum(errs) / len(errs)
