"""Model signatures, one builder per model family, for every host.

A bundle fits a model when their signatures are equal, so a bundle only moves between hosts (ComfyUI, diffusers)
if each host builds the same signature for the same checkpoint. Hosts therefore never assemble a ModelSignature
themselves: they read the facts below off the checkpoint (its config or its weights' shapes) and call the family's
builder here. A fact enters a signature only if every host that serves the family can read it off the checkpoint.

What separates checkpoints, per family (besides layers, heads and head_dim, which fix the attention's shape):
- Wan (2.1, 2.2): `in_channels` (T2V 16; I2V 36, latent + mask + image latent; TI2V-5B 48), the latent's own
  channels through the family ("wan22" is the TI2V-5B's 48-channel latent with its 16x VAE, "wan21" every other
  Wan), the patch size, whether the model takes a CLIP image embedding (Wan 2.1 I2V / FLF2V; Wan 2.2 I2V A14B
  does not, which is what tells the two apart) and whether it has a camera-control adapter (the Fun camera
  models). Not in it: which Wan 2.2 A14B expert a file is (the two experts have one shape and no host can tell
  them apart from the file), and the host's own variant labels (ComfyUI's model_type calls Wan 2.2 I2V "t2v").
- HunyuanVideo: in_channels and the number of double-stream blocks (the layers before the single-stream ones).
- Mochi: in_channels. LTX-Video: layers and heads only (every LTX-Video checkpoint has 128 latent channels).

`current` reads signatures that older versions stored (bundle files, calibration statistics) as today's builders
would have made them for the same model; ModelSignature.from_dict applies it.
"""

from __future__ import annotations

from typing import Sequence

from .geometry import ModelSignature

# Wan 2.2 TI2V-5B's latent (its VAE compresses 16x16 spatially); every other Wan checkpoint has 16 channels.
WAN22_LATENT_CHANNELS = 48


def _heads(num_layers: int, num_heads: int, head_dim: int) -> tuple:
    layers, heads, hd = int(num_layers), int(num_heads), int(head_dim)
    if layers <= 0 or heads <= 0 or hd <= 0:
        raise ValueError(f"a model signature needs positive layers, heads and head_dim, got {layers}, {heads}, {hd}")
    return layers, heads, hd


def patch_text(patch: Sequence[int]) -> str:
    """(1, 2, 2) -> "1x2x2", the form signatures store."""
    return "x".join(str(int(p)) for p in patch)


def wan_family(out_channels: int) -> str:
    """'wan22' for the 48-channel latent of Wan 2.2 TI2V-5B, 'wan21' for every other Wan checkpoint."""
    return "wan22" if int(out_channels) == WAN22_LATENT_CHANNELS else "wan21"


def wan(*, num_layers: int, num_heads: int, head_dim: int, in_channels: int, out_channels: int,
        patch: Sequence[int], image_embedding: bool, camera_control: bool = False) -> ModelSignature:
    """Wan 2.1 / 2.2. in_channels: the patch embedding's input channels; out_channels: the latent channels the
    model predicts; image_embedding: it takes a CLIP vision embedding (an image projection in its cross-attention);
    camera_control: it has a camera-control adapter."""
    layers, heads, hd = _heads(num_layers, num_heads, head_dim)
    if len(tuple(patch)) != 3:
        raise ValueError(f"a Wan patch size has 3 entries (t, h, w), got {tuple(patch)}")
    return ModelSignature(wan_family(out_channels), layers, heads, hd, heads * hd,
                          {"in_channels": int(in_channels), "patch": patch_text(patch),
                           "image_embedding": bool(image_embedding), "camera_control": bool(camera_control)})


def hunyuan_video(*, num_layers: int, num_heads: int, head_dim: int, in_channels: int,
                  double_blocks: int) -> ModelSignature:
    """HunyuanVideo; num_layers counts double- and single-stream blocks together (double first)."""
    layers, heads, hd = _heads(num_layers, num_heads, head_dim)
    return ModelSignature("hunyuan", layers, heads, hd, heads * hd,
                          {"in_channels": int(in_channels), "double_blocks": int(double_blocks)})


def mochi(*, num_layers: int, num_heads: int, head_dim: int, in_channels: int) -> ModelSignature:
    layers, heads, hd = _heads(num_layers, num_heads, head_dim)
    return ModelSignature("mochi", layers, heads, hd, heads * hd, {"in_channels": int(in_channels)})


def ltxv(*, num_layers: int, num_heads: int, head_dim: int) -> ModelSignature:
    layers, heads, hd = _heads(num_layers, num_heads, head_dim)
    return ModelSignature("ltxv", layers, heads, hd, heads * hd, {})


# ---- signatures older versions stored ----------------------------------------------------------------------------
# ComfyUI's Wan model_type labels (what the nodes stored before the shared builders) -> (image_embedding,
# camera_control). ComfyUI detects "i2v" and "camera" exactly when the file has the CLIP image projection (img_emb),
# "camera" and "camera_2.2" when it has the camera-control adapter; other labels were never patched.
_COMFY_WAN_TYPES = {"t2v": (False, False), "i2v": (True, False), "camera": (True, True),
                    "camera_2.2": (False, True)}


def current(sig: ModelSignature) -> ModelSignature:
    """`sig` as today's builders make it for the same model; unchanged when it already is.

    - Wan, stored by the ComfyUI nodes ({in_channels, model_type}): model_type becomes image_embedding and
      camera_control (table above); the patch was always 1x2x2 there (ComfyUI's Wan detection fixes it).
    - Wan, stored by the diffusers adapter ({in_channels, patch}): that adapter served WanTransformer3DModel
      checkpoints without reading their image embedding, and such a class has no camera adapter; the demo's tiny
      model was family "tinywan", which is a Wan 2.1 architecture ("wan21"). An old adapter bundle of a Wan 2.1
      I2V model (image embedding) therefore reads as without one and must be calibrated again; the adapter never
      claimed I2V support, and the tiny model and T2V bundles read exactly.
    - LTX-Video: in_channels, stored only when the file's metadata happened to carry it, is dropped.
    - Anything else (signatures made in code without these fields, other families) is returned as it is.
    """
    extra = dict(sig.extra)
    family = sig.family
    if family in ("wan21", "wan22", "tinywan") and "image_embedding" not in extra:
        if str(extra.get("model_type")) in _COMFY_WAN_TYPES:
            extra["image_embedding"], extra["camera_control"] = _COMFY_WAN_TYPES[str(extra.pop("model_type"))]
            extra.setdefault("patch", "1x2x2")
        elif "patch" in extra and "model_type" not in extra:
            extra["image_embedding"], extra["camera_control"] = False, False
            if family == "tinywan":
                family = "wan21"
    elif family == "ltxv":
        extra.pop("in_channels", None)
    if family == sig.family and extra == sig.extra:
        return sig
    return ModelSignature(family, sig.num_layers, sig.num_heads, sig.head_dim, sig.dim, extra)
