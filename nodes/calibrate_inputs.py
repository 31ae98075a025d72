"""Calibrate Sparse Attention's inputs -> calibration settings and (positive, negative) prompt pairs.

No ComfyUI import: CONDITIONING is ComfyUI's plain list of [tensor, dict] entries, and the CLIP is only asked to
tokenize and encode.
"""

from __future__ import annotations

import re

import torch

from ..calibration.settings import CUSTOM, CalibrationSettings

EXTENSION = ".safetensors"
# The stem's limit: the file name, its temp file ".<name>.<8 characters>.partial" and room to spare stay well
# inside the 255 bytes file systems allow (the issue: a ~225-character name failed with ENAMETOOLONG at the save,
# after the whole calibration).
MAX_NAME = 128
_ALLOWED = re.compile(r"[A-Za-z0-9._-]")
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


def bundle_file_name(filename: str) -> str:
    """The file name Calibrate Sparse Attention writes for `filename` (".safetensors" added), or ValueError saying
    what to change: checked before sampling, so a name the file system refuses never costs a calibration."""
    stem = str(filename).strip()
    if stem.lower().endswith(EXTENSION):
        stem = stem[: -len(EXTENSION)]
    where = "Calibrate Sparse Attention: output file name"
    if not stem:
        raise ValueError(f"{where} is empty; use letters, digits, '-', '_' and '.', e.g. wan21_t2v_832x480x81")
    bad = sorted({c for c in stem if not _ALLOWED.fullmatch(c)})
    if bad:
        suggestion = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "bundle"
        raise ValueError(f"{where} {filename!r} has characters a bundle name cannot use "
                         f"({' '.join(repr(c) for c in bad[:8])}); use letters, digits, '-', '_' and '.', "
                         f"e.g. {suggestion[:MAX_NAME]!r}")
    if len(stem) > MAX_NAME:
        raise ValueError(f"{where} is {len(stem)} characters long; use at most {MAX_NAME}")
    if stem.startswith(".") or stem.endswith("."):
        raise ValueError(f"{where} {filename!r} starts or ends with '.'; such files are hidden or refused by some "
                         "systems, remove the dot")
    if stem.split(".")[0].lower() in _RESERVED:
        raise ValueError(f"{where} {filename!r} is a reserved device name on Windows; choose another name")
    return stem + EXTENSION


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
                  steps: int, sampler_name: str, selection: str = "row"):
    custom = preset == CUSTOM  # eps_* are the schedule; with a named preset they are ignored
    return CalibrationSettings(preset=preset,
                               A=eps_A if custom else None, C=eps_C if custom else None, k=eps_k if custom else None,
                               rho=float(rho), block_q=int(block_size), block_k=int(block_size), seed=int(seed),
                               steps=int(steps), sampler=str(sampler_name), selection=str(selection))
