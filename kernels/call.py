"""AttentionCall: everything a host knows at one self-attention call, normalised once.

Hosts (the ComfyUI override, the diffusers processor) build it; the calibrator and the sparse runner consume it.
Neither of those ever looks at host objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..masks.geometry import TokenGrid
from .layouts import from_bhld, to_bhld
from .text_bias import select_rows


@dataclass
class AttentionCall:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    layout: str  # "bld" (B, L, H*D) or "bhld" (B, H, L, D)
    heads: int
    layer: int
    sigma: float  # current noise level (host-side float, read once per step, not per call)
    grid: TokenGrid  # token grid of this call (text_tokens and text_position included: where the video starts)
    # Batch rows that belong to the positive (conditional) prompt; None = all rows are positive.
    positive_rows: Optional[Sequence[int]] = None
    scale: Optional[float] = None
    # The host's dense attention for this call, returning the host's layout; used for fallbacks.
    dense: Optional[Callable[[], torch.Tensor]] = None
    # Additive bias on the scores of the text keys (after or before the video, as the grid says), (T,), (1, T) or
    # (B, T) in the text keys' order (kernels/text_bias.py): a key-padding mask such as HunyuanVideo's. Every path
    # (sparse, dense fallback, statistics) applies it; `dense` must apply the same mask.
    text_bias: Optional[torch.Tensor] = None

    def check(self) -> tuple:
        """(B, H, N, D) after checking the call is one self-attention call its grid describes: q, k and v of one
        shape in the layout, a layer index >= 0, and N = the grid's video + text tokens (an N the grid does not
        account for would make extra video tokens look like text). ValueError naming the mismatch otherwise."""
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"AttentionCall.layer must be an integer >= 0, got {self.layer!r}")
        if not isinstance(self.grid, TokenGrid):
            raise ValueError(f"AttentionCall.grid must be a TokenGrid, got {type(self.grid).__name__}")
        q, k, v = self.bhld()
        if k.shape != q.shape or v.shape != q.shape:
            raise ValueError(f"self-attention needs q, k and v of one shape; got {tuple(q.shape)}, {tuple(k.shape)}, "
                             f"{tuple(v.shape)} as (batch, heads, tokens, head_dim)")
        B, H, N, D = q.shape
        g = self.grid
        if N != g.total_tokens:
            raise ValueError(f"attention call has {N} tokens but its grid describes {g.total_tokens} "
                             f"({g.frames}x{g.height}x{g.width} = {g.video_tokens} video + {g.text_tokens} text, "
                             f"text_position '{g.text_position}'); pass the grid of this call")
        return B, H, N, D

    def bhld(self):
        """(q, k, v) as (B, H, L, D) views."""
        return tuple(to_bhld(t, self.layout, self.heads) for t in (self.q, self.k, self.v))

    def to_host_layout(self, out_bhld: torch.Tensor) -> torch.Tensor:
        return from_bhld(out_bhld, self.layout)

    @property
    def video_start(self) -> int:
        """Sequence index of the first video token: 0, or the text token count when the text comes first. Every
        engine path takes it as an offset, so text-first calls need no copy of q, k, v."""
        return self.grid.video_start

    @property
    def seq_len(self) -> int:
        return self.q.shape[1] if self.layout == "bld" else self.q.shape[2]

    def text_bias_for(self, rows: Optional[Sequence[int]]) -> Optional[torch.Tensor]:
        """The text bias of these batch rows (None = all rows), e.g. the positive rows the statistics use."""
        return select_rows(self.text_bias, rows)
