"""Tiny Wan 2.1 I2V, Wan 2.2 I2V (A14B layout) and Wan 2.2 TI2V-5B checkpoints, and a test-only node giving them
their image conditioning, for tests/test_nodes_comfyui_wan_variants.py.

The checkpoints are written from ComfyUI's own WanModel class (imported from COMFYUI_PATH in the test process;
random seeded weights, tests/comfyui_families.random_state_dict), so their keys are what ComfyUI 0.3.64's
detection and the stock UNETLoader expect:
- Wan 2.1 I2V: patch_embedding in_dim 36 (16 noise + 4 mask + 16 image latent channels) and `img_emb` (the CLIP
  vision projection, 1280 -> dim) plus k_img / v_img / norm_k_img in every cross-attention: detected as
  model_type "i2v" -> supported_models.WAN21_I2V -> model_base.WAN21(image_to_video=True);
- Wan 2.2 I2V A14B layout: in_dim 36 without `img_emb` (no CLIP vision): ComfyUI detects model_type "t2v" with
  in_dim 36 -> WAN21_T2V; the image arrives only through the concatenated latent;
- Wan 2.2 TI2V-5B: in_dim = out_dim = 48 (the Wan 2.2 VAE's 48-channel latent): detected as WAN22_T2V ->
  model_base.WAN22, whose image conditioning is the first latent frame itself (kept by a noise mask, with
  per-frame timesteps).
All at dim 256 = 2 heads of 128 (the detection fixes head_dim 128), 2 layers, ffn 512.

`VARIANT_NODE_SOURCE` (written into the temporary custom_nodes, never shipped) stands in for the stock
WanImageToVideo / Wan22ImageToVideoLatent nodes, which need a real Wan VAE and CLIP vision model: it adds seeded
random conditioning of exactly the shapes those nodes produce.
"""

from __future__ import annotations

import comfyui_families as F

DIM, HEADS, LAYERS, FFN = 256, 2, 2, 512
# WanModel constructor arguments per variant (the rest as ComfyUI's detection fills them in).
VARIANTS = {
    "wan21_i2v": dict(model_type="i2v", in_dim=36, out_dim=16),
    "wan22_i2v": dict(model_type="t2v", in_dim=36, out_dim=16),
    "wan22_ti2v": dict(model_type="t2v", in_dim=48, out_dim=48),
}
# ComfyUI's supported_models class each variant must be detected as.
DETECTED_AS = {"wan21_i2v": "WAN21_I2V", "wan22_i2v": "WAN21_T2V", "wan22_ti2v": "WAN22_T2V"}

VARIANT_NODE_SOURCE = '''
"""Test-only ComfyUI node: the image conditioning of Wan I2V / TI2V models, random and seeded, at the shapes the
stock WanImageToVideo (concat_latent_image, concat_mask, clip_vision_output) and Wan22ImageToVideoLatent (first
latent frame + noise_mask) produce."""
import torch

import comfy.clip_vision
import comfy.latent_formats
import node_helpers


class CalibAttTestWanImageConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"positive": ("CONDITIONING",), "negative": ("CONDITIONING",),
                             "mode": (["wan21_i2v", "wan22_i2v", "wan22_ti2v"],),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                             "width": ("INT", {"default": 128, "min": 16, "max": 4096}),
                             "height": ("INT", {"default": 64, "min": 16, "max": 4096}),
                             "length": ("INT", {"default": 9, "min": 1, "max": 4096})}}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, positive, negative, mode, seed, width, height, length):
        g = torch.Generator().manual_seed(seed)
        frames = (length - 1) // 4 + 1
        if mode == "wan22_ti2v":
            # Wan22ImageToVideoLatent with a start image: the encoded image is latent frame 0, which the noise
            # mask keeps (WAN22 then gives frame 0 timestep 0).
            latent = torch.zeros([1, 48, frames, height // 16, width // 16])
            latent[:, :, :1] = torch.randn([1, 48, 1, height // 16, width // 16], generator=g)
            mask = torch.ones([1, 1, frames, height // 16, width // 16])
            mask[:, :, :1] = 0.0
            latent = comfy.latent_formats.Wan22().process_out(latent) * mask + latent * (1.0 - mask)
            return (positive, negative, {"samples": latent, "noise_mask": mask})
        # WanImageToVideo with a start image: the VAE-encoded video (start frame + grey) and a mask that is 0 on
        # the start frame, concatenated to the noise inside the model (16 + 4 + 16 = 36 input channels).
        image = torch.randn([1, 16, frames, height // 8, width // 8], generator=g)
        mask = torch.ones([1, 1, frames, height // 8, width // 8])
        mask[:, :, :1] = 0.0
        values = {"concat_latent_image": image, "concat_mask": mask}
        if mode == "wan21_i2v":
            # CLIP-H vision tokens of the start image (257 x 1280): Wan 2.1 I2V's img_emb and image cross-attention.
            vision = comfy.clip_vision.Output()
            vision.penultimate_hidden_states = torch.randn([1, 257, 1280], generator=g)
            values["clip_vision_output"] = vision
        positive = node_helpers.conditioning_set_values(positive, values)
        negative = node_helpers.conditioning_set_values(negative, values)
        latent = torch.zeros([1, 16, frames, height // 8, width // 8])
        return (positive, negative, {"samples": latent})


NODE_CLASS_MAPPINGS = {"CalibAttTestWanImageConditioning": CalibAttTestWanImageConditioning}
'''


def tiny_wan_variant_state_dict(variant: str, seed: int = 0) -> dict:
    """A random checkpoint of ComfyUI's WanModel for `variant` (a VARIANTS key), keys without prefix."""
    F.import_comfy()
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    m = WanModel(dim=DIM, ffn_dim=FFN, num_heads=HEADS, num_layers=LAYERS, operations=comfy.ops.disable_weight_init,
                 device="meta", **VARIANTS[variant])
    sd = F.random_state_dict(m, seed)
    for key in ("img_emb.proj.0.weight", "img_emb.proj.4.weight"):  # LayerNorm scales (no "norm" in the name)
        if key in sd:
            sd[key] = sd[key].new_ones(sd[key].shape)
    return sd


def detected_class(state_dict: dict) -> str:
    """Name of the supported_models class ComfyUI's detection picks for this state dict."""
    F.import_comfy()
    import comfy.model_detection

    config = comfy.model_detection.model_config_from_unet(state_dict, "")
    if config is None:
        raise AssertionError("ComfyUI does not recognise the tiny checkpoint")
    return type(config).__name__
