"""Bundles move between hosts, through a real ComfyUI (set COMFYUI_PATH; see docs/COMFYUI.md).

A Wan of one architecture on both hosts: a random diffusers WanTransformer3DModel (2 layers, 2 heads of 128, 16
channels, 1x2x2 patches) in this process, and a random ComfyUI-format checkpoint of the same shape
(comfyui_harness.tiny_wan_state_dict) loaded by the stock UNETLoader of a headless ComfyUI. The signature depends on
the shape only, so the weights need not be the same.
- diffusers -> ComfyUI: a bundle calibrated through the diffusers adapter is loaded by Load Mask Bundle and patches
  the ComfyUI model: every self-attention call is routed and the sample changes boundedly.
- ComfyUI -> diffusers: a bundle written by Calibrate Sparse Attention patches the diffusers model.
The test process needs diffusers (scripts/comfyui_hosts.sh installs it into the ComfyUI venv).
"""

from __future__ import annotations

import re

import pytest
import torch

import comfyui_families as F
import comfyui_harness as H

pytestmark = H.NEEDS_COMFYUI

pytest.importorskip("diffusers", reason="the cross-host test calibrates through the diffusers adapter: install "
                                        "diffusers==0.42.1 into the ComfyUI venv (scripts/comfyui_hosts.sh does)")

from calibatt.adapters import diffusers_wan as A  # noqa: E402
from calibatt.calibration import CalibrationSettings, Calibrator  # noqa: E402
from calibatt.masks import load_bundle, save_bundle  # noqa: E402

LAYERS, HEADS, HEAD_DIM = 2, 2, 128
VIDEO = {"width": 128, "height": 64, "length": 9}  # latent [1, 16, 3, 8, 16] -> 3 x 4 x 8 = 96 tokens
LATENT = (1, 16, 3, 8, 16)
TEXT = 32  # T5-shaped text tokens
BLOCK = 16
STEPS = 3
# Low eps so that random weights' diffuse attention still leaves blocks out (density well under the dense cutoff).
EPS = {"A": 0.3, "C": 0.5, "k": 4.0}
SUMMARY = re.compile(r"Patch Model Attention: (\d+) self-attention calls routed over (\d+) model evaluations "
                     r"\((\d+) layers\)")

rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731


@pytest.fixture(scope="module")
def transformer():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                                 in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=512,
                                 num_layers=LAYERS).eval()


def _context(seed: int) -> torch.Tensor:
    return torch.randn(1, TEXT, 4096, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def diffusers_bundle(transformer):
    """Calibrated through the diffusers adapter on two prompts, as a diffusers user would."""
    sigmas = [1.0, 0.7, 0.4]
    latent = torch.randn(LATENT, generator=torch.Generator().manual_seed(1))
    cal = Calibrator(A.wan_signature(transformer), A.wan_grid(transformer, LATENT),
                     CalibrationSettings(**EPS, block_q=BLOCK, block_k=BLOCK, steps=len(sigmas)))
    try:
        with A.patch_calibrate(transformer, cal) as hook, torch.no_grad():
            for prompt in range(2):
                cal.begin_prompt(sample_sigmas=sigmas)
                for sigma in sigmas:
                    hook.begin_step(sigma)
                    transformer(latent, torch.tensor([sigma * 1000.0]), _context(prompt))
                cal.end_prompt()
        return cal.finish()
    finally:
        cal.close()


@pytest.fixture(scope="module")
def comfy(diffusers_bundle):
    from safetensors.torch import save_file

    base = H.make_base_dir()
    H.ComfyServer.prepare_base(base)
    save_file(H.tiny_wan_state_dict(), str(base / "models/diffusion_models/tiny_wan.safetensors"))
    save_bundle(diffusers_bundle, base / "models" / "sparse_attention" / "from_diffusers.safetensors")
    server = H.ComfyServer(F.COMFY, base, env_extra={"PYTHONUNBUFFERED": "1"})
    server.start()
    yield server
    server.stop()
    H.remove_base_dir(base)


def _graph(prompts: int = 1) -> dict:
    return H.tiny_wan_graph(**VIDEO, prompts=prompts, tokens=TEXT)


def _ksampler(p: dict, name: str, model):
    p[f"ks_{name}"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": 3, "steps": STEPS, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple",
        "positive": ["cond", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}}
    p[f"save_{name}"] = {"class_type": "SaveLatent", "inputs": {"samples": [f"ks_{name}", 0],
                                                                "filename_prefix": f"latents/{name}"}}


def test_diffusers_bundle_patches_the_comfyui_model(comfy, diffusers_bundle):
    assert 0.05 < diffusers_bundle.density < 0.85, diffusers_bundle.summary()  # it really skips blocks
    p = _graph()
    p["load"] = {"class_type": "LoadMaskBundle", "inputs": {"bundle_name": "from_diffusers.safetensors"}}
    p["patch"] = {"class_type": "PatchModelAttention", "inputs": {
        "model": ["unet", 0], "bundle": ["load", 0], "dense_first_percent": 0.0, "dense_last_percent": 0.0,
        "quality": 0.0}}
    _ksampler(p, "sparse", ["patch", 0])
    _ksampler(p, "dense", ["unet", 0])
    entry, log_text = F.run_logged(comfy, p)
    # Accepted at the patch node (signature) and at sampling start (grid), and every self-attention call of every
    # model evaluation went to the bundle's masks.
    runs = [tuple(int(x) for x in m) for m in SUMMARY.findall(log_text)]
    assert len(runs) == 1, log_text[-3000:]
    routed, evaluations, layers = runs[0]
    assert layers == LAYERS and evaluations > 0 and routed == evaluations * LAYERS, runs
    d = rel(F.read_latent(comfy, entry, "save_sparse"), F.read_latent(comfy, entry, "save_dense"))
    assert 1e-5 < d < 0.5, d


def test_comfyui_bundle_patches_the_diffusers_model(comfy, transformer):
    p = _graph(prompts=2)
    p["calib"] = {"class_type": "CalibrateSparseAttention", "inputs": {
        "model": ["unet", 0], "prompts": "", **VIDEO, "steps": STEPS, "cfg": 3.0, "sampler_name": "euler",
        "scheduler": "simple", "seed": 11, "preset": "custom", "eps_A": EPS["A"], "eps_C": EPS["C"],
        "eps_k": EPS["k"], "rho": 0.5, "filename": "from_comfyui", "positive": ["cond", 0],
        "negative": ["neg", 0], "block_size": BLOCK}}
    p["preview_save"] = {"class_type": "SaveImage", "inputs": {"images": ["calib", 1], "filename_prefix": "calib"}}
    F.run_logged(comfy, p, timeout=600)
    bundle = load_bundle(comfy.base / "models" / "sparse_attention" / "from_comfyui.safetensors")
    assert bundle.signature == A.wan_signature(transformer)
    assert 0.05 < bundle.density < 0.85, bundle.summary()

    latent = torch.randn(LATENT, generator=torch.Generator().manual_seed(2))
    t, ctx = torch.tensor([700.0]), _context(5)
    with torch.no_grad():
        dense = transformer(latent, t, ctx, return_dict=False)[0]
        with A.patch_sparse(transformer, bundle) as hook:
            sparse = transformer(latent, t, ctx, return_dict=False)[0]
    assert hook.grid.video_tokens == bundle.grid.video_tokens == 96
    d = rel(sparse, dense)
    assert 1e-5 < d < 0.5, d
