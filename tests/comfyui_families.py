"""Tiny HunyuanVideo, LTX-Video and Mochi models built from ComfyUI's own classes, for the integration tests.

Real checkpoints of these families are tens of GB and a real text encoder cannot be made tiny, so:
- the checkpoint writers instantiate ComfyUI's model class at a tiny size (imported from COMFYUI_PATH inside the
  test process) and fill its state_dict with seeded random weights: the key set is exactly what ComfyUI's
  model detection and loader expect, whatever the ComfyUI version;
- `FAMILY_NODE_SOURCE` is a test-only custom node (written into the temporary custom_nodes, never shipped) that
  emits CONDITIONING of any width, optionally with a text padding mask (`attention_mask`, as HunyuanVideo's,
  Mochi's and LTX-Video's text encoders send) and a pooled output (HunyuanVideo's vector_in reads one).

Sizes: HunyuanVideo's detection fixes head_dim at 128 (num_heads = hidden / 128, RoPE axes 16+56+56), so hidden
256 = 2 heads, 1 double + 1 single block, text width 64; it keeps vector_in (768-wide pooled output), since
without it ComfyUI 0.3.64 detects HunyuanImage 2.1. LTX-Video's UNETLoader path (ComfyUI 0.3.64 passes no file
metadata to the detection) assumes 32 heads, so the tiny model has 32 heads of 8 (inner 256) and the default
4096-wide caption projection. Mochi's detection hard-codes 48 layers x 3072, so Mochi is built in-process only.
"""

from __future__ import annotations

import sys

import torch

from comfyui_harness import COMFY

FAMILY_NODE_SOURCE = '''
"""Test-only ComfyUI node: random conditioning of a given width, with an optional text padding mask."""
import torch


class CalibAttTestFamilyConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                             "prompts": ("INT", {"default": 1, "min": 1, "max": 64}),
                             "tokens": ("INT", {"default": 16, "min": 1, "max": 4096}),
                             "tokens_step": ("INT", {"default": 0, "min": 0, "max": 4096}),
                             "width": ("INT", {"default": 4096, "min": 1, "max": 8192}),
                             "padded": ("INT", {"default": 0, "min": 0, "max": 4096}),
                             "pooled_width": ("INT", {"default": 0, "min": 0, "max": 8192})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, seed, prompts, tokens, tokens_step, width, padded, pooled_width):
        """Prompt i has tokens + i * tokens_step text tokens; with padded > 0 its last `padded` tokens are
        padding, marked 0 in an integer attention_mask [1, tokens] (1 = a real token), as text encoders send."""
        g = torch.Generator().manual_seed(seed)
        out = []
        for i in range(prompts):
            n = tokens + i * tokens_step
            extra = {}
            if padded:
                mask = torch.ones(1, n, dtype=torch.long)
                mask[:, n - padded:] = 0
                extra["attention_mask"] = mask
            if pooled_width:
                extra["pooled_output"] = torch.randn(1, pooled_width, generator=g)
            out.append([torch.randn(1, n, width, generator=g), extra])
        return (out,)


NODE_CLASS_MAPPINGS = {"CalibAttTestFamilyConditioning": CalibAttTestFamilyConditioning}
'''

# Tiny configs, in the constructor arguments of ComfyUI's classes.
# vector_in (CLIP-L pooled, 768) and guidance_in as in HunyuanVideo T2V: without vector_in ComfyUI 0.3.64 detects
# the file as HunyuanImage 2.1.
HUNYUAN_CONFIG = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=64, hidden_size=256,
                      mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=256,
                      patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False)
# HunyuanVideoParams fields newer ComfyUI (0.19+) adds for HunyuanVideo 1.5, at the values its detection gives a
# HunyuanVideo T2V checkpoint (no cond_type_embedding, no vision_in keys). Each version's class takes only the
# fields it declares (hunyuan_params).
HUNYUAN_NEWER_FIELDS = dict(use_cond_type_embedding=False, vision_in_dim=None, meanflow_sum=False)
LTXV_CONFIG = dict(in_channels=128, cross_attention_dim=256, attention_head_dim=8, num_attention_heads=32,
                   caption_channels=4096, num_layers=2)
# Mochi's block asserts an x-MLP of exactly 1536 * 8 = 12288 hidden units, hence mlp_ratio_x = 12288 / 256.
MOCHI_CONFIG = dict(image_model="mochi_preview", depth=2, patch_size=2, num_heads=2, hidden_size_x=256,
                    hidden_size_y=128, mlp_ratio_x=48.0, mlp_ratio_y=2.0, learn_sigma=False, in_channels=12,
                    qk_norm=True, qkv_bias=False, out_bias=True, attn_drop=0.0, patch_embed_bias=True,
                    posenc_preserve_area=True, timestep_mlp_bias=True, attend_to_padding=False,
                    timestep_scale=1000.0, use_t5=True, t5_feat_dim=64, t5_token_length=256, rope_theta=10000.0)


def import_comfy():
    """Make ComfyUI importable in this process (appended to sys.path, so it shadows nothing); CPU mode without
    CUDA, as `main.py --cpu` would set it."""
    if COMFY not in sys.path:
        sys.path.append(COMFY)
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401  (reads args.cpu once, at import)
    import comfy.ops

    return comfy


