"""A random CLIP-L text encoder for the ComfyUI integration tests of the CLIP text-prompt path.

Wan's umt5-xxl cannot be made tiny (ComfyUI fixes its config), but ComfyUI's stock CLIPLoader with type "sd3" and
one CLIP-L file builds SD3's text encoder with only its CLIP-L branch, and SD3 pads CLIP-L's 768 features to
4096, the width Wan's text_embedding takes. CLIP-L's config is fixed too (comfy/sd1_clip_config.json), so the file
is a full-size random CLIP-L (~123M parameters, ~250 MB in float16); the tokenizer ships with ComfyUI.

Key names are those ComfyUI's loader expects (ComfyUI 0.3.64):
- comfy/sd.py detect_te_model: "text_model.encoder.layers.0.mlp.fc1.weight" present and no layer 22 / 30 -> CLIP_L;
  with type sd3 that builds sd3_clip(clip_l=True, clip_g=False, t5=False);
- comfy/text_encoders/sd3_clip.py SD3ClipModel.load_sd routes a dict with "text_model.encoder.layers.1.mlp.fc1.weight"
  to the CLIP-L branch (anything else would go to the absent T5);
- comfy/clip_model.py CLIPTextModel: text_model.{embeddings, encoder.layers.N, final_layer_norm} + text_projection.
The loader uses load_state_dict(strict=False) and only logs missing keys ("clip missing: [...]"), leaving those
weights uninitialised: `missing_and_unexpected_keys` checks this dict against ComfyUI's own model, and the tests
also look for that log line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

# comfy/sd1_clip_config.json (openai/clip-vit-large-patch14 text model); ComfyUI builds exactly this shape.
HIDDEN, LAYERS, FFN, VOCAB, POSITIONS = 768, 12, 3072, 49408, 77
CLIP_FILE_NAME = "random_clip_l.safetensors"


def clip_l_shapes() -> dict:
    """Every tensor of a CLIP-L text model as ComfyUI names it -> shape."""
    shapes = {
        "text_model.embeddings.token_embedding.weight": (VOCAB, HIDDEN),
        "text_model.embeddings.position_embedding.weight": (POSITIONS, HIDDEN),
        "text_model.final_layer_norm.weight": (HIDDEN,),
        "text_model.final_layer_norm.bias": (HIDDEN,),
        "text_projection.weight": (HIDDEN, HIDDEN),
    }
    for i in range(LAYERS):
        p = f"text_model.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{p}self_attn.{proj}.weight"] = (HIDDEN, HIDDEN)
            shapes[f"{p}self_attn.{proj}.bias"] = (HIDDEN,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{p}{norm}.weight"] = (HIDDEN,)
            shapes[f"{p}{norm}.bias"] = (HIDDEN,)
        shapes[f"{p}mlp.fc1.weight"] = (FFN, HIDDEN)
        shapes[f"{p}mlp.fc1.bias"] = (FFN,)
        shapes[f"{p}mlp.fc2.weight"] = (HIDDEN, FFN)
        shapes[f"{p}mlp.fc2.bias"] = (HIDDEN,)
    return shapes


def random_clip_l_state_dict(seed: int = 0) -> dict:
    """Random float16 CLIP-L weights. Linear weights ~ fan_in^-1/2 and unit layer norms keep every hidden state
    O(1), so float16 (ComfyUI's text-encoder dtype on the CPU) neither overflows nor collapses: different prompts
    give clearly different embeddings."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in clip_l_shapes().items():
        if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("final_layer_norm.weight"):
            t = torch.ones(shape)
        elif len(shape) == 1:
            t = torch.randn(shape, generator=g) * 0.02
        elif "embedding" in name:
            t = torch.randn(shape, generator=g)  # token / position embeddings: O(1) like a trained CLIP's
        else:
            t = torch.randn(shape, generator=g) * shape[1] ** -0.5
        sd[name] = t.to(torch.float16)
    return sd


def write_random_clip_l(path: Path, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(random_clip_l_state_dict(seed), str(tmp))
    tmp.replace(path)
    return path


def missing_and_unexpected_keys(comfy_path: str, clip_file: Path, python: str | None = None) -> dict:
    """Load `clip_file` with ComfyUI's own text-encoder loader (type sd3) in a fresh interpreter and return what it
    built and which keys its load_state_dict(strict=False) reported missing / unexpected."""
    script = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(comfy_path)!r})\n"
        "import comfy.options\n"
        "comfy.options.enable_args_parsing()\n"
        "sys.argv = [sys.argv[0], '--cpu']\n"
        "import comfy.sd, comfy.utils\n"
        f"sd = comfy.utils.load_torch_file({str(clip_file)!r}, safe_load=True)\n"
        "te = comfy.sd.detect_te_model(sd)\n"
        "clip = comfy.sd.load_text_encoder_state_dicts([dict(sd)], clip_type=comfy.sd.CLIPType.SD3)\n"
        "m, u = clip.load_sd(sd)\n"
        "model = clip.cond_stage_model\n"
        "out = {'te_model': te.name if te else None, 'model': type(model).__mro__[1].__name__,\n"
        "       'branches': [b for b in ('clip_l', 'clip_g', 't5xxl') if getattr(model, b, None) is not None],\n"
        "       'missing': list(m), 'unexpected': list(u)}\n"
        "print('KEYCHECK ' + json.dumps(out))\n"
    )
    r = subprocess.run([python or sys.executable, "-c", script], cwd=str(comfy_path), capture_output=True,
                       text=True, timeout=300)
    for line in r.stdout.splitlines():
        if line.startswith("KEYCHECK "):
            return json.loads(line[len("KEYCHECK "):])
    raise RuntimeError(f"ComfyUI's loader did not run (rc {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
