"""Sampling for the tiny model: flow matching, Euler steps over a shifted sigma schedule, batched CFG.

The loop calls `on_step(step, sigma, num_steps)` with the host-side sigma once per step, before the model runs;
adapters use it to pick the sigma bucket (no device sync per attention call). The batch is [conditional rows,
unconditional rows], so `positive_rows` is the first half.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch


def sigma_schedule(steps: int, shift: float = 3.0) -> list:
    """steps + 1 sigmas from 1 to 0, shifted toward the noisy end as Wan's flow-matching scheduler does."""
    out = []
    for i in range(steps + 1):
        s = 1.0 - i / steps
        out.append(shift * s / (1.0 + (shift - 1.0) * s))
    return out


def initial_noise(seeds, cfg, device="cpu", dtype=torch.float32, frames=None) -> torch.Tensor:
    """One noise clip per seed from a CPU generator, so dense and sparse runs on any device start identically."""
    clips = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        clips.append(torch.randn(3, frames or cfg.frames, cfg.size, cfg.size, generator=g))
    return torch.stack(clips).to(device=device, dtype=dtype)


@torch.no_grad()
def generate(model, captions, seeds, *, steps: int = 20, guidance: float = 4.0, shift: float = 3.0,
             on_step: Optional[Callable] = None, progress: Optional[Callable] = None,
             frames: Optional[int] = None) -> torch.Tensor:
    """Clips [B, 3, T, S, S] in [-1, 1] for the captions; `frames` (a multiple of the temporal patch) makes
    shorter clips than the model was trained on (tests)."""
    device = next(model.parameters()).device
    dtype = next(model.transformer.parameters()).dtype
    B = len(captions)
    # The latent stays float32 across steps (Euler updates in bfloat16 would lose the small late-step moves).
    x = initial_noise(seeds, model.cfg, device, torch.float32, frames=frames)
    cond = model.text(list(captions), device).to(dtype)
    uncond = model.text([""] * B, device).to(dtype)
    context = torch.cat([cond, uncond]) if guidance != 1.0 else cond
    sig = sigma_schedule(steps, shift)
    for i in range(steps):
        s, s_next = sig[i], sig[i + 1]
        if on_step is not None:
            on_step(i, s, steps)
        xin = (torch.cat([x, x]) if guidance != 1.0 else x).to(dtype)
        t = torch.full((xin.shape[0],), s * 1000.0, device=device, dtype=torch.float32)
        v = model.transformer(xin, t, context, return_dict=False)[0].float()
        if guidance != 1.0:
            vc, vu = v.chunk(2)
            v = vu + guidance * (vc - vu)
        x = x + (s_next - s) * v
        if progress is not None:
            progress(1)
    return x.clamp(-1.0, 1.0)


def positive_rows_for(batch_rows: int, guidance: float):
    """Rows of the model batch that carry the conditional prompt."""
    return list(range(batch_rows // 2)) if guidance != 1.0 else None
