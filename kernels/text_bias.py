"""Text key bias: an additive term on the attention scores of the TEXT keys only (joint attention).

HunyuanVideo pads its prompt to a fixed length and masks the padded text keys with a large negative additive mask
(a key-padding mask, the same for every query and head). The text tokens are one run, after the video (ComfyUI
0.3.x) or before it (ComfyUI 0.19+; kernels/layouts.py token_spans), and every kernel computes them densely, so
the mask reduces to one bias per (batch row, text key), in the text keys' own order wherever they sit: shape
(Bb, T) with Bb = 1 (shared by the batch) or B. Video keys never get a bias: a host mask whose video part is not
zero cannot use the sparse path (nodes/routing.py checks that).

Everything here is shape logic on tensors already on the device: no host sync.
"""

from __future__ import annotations

from typing import Optional

import torch


def as_text_bias(bias: Optional[torch.Tensor], batch: int, text_tokens: int, *,
                 dtype: torch.dtype = torch.float32) -> Optional[torch.Tensor]:
    """The bias as a (Bb, text_tokens) tensor of `dtype` (Bb = 1 or batch), or None (no bias, or no text).

    Accepts (T,), (1, T) or (B, T); a boolean tensor means True = attend (False becomes -inf)."""
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"text_bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if bias.dim() == 1:
        bias = bias[None]
    if bias.dim() != 2 or bias.shape[-1] != text_tokens or bias.shape[0] not in (1, batch):
        raise ValueError(f"text_bias of shape {tuple(bias.shape)} does not fit {batch} batch rows and {text_tokens} "
                         f"text tokens: pass (T,), (1, T) or (B, T) with T = {text_tokens} (one value per text key)")
    if text_tokens == 0:
        return None
    if bias.dtype == torch.bool:
        return torch.zeros(bias.shape, dtype=dtype, device=bias.device).masked_fill_(~bias, float("-inf"))
    if not bias.is_floating_point():
        raise ValueError(f"text_bias must be floating point (additive) or bool (True = attend), got {bias.dtype}")
    return bias.to(dtype)


def full_key_bias(text_bias: torch.Tensor, video_tokens: int, text_first: bool = False) -> torch.Tensor:
    """(Bb, video_tokens + T): zeros on the video keys and the text bias on the text keys, which come after the
    video keys, or before them when text_first (same dtype and device)."""
    zeros = torch.zeros(text_bias.shape[0], video_tokens, dtype=text_bias.dtype, device=text_bias.device)
    return torch.cat([text_bias, zeros] if text_first else [zeros, text_bias], dim=-1)


def select_rows(text_bias: Optional[torch.Tensor], rows) -> Optional[torch.Tensor]:
    """The bias of some batch rows (a shared bias, Bb = 1, stays as it is)."""
    if text_bias is None or rows is None or text_bias.dim() < 2 or text_bias.shape[0] == 1:
        return text_bias
    rows = [int(r) for r in rows]
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return text_bias[rows[0]:rows[0] + len(rows)]
    return text_bias.index_select(0, torch.as_tensor(rows, dtype=torch.long, device=text_bias.device))
