"""What a ComfyUI video model looks like to the engine: its ModelSignature and the TokenGrid of a latent.

Plain functions over a plain dict (the model's detected config plus a few facts read off the diffusion model, see
comfy_glue.describe_model), so the mapping is testable without ComfyUI. A model this table does not know gives
None, and the patch node then leaves the model alone with a warning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

from ..masks import signatures
from ..masks.geometry import ModelSignature, TokenGrid


@dataclass(frozen=True)
class FamilyLayout:
    family: str  # ModelSignature.family
    patch: tuple  # latent voxels per token (t, h, w)
    vae_stride: tuple  # pixels per latent voxel (t, h, w)
    latent_channels: int
    joint_text: bool  # text tokens share the self-attention sequence with the video (always computed densely)
    bhld: bool  # the model passes (B, H, L, D) with skip_reshape
    # Where the text sits in self-attention when the family's code fixes it and hands the blocks nothing to read
    # it from; None: the router establishes it from the host's data per sampling run (nodes/routing.py).
    text_position: Optional[str] = None


# Wan 2.1 and the Wan 2.2 A14B experts share one architecture; the 5B TI2V model has a 48-channel latent and a
# 16x spatial VAE, which is what separates "wan22" here.
_WAN21 = FamilyLayout("wan21", (1, 2, 2), (4, 8, 8), 16, False, False)
_WAN22_5B = FamilyLayout("wan22", (1, 2, 2), (4, 16, 16), 48, False, False)
# Mochi's AsymmetricAttention builds q = cat([video, text cropped to the valid tokens]) in every ComfyUI with Mochi
# (0.3.64 and 0.19.3 carry the same file); its blocks get no mask, no img_slice and a RoPE table of the video
# only, so nothing at run time says where the text sits, and its code is the source.
_MOCHI = FamilyLayout("mochi", (1, 2, 2), (6, 8, 8), 12, True, True, "end")
# HunyuanVideo's order changed between ComfyUI versions (text last up to early 2026, text first since): read per
# sampling run from img_slice, the padding mask or the RoPE table.
_HUNYUAN = FamilyLayout("hunyuan", (1, 2, 2), (4, 8, 8), 16, True, True)
_LTXV = FamilyLayout("ltxv", (1, 1, 1), (8, 32, 32), 128, False, False)

# Wan variants whose self-attention sequence is exactly the video latent. The others add reference, motion or
# audio tokens to the sequence (or run extra VACE blocks that share block indices), so a bundle made for the
# video grid would not describe their calls.
WAN_SPARSE_TYPES = ("t2v", "i2v", "camera", "camera_2.2")


class UnsupportedModel(Exception):
    """The model is not one the package knows how to patch; the message says why (shown as a warning)."""


def family_layout(cfg: dict) -> FamilyLayout:
    image_model = cfg.get("image_model")
    if image_model == "wan2.1":
        model_type = cfg.get("model_type", "t2v")
        if model_type not in WAN_SPARSE_TYPES:
            raise UnsupportedModel(f"Wan variant '{model_type}' adds tokens or blocks beyond the video latent; "
                                   f"supported Wan variants: {', '.join(WAN_SPARSE_TYPES)}")
        layout = _WAN22_5B if signatures.wan_family(_wan_out_channels(cfg)) == "wan22" else _WAN21
        patch = tuple(int(p) for p in cfg.get("patch_size", layout.patch))
        # ComfyUI's detection fixes 1x2x2; a file's metadata config may set another, which the model then uses.
        return layout if patch == layout.patch else replace(layout, patch=patch)
    if image_model == "mochi_preview":
        return _MOCHI
    if image_model == "hunyuan_video":
        patch = tuple(cfg.get("patch_size", (1, 2, 2)))
        if len(patch) != 3:
            raise UnsupportedModel("this HunyuanVideo checkpoint is an image model (2-D patches)")
        if patch != _HUNYUAN.patch:
            # HunyuanImage 2.1's refiner shares the architecture with 1x1x1 patches; the grid would be wrong.
            raise UnsupportedModel(f"this HunyuanVideo-type checkpoint uses {'x'.join(map(str, patch))} patches "
                                   f"(HunyuanVideo: 1x2x2)")
        return _HUNYUAN
    if image_model == "ltxv":
        return _LTXV
    raise UnsupportedModel(f"model '{image_model}' is not a supported video model "
                           f"(supported: Wan 2.1/2.2, Mochi, HunyuanVideo, LTX-Video)")


def _wan_out_channels(cfg: dict) -> int:
    return int(cfg.get("out_dim", 16))


def signature_from_config(cfg: dict) -> ModelSignature:
    """cfg: ComfyUI's detected unet_config, with 'num_layers', 'num_heads' and 'dim' filled in from the loaded
    diffusion model where the config leaves them implicit (see comfy_glue.describe_model). The signature comes from
    the family's builder in masks/signatures.py, which the diffusers adapter calls too, so bundles move between
    the hosts."""
    layout = family_layout(cfg)
    layers, heads, dim = int(cfg["num_layers"]), int(cfg["num_heads"]), int(cfg["dim"])
    if heads <= 0 or dim % heads:
        raise UnsupportedModel(f"hidden size {dim} is not a multiple of {heads} heads")
    shape = {"num_layers": layers, "num_heads": heads, "head_dim": dim // heads}
    if layout.family in ("wan21", "wan22"):
        model_type = str(cfg.get("model_type", "t2v"))
        # ComfyUI's detection says "i2v" / "camera" exactly when the file has the CLIP image projection (img_emb),
        # "camera" / "camera_2.2" when it has the camera-control adapter.
        return signatures.wan(**shape, in_channels=int(cfg.get("in_dim", layout.latent_channels)),
                              out_channels=_wan_out_channels(cfg), patch=layout.patch,
                              image_embedding=model_type in ("i2v", "camera"),
                              camera_control=model_type in ("camera", "camera_2.2"))
    if layout.family == "hunyuan":
        return signatures.hunyuan_video(**shape, in_channels=int(cfg.get("in_channels", 16)),
                                        double_blocks=int(cfg.get("depth", 0)))
    if layout.family == "mochi":
        return signatures.mochi(**shape, in_channels=int(cfg.get("in_channels", layout.latent_channels)))
    return signatures.ltxv(**shape)


def grid_from_latent(layout: FamilyLayout, latent_shape, text_tokens: int = 0) -> TokenGrid:
    """Token grid of a latent [B, C, T, H, W]; ComfyUI pads each axis up to a whole patch."""
    if len(latent_shape) != 5:
        raise ValueError(f"expected a video latent [B, C, T, H, W], got shape {tuple(latent_shape)}")
    T, H, W = (int(x) for x in latent_shape[2:])
    pt, ph, pw = layout.patch
    return TokenGrid(frames=math.ceil(T / pt), height=math.ceil(H / ph), width=math.ceil(W / pw),
                     patch=layout.patch, text_tokens=text_tokens,
                     text_position="end" if text_tokens else "none", vae_stride=layout.vae_stride)


def latent_shape_for(layout: FamilyLayout, width: int, height: int, length: int, batch: int = 1) -> list:
    """The empty latent ComfyUI's own Empty*LatentVideo nodes make for this family at width x height x length."""
    st, sh, sw = layout.vae_stride
    return [batch, layout.latent_channels, (int(length) - 1) // st + 1, int(height) // sh, int(width) // sw]


def video_grid_for_check(model_grid: TokenGrid, bundle_grid: TokenGrid) -> TokenGrid:
    """Joint-attention models carry a prompt-dependent number of text tokens, so a fit check compares the video
    part only: take the text layout from the bundle."""
    if bundle_grid.text_tokens == model_grid.text_tokens:
        return model_grid
    return TokenGrid(model_grid.frames, model_grid.height, model_grid.width, model_grid.patch, model_grid.order,
                     bundle_grid.text_tokens, bundle_grid.text_position, model_grid.vae_stride)


def extra_sequence_inputs(layout: FamilyLayout, conds: dict) -> list:
    """Names of the model inputs present in `conds` (one model evaluation's conditioning) that put tokens into
    self-attention beyond the video latent and the text: HunyuanVideo's reference latent (I2V "custom"
    guidance) is prepended to the video tokens, so a bundle for the video grid does not describe those calls."""
    if layout.family == "hunyuan":
        return [name for name in ("ref_latent",) if conds.get(name) is not None]
    return []


def layer_offset(layout: FamilyLayout, cfg: dict, block_type: Optional[str]) -> int:
    """HunyuanVideo numbers its single-stream blocks after its double-stream blocks in our layer index; ComfyUI's
    block_index restarts at 0 for each block type."""
    if layout.family == "hunyuan" and block_type == "single":
        return int(cfg.get("depth", 0))
    return 0
