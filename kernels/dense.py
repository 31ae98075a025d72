"""The fastest dense attention available, for fallbacks: cuDNN SDPA on CUDA where it exists, else SDPA's default."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .layouts import token_spans
from .text_bias import as_text_bias, full_key_bias

_CUDNN_OK: dict = {}


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                    text_bias: Optional[torch.Tensor] = None, video_start: int = 0) -> torch.Tensor:
    """(B, H, L, D) in, (B, H, L, D) out. text_bias ((T,), (1, T) or (B, T), kernels/text_bias.py) is added to the
    scores of the T text keys, through an SDPA key-padding mask (Bb, 1, 1, L): the last T keys, or the first T
    when video_start > 0 (text before the video: video_start must then be T; kernels/layouts.py token_spans)."""
    mask = None
    if text_bias is not None:
        T, L = text_bias.shape[-1], k.shape[2]
        if T > L:
            raise ValueError(f"text_bias covers {T} keys, the call has only {L}")
        vs, _, _ = token_spans(L, L - T, video_start)
        tb = as_text_bias(text_bias, q.shape[0], T, dtype=q.dtype)
        if tb is not None:
            mask = full_key_bias(tb, L - T, text_first=vs > 0)[:, None, None, :]
    if q.is_cuda:
        # SDPA's default dispatch picked flash (about half cuDNN's speed) at Wan shapes on Hopper (H100, H200):
        # ask for cuDNN.
        # Flash takes no mask; with one, SDPA moves on to cuDNN or memory-efficient attention itself.
        key = (q.device.index, mask is not None)
        if _CUDNN_OK.get(key, True):
            try:
                from torch.nn.attention import SDPBackend, sdpa_kernel
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                  SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], set_priority=True):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
            except (RuntimeError, TypeError):
                _CUDNN_OK[key] = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
