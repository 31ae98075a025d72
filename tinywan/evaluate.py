"""Shared by the demo and the fidelity benchmark: calibrate the tiny model, generate dense / sparse / with any
attention handler through the diffusers adapter, and compare clips (PSNR, SSIM)."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..adapters import diffusers_wan as adapter
from .. import calibration
from ..calibration import Calibrator, CalibrationSettings
from ..masks.sigmas import in_dense_window, step_fraction
from . import pipeline

HOOK_KW = {"vae_stride": (1, 1, 1)}  # pixel space: the "VAE" is the identity


def step_callback(hook, batch: int, guidance: float):
    """pipeline.generate's on_step for `batch` prompts sampled at `guidance`: starts each step on `hook` (a runner or
    calibrator) with the step's sigma, its fraction of the run and the batch rows of the conditional prompts."""
    rows = pipeline.positive_rows_for(2 * batch if guidance != 1.0 else batch, guidance)

    def on_step(i, sigma, n):
        hook.begin_step(sigma, step_fraction(i, n), rows)
    return on_step


def calibrate(model, captions, settings: CalibrationSettings, *, steps: int, seeds=None, guidance: float = 4.0,
              progress: Optional[Callable[[int], None]] = None, grid=None, frames: Optional[int] = None):
    """MaskBundle from dense runs of `captions` (one prompt each, conditional rows observed)."""
    grid = grid or model.cfg.grid(frames=frames)
    cal = Calibrator(model.signature(), grid, settings)
    try:
        return run_calibration(model, cal, captions, steps=steps, seeds=seeds, guidance=guidance, progress=progress,
                               frames=frames)
    finally:
        cal.close()


def run_calibration(model, cal: Calibrator, captions, *, steps: int, seeds=None, guidance: float = 4.0,
                    progress: Optional[Callable[[int], None]] = None, frames: Optional[int] = None,
                    stats_path=None):
    """calibration.calibrate over `captions` (prompt i with seeds[i]) on the tiny model: each prompt one dense
    denoising run through the diffusers adapter. stats_path: save the statistics there and resume from them."""
    seeds = list(seeds) if seeds is not None else list(range(100, 100 + len(captions)))
    sched = pipeline.sigma_schedule(steps)[:-1]
    with adapter.patch_calibrate(model.transformer, cal, **HOOK_KW) as hook:
        def run_prompt(prompt, calibrator):
            cap, seed = prompt
            calibrator.set_schedule(sched)
            pipeline.generate(model, [cap], [seed], steps=steps, guidance=guidance,
                              on_step=step_callback(hook, 1, guidance), progress=progress, frames=frames)
        return calibration.calibrate(run_prompt, list(zip(captions, seeds)), cal, stats_path=stats_path)


def generate(model, captions, seeds, *, steps: int, guidance: float = 4.0, mode: str = "dense", bundle=None,
             handler=None, progress=None, frames: Optional[int] = None):
    """(clips, attention seconds, attention calls). mode: "dense", "sparse" (bundle) or "handler" (a callable
    AttentionCall -> output, e.g. a baseline mask policy). On CUDA one untimed run of the same schedule goes first
    (JIT warm-up)."""
    timer = adapter.AttentionTimer()
    if mode == "dense":
        hook = adapter.patch_dense(model.transformer, timer=timer, **HOOK_KW)
    elif mode == "sparse":
        hook = adapter.patch_sparse(model.transformer, bundle, timer=timer, **HOOK_KW)
    elif mode == "handler":
        hook = adapter.WanAttentionHook(model.transformer, handler, timer=timer, **HOOK_KW)
    else:
        raise ValueError(f"mode must be 'dense', 'sparse' or 'handler', got {mode!r}")
    with hook:
        if model.transformer.device.type == "cuda":
            # One untimed run of the same schedule first: every sigma bucket (and so every kernel variant the run
            # meets, e.g. the repetition launch) compiles here, not inside the timed run.
            hook.timer = None
            pipeline.generate(model, captions, seeds, steps=steps, guidance=guidance,
                              on_step=step_callback(hook, len(captions), guidance), frames=frames)
            hook.timer = timer
        clips = pipeline.generate(model, captions, seeds, steps=steps, guidance=guidance,
                                  on_step=step_callback(hook, len(captions), guidance), progress=progress,
                                  frames=frames)
    return clips, timer.seconds, timer.calls


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of clips in [-1, 1] (peak-to-peak 2)."""
    mse = float(((a.double() - b.double()) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * math.log10(4.0 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM over frames and channels ([3, T, H, W] in [-1, 1]; 7x7 uniform window, the usual constants)."""
    x = ((a.float() + 1) / 2).permute(1, 0, 2, 3).reshape(-1, 1, *a.shape[-2:])
    y = ((b.float() + 1) / 2).permute(1, 0, 2, 3).reshape(-1, 1, *b.shape[-2:])
    c1, c2, w = 0.01 ** 2, 0.03 ** 2, 7
    mu_x, mu_y = F.avg_pool2d(x, w, 1), F.avg_pool2d(y, w, 1)
    sxx = F.avg_pool2d(x * x, w, 1) - mu_x ** 2
    syy = F.avg_pool2d(y * y, w, 1) - mu_y ** 2
    sxy = F.avg_pool2d(x * y, w, 1) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return float(s.mean())


def sampled_density(bundle, steps: int, *, dense_first: float = 0.0, dense_last: float = 0.0,
                    dense_cutoff: Optional[float] = None) -> float:
    """Mean fraction of key blocks computed over the steps of a `steps`-step run: per step its bucket's
    (layer, head) densities, heads the runner sends dense (above the cutoff) and dense steps counting as 1."""
    from ..kernels.runner import DENSE_CUTOFF
    cutoff = DENSE_CUTOFF if dense_cutoff is None else dense_cutoff
    dens = bundle.entry_densities()
    sig = pipeline.sigma_schedule(steps)
    out = []
    for i in range(steps):
        if in_dense_window(step_fraction(i, steps), dense_first, dense_last):
            out.append(1.0)
            continue
        d = dens[bundle.bucket_for_sigma(sig[i])]
        out.append(float(torch.where(d > cutoff, torch.ones_like(d), d).mean()))
    return sum(out) / len(out)
