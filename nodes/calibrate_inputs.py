"""Calibrate Sparse Attention's inputs -> calibration settings and (positive, negative) prompt pairs.

No ComfyUI import: CONDITIONING is ComfyUI's plain list of [tensor, dict] entries, and the CLIP is only asked to
tokenize and encode.
"""

from __future__ import annotations

import torch

from ..calibration.settings import CalibrationSettings

PRESETS_CUSTOM = "custom"


def _encode(clip, text: str):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def _zero_like(cond):
    """ComfyUI's ConditioningZeroOut: the usual empty negative when no text encoder is at hand."""
    out = []
    for c, d in cond:
        d = dict(d)
        if d.get("pooled_output") is not None:
            d["pooled_output"] = torch.zeros_like(d["pooled_output"])
        out.append([torch.zeros_like(c), d])
    return out


def prompt_conditionings(prompts: str, clip=None, negative_prompt: str = "", positive=None, negative=None):
    """-> list of (positive, negative) CONDITIONING pairs, one per calibration prompt.

    Text prompts (one per non-empty line) need a CLIP. Each entry of a connected `positive` CONDITIONING is one
    more prompt (so prompts encoded elsewhere, or combined with Conditioning (Combine), calibrate too). The
    negative is the connected `negative`, else `negative_prompt` through the CLIP, else zeros.
    """
    texts = [line.strip() for line in (prompts or "").splitlines() if line.strip()]
    if texts and clip is None:
        raise ValueError("Calibrate Sparse Attention: the prompts need a text encoder; connect the CLIP input "
                         "(or connect precomputed positive CONDITIONING and leave the prompts empty)")
    positives = [_encode(clip, t) for t in texts]
    if positive is not None:
        positives += [[entry] for entry in positive]
    if not positives:
        raise ValueError("Calibrate Sparse Attention: no calibration prompts; write one prompt per line "
                         "(the paper uses 16-64) or connect positive CONDITIONING")
    pairs = []
    shared_negative = negative
    if shared_negative is None and clip is not None:
        shared_negative = _encode(clip, negative_prompt or "")
    for pos in positives:
        pairs.append((pos, shared_negative if shared_negative is not None else _zero_like(pos)))
    return pairs


def make_settings(preset: str, eps_A: float, eps_C: float, eps_k: float, rho: float, block_size: int, seed: int,
                  steps: int, sampler_name: str):
    custom = preset == PRESETS_CUSTOM
    return CalibrationSettings(preset="balanced" if custom else preset,
                               A=eps_A if custom else None, C=eps_C if custom else None, k=eps_k if custom else None,
                               rho=float(rho), block_q=int(block_size), block_k=int(block_size), seed=int(seed),
                               steps=int(steps), sampler=str(sampler_name))
