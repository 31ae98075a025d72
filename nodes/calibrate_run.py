"""Calibrate Sparse Attention: sample every calibration prompt with the statistics hook, then write the bundle.

The model is patched with the same router the sparse path uses, but its handler is the Calibrator, which records
block statistics on the positive CFG rows and returns dense attention, so sampling itself is unchanged. The
bundle is written once, atomically, after the last prompt: an interrupt leaves no file behind.
"""

from __future__ import annotations

import logging
import os

import torch

import comfy.model_management
import comfy.sample
import comfy.utils

from ..masks import BundleError
from ..masks.atomic import check_writable
from ..masks.bundle_limits import check_calibration_fits, estimated_file_bytes
from . import paths
from .calibrate_inputs import make_settings, prompt_conditionings
from .comfy_glue import describe_model, install
from .model_info import UnsupportedModel, family_layout, grid_from_latent, latent_shape_for, signature_from_config
from .preview import preview_images
from .routing import AttentionRouter

log = logging.getLogger("calibatt")

def calibrate_sparse_attention(model, *, prompts: str, width: int, height: int, length: int, steps: int, cfg: float,
                               sampler_name: str, scheduler: str, seed: int, preset: str, eps_A: float,
                               eps_C: float, eps_k: float, rho: float, filename: str, block_size: int = 128,
                               clip=None, negative_prompt: str = "", positive=None, negative=None, latent=None,
                               selection: str = "row"):
    """-> (MaskBundle, preview IMAGE, summary STRING); the bundle is saved in models/sparse_attention/."""
    from ..calibration import Calibrator, calibrate

    try:
        mcfg = describe_model(model)
        layout = family_layout(mcfg)
        signature = signature_from_config(mcfg)
    except UnsupportedModel as e:
        raise ValueError(f"Calibrate Sparse Attention: {e}") from None
    out_path = paths.output_path(filename)  # validate the name before hours of sampling
    settings = make_settings(preset, eps_A, eps_C, eps_k, rho, block_size, seed, steps, sampler_name, selection)
    pairs = prompt_conditionings(prompts, clip, negative_prompt, positive, negative)

    latent, noise_mask = _start_latent(model, layout, latent, width, height, length)
    grid = grid_from_latent(layout, latent.shape)
    _check_output(out_path, signature, grid, settings, int(steps))
    calibrator = Calibrator(signature, grid, settings)
    router = AttentionRouter(signature, layout, mcfg, handler=calibrator.observe, name="Calibrate Sparse Attention")

    def on_begin(_grid):
        calibrator.set_schedule(router.sample_sigmas)

    patched = install(model, router, mcfg, on_begin=on_begin)
    pbar = comfy.utils.ProgressBar(len(pairs) * int(steps))

    def on_step(step, x0, x, total_steps):
        pbar.update(1)
        comfy.model_management.throw_exception_if_processing_interrupted()

    def run_prompt(i, _calibrator):
        comfy.model_management.throw_exception_if_processing_interrupted()
        pos, neg = pairs[i]
        noise = comfy.sample.prepare_noise(latent, int(seed) + i)
        comfy.sample.sample(patched, noise, int(steps), float(cfg), sampler_name, scheduler, pos, neg, latent,
                            denoise=1.0, noise_mask=noise_mask, callback=on_step, disable_pbar=True,
                            seed=int(seed) + i)
        if router.routed == 0:
            raise RuntimeError("Calibrate Sparse Attention: no self-attention call reached the calibrator; "
                               "this model's attention path is not one the package recognises")

    def after_prompt(done, total):
        # The last one runs after the last prompt and before the masks are voted: a cancel there writes nothing.
        comfy.model_management.throw_exception_if_processing_interrupted()

    log.info("Calibrate Sparse Attention: %d prompts, %s, %d steps, blocks %d", len(pairs), grid.describe(),
             steps, block_size)
    try:
        # Prompt keys by position: conditionings have no stable text form, and this run resumes nothing.
        bundle = calibrate(run_prompt, range(len(pairs)), calibrator, keys=[f"prompt {i}" for i in range(len(pairs))],
                           progress=after_prompt, bundle_path=out_path)
    finally:
        calibrator.close()
    bundle.path = out_path
    log.info("Calibrate Sparse Attention: wrote %s (%s)", out_path, bundle.summary())
    return bundle, preview_images(bundle), bundle.summary()


def _check_output(out_path: str, signature, grid, settings, steps: int):
    """Before any sampling: the bundle this calibration makes fits the loader's limits, and its folder takes a
    file of about its size (created if missing, written to, enough free space)."""
    try:
        check_calibration_fits(signature.num_layers, signature.num_heads, grid.video_tokens, settings.block_q,
                               settings.block_k, steps, grid.frame_tokens, settings.anchors)
    except BundleError as e:
        raise ValueError(f"Calibrate Sparse Attention: {e.message}") from None
    nq, nk = -(-grid.video_tokens // settings.block_q), -(-grid.video_tokens // settings.block_k)
    folder = os.path.dirname(out_path)
    try:
        check_writable(folder, estimated_file_bytes(signature.num_layers, signature.num_heads, nq, nk, steps))
    except OSError as e:
        raise ValueError(f"Calibrate Sparse Attention: cannot write the bundle into {folder}: {e.strerror or e}; "
                         "free some space or make the folder writable, then queue again") from None


def _start_latent(model, layout, latent, width: int, height: int, length: int):
    """(samples, noise_mask) to calibrate on: the connected LATENT (its first batch entry; empty-latent channels
    fixed the way KSampler does), else an empty latent of width x height x length."""
    if latent is None:
        return torch.zeros(latent_shape_for(layout, width, height, length),
                           device=comfy.model_management.intermediate_device()), None
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not torch.is_tensor(samples) or samples.dim() != 5:
        raise ValueError("Calibrate Sparse Attention: the latent input must be a video LATENT ([batch, channels, "
                         "frames, height, width]), e.g. from EmptyHunyuanLatentVideo or Wan22ImageToVideoLatent")
    fix = getattr(comfy.sample, "fix_empty_latent_channels", None)  # absent in older ComfyUI
    samples = fix(model, samples[:1]) if fix is not None else samples[:1]
    mask = latent.get("noise_mask")
    if mask is not None:
        mask = mask[:1]
    return samples, mask
