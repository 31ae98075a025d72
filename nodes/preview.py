"""Preview images of a mask bundle as a ComfyUI IMAGE batch (float32 [B, H, W, 3] in 0..1).

Image 0: density heat map, one row per layer (top = first layer), one column per calibrated step (left = noisiest);
dark = few key blocks computed, bright = dense. Image 1: the block mask of one head (query blocks down, key
blocks across; white = computed), by default the middle layer's first head at the middle step.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..masks.bundle import MaskBundle

# A perceptually ordered dark-blue -> teal -> yellow ramp (close to viridis) so density reads at a glance.
_RAMP = torch.tensor([[0.267, 0.005, 0.329], [0.230, 0.322, 0.546], [0.128, 0.567, 0.551],
                      [0.369, 0.789, 0.383], [0.993, 0.906, 0.144]], dtype=torch.float32)


def colorize(values: torch.Tensor) -> torch.Tensor:
    """[h, w] in 0..1 -> [h, w, 3] colours on the ramp."""
    v = values.float().clamp(0, 1) * (len(_RAMP) - 1)
    lo = v.floor().long().clamp(max=len(_RAMP) - 2)
    frac = (v - lo.float())[..., None]
    return _RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac


def _fit(img: torch.Tensor, size: int) -> torch.Tensor:
    """[h, w, 3] -> [size, size, 3], nearest neighbour so single blocks stay crisp."""
    x = img.permute(2, 0, 1)[None]
    return F.interpolate(x, size=(size, size), mode="nearest")[0].permute(1, 2, 0).contiguous()


def density_map(bundle: MaskBundle) -> torch.Tensor:
    """[layers, steps] mean key-block density over heads (repetitive heads at their anchor share)."""
    dens = bundle.entry_densities().mean(dim=2)  # [B, L]
    idx = torch.tensor(bundle.step_bucket, dtype=torch.long)
    return dens[idx].t().float()  # [L, steps]


def head_mask(bundle: MaskBundle, layer: Optional[int] = None, head: int = 0, step: Optional[int] = None):
    layer = bundle.num_layers // 2 if layer is None else layer
    step = len(bundle.step_bucket) // 2 if step is None else step
    bucket = bundle.step_bucket[step]
    return bundle.block_masks(bucket, [layer])[0, head].float()  # [nq, nk]


def preview_images(bundle: MaskBundle, size: int = 384, layer: Optional[int] = None, head: int = 0,
                   step: Optional[int] = None) -> torch.Tensor:
    heat = _fit(colorize(density_map(bundle)), size)
    mask = head_mask(bundle, layer, head, step)
    mask_img = _fit(mask[..., None].expand(*mask.shape, 3), size)
    return torch.stack([heat, mask_img]).clamp(0, 1).float()
