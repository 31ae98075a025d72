"""The two attention layouts hosts pass: (B, L, H*D) with a head count ("bld"), and (B, H, L, D) ("bhld")."""

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
