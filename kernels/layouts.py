"""The two attention layouts hosts pass: (B, L, H*D) with a head count ("bld"), and (B, H, L, D) ("bhld"); and
where the video and the text tokens of a joint-attention sequence sit (`token_spans`)."""

from __future__ import annotations

import torch

LAYOUTS = ("bld", "bhld")


def to_bhld(x: torch.Tensor, layout: str, heads: int | None = None) -> torch.Tensor:
    """A (B, H, L, D) view of x (no copy)."""
    if layout == "bhld":
        if x.dim() != 4:
            raise ValueError(f"layout 'bhld' expects a 4-D tensor, got shape {tuple(x.shape)}")
        return x
    if layout == "bld":
        if x.dim() != 3 or not heads or x.shape[-1] % heads:
            raise ValueError(f"layout 'bld' expects (B, L, heads*D) with heads given, got {tuple(x.shape)}, "
                             f"heads={heads}")
        B, L, C = x.shape
        return x.view(B, L, heads, C // heads).transpose(1, 2)
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def from_bhld(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Back to the caller's layout; 'bld' returns a contiguous (B, L, H*D) tensor."""
    if layout == "bhld":
        return x
    B, H, L, D = x.shape
    return x.transpose(1, 2).reshape(B, L, H * D)


def token_spans(seq_len: int, video_tokens: int, video_start: int = 0) -> tuple:
    """(video_start, text_start, text_tokens) of a sequence of seq_len tokens holding video_tokens video tokens
    from video_start on, the rest being text in one run on the other side: video_start 0 puts the text (if any)
    after the video, video_start = seq_len - video_tokens before it (TokenGrid.video_start gives the right value).
    Host ints only: no sync."""
    seq_len, video_tokens, video_start = int(seq_len), int(video_tokens), int(video_start)
    text = seq_len - video_tokens
    if text < 0:
        raise ValueError(f"sequence of {seq_len} tokens does not cover the {video_tokens} masked video tokens")
    if video_start == 0:
        return 0, video_tokens, text
    if video_start == text:
        return video_start, 0, text
    raise ValueError(f"video_start {video_start} does not fit a sequence of {seq_len} tokens with {video_tokens} "
                     f"video tokens: pass 0 (text after the video) or {text} (the text tokens first), e.g. "
                     "TokenGrid.video_start of the call's grid")


def as_layout(x: torch.Tensor, layout: str, heads: int | None = None) -> torch.Tensor:
    """x, given in either layout, in `layout`, told apart by its rank (4-D is "bhld", 3-D "bld"): for outputs of
    backends that do not say which they return (ComfyUI's batch-split paths ignore skip_output_reshape)."""
    if layout == "bhld" and x.dim() == 3:
        return to_bhld(x, "bld", heads)
    if layout == "bld" and x.dim() == 4:
        return from_bhld(x, "bld")
    return x