def random_state_dict(module: torch.nn.Module, seed: int = 0, dtype=torch.float16) -> dict:
    """Seeded random weights for every entry of `module`'s state_dict: matrices N(0, 1/fan_in), norm scales 1,
    biases and other vectors small; a tiny random model then stays numerically tame over a few steps."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in module.state_dict().items():
        shape = tuple(t.shape)
        if len(shape) >= 2:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            w = torch.randn(shape, generator=g) * fan_in ** -0.5
        elif "norm" in name and (name.endswith("weight") or name.endswith("scale")):
            w = torch.ones(shape)
        else:
            w = torch.randn(shape, generator=g) * 0.02
        out[name] = w.to(dtype).contiguous()
    return out


def hunyuan_params() -> dict:
    """The tiny HunyuanVideo config in the fields of this ComfyUI's HunyuanVideoParams (0.3.64 has 16, 0.19.3 19);
    a field the builder has no value for fails here by name rather than inside ComfyUI's constructor."""
    import dataclasses

    import_comfy()
    from comfy.ldm.hunyuan_video.model import HunyuanVideoParams

    known = {**HUNYUAN_CONFIG, **HUNYUAN_NEWER_FIELDS}
    names = [f.name for f in dataclasses.fields(HunyuanVideoParams)]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise AssertionError(f"this ComfyUI's HunyuanVideoParams has fields the tiny builder has no value for: "
                             f"{', '.join(unknown)}; add their HunyuanVideo T2V values (what model_detection sets "
                             f"for a checkpoint without the matching keys) to HUNYUAN_NEWER_FIELDS")
    return {n: known[n] for n in names}


def tiny_hunyuan_state_dict(seed: int = 0) -> dict:
    import_comfy()
    import comfy.ops
    from comfy.ldm.hunyuan_video.model import HunyuanVideo

    m = HunyuanVideo(operations=comfy.ops.disable_weight_init, device="meta", **hunyuan_params())
    return random_state_dict(m, seed)


def tiny_ltxv_state_dict(seed: int = 0) -> dict:
    import_comfy()
    import comfy.ops
    from comfy.ldm.lightricks.model import LTXVModel

    m = LTXVModel(operations=comfy.ops.disable_weight_init, device="meta", **LTXV_CONFIG)
    return random_state_dict(m, seed)


def detect(state_dict: dict) -> dict:
    """ComfyUI's own detection of a diffusion-model state dict (what UNETLoader sees)."""
    import_comfy()
    import comfy.model_detection

    cfg = comfy.model_detection.detect_unet_config(state_dict, "")
    if cfg is None or comfy.model_detection.model_config_from_unet(state_dict, "") is None:
        raise AssertionError("ComfyUI does not recognise the tiny checkpoint")
    return cfg


def load_model(state_dict: dict):
    """The ModelPatcher the stock UNETLoader would make from this state dict."""
    import_comfy()
    import comfy.sd

    model = comfy.sd.load_diffusion_model_state_dict(dict(state_dict))
    if model is None:
        raise AssertionError("ComfyUI could not load the tiny checkpoint")
    return model


def tiny_mochi_model(seed: int = 0):
    """A ModelPatcher around ComfyUI's Mochi model (model_base.GenmoMochi, AsymmDiTJoint) at the tiny config,
    built as load_diffusion_model_state_dict builds one, minus the detection that would force 48 x 3072."""
    import_comfy()
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.GenmoMochi(dict(MOCHI_CONFIG))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "")
    sd = random_state_dict(model.diffusion_model, seed, dtype=torch.float32)
    model.diffusion_model.load_state_dict(sd, strict=True)  # every key of the class, nothing else
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


# ------------------------------------------------------------------ shared by the family and Wan-variant tests
def model_facts(model, video: dict = None, latent_shape=None):
    """Signature, layout and token grid exactly as the nodes derive them (nodes/comfy_glue, nodes/model_info)."""
    from calibatt.nodes import model_info as mi
    from calibatt.nodes.comfy_glue import describe_model

    cfg = describe_model(model)
    layout = mi.family_layout(cfg)
    shape = latent_shape or mi.latent_shape_for(layout, video["width"], video["height"], video["length"])
    return mi.signature_from_config(cfg), layout, mi.grid_from_latent(layout, shape)


def kind_bundle(signature, grid, kind: str, block: int):
    """'full': every key block kept (must reproduce dense); 'band': each query block keeps its own and the
    neighbouring key blocks (a real, bounded change)."""
    from calibatt.masks import BlockGeometry, MaskBundle

    g = BlockGeometry(grid.video_tokens, block, block)
    if kind == "full":
        mask = torch.ones(g.nq, g.nk, dtype=torch.bool)
    else:
        mask = (torch.arange(g.nq)[:, None] - torch.arange(g.nk)[None, :]).abs() <= 1
    mask = mask.expand(signature.num_layers, signature.num_heads, g.nq, g.nk).clone()
    return MaskBundle.from_block_masks(signature, grid, g, [mask], [1.0, 0.5],
                                      [0, 0], settings={"test": kind})


def log_since(server, offset: int) -> str:
    with open(server.log_path, "rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", errors="replace")


def run_logged(server, prompt, timeout=300):
    """-> (history entry, the log lines this prompt wrote); fails with the log tail on an execution error."""
    import comfyui_harness as H

    offset = server.log_path.stat().st_size
    entry = server.run(prompt, timeout=timeout)
    err = H.status_error(entry)
    assert err is None, f"{err}\n{server.log_tail()}"
    return entry, log_since(server, offset)


def read_latent(server, entry, save_id):
    from safetensors.torch import load_file

    info = entry["outputs"][save_id]["latents"][0]
    return load_file(str(server.base / "output" / info["subfolder"] / info["filename"]))["latent_tensor"].float()
