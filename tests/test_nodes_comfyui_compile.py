"""TorchCompileModel + Patch Model Attention through a real ComfyUI (set COMFYUI_PATH; docs/COMFYUI.md).

The tiny Wan 2.1 checkpoint of test_nodes_comfyui.py, a banded bundle with three sigma buckets and repetitive
heads, Patch Model Attention (first 25% of the steps dense) and ComfyUI's own TorchCompileModel node, in both
orders, sampled with KSampler (CFG 3, so batch 2) next to the same patched model uncompiled. The server runs with
TORCH_LOGS=recompiles,graph_breaks, so dynamo logs every recompile and graph break it makes.

Backend "cudagraphs" (one of the node's two choices): on the CPU its CUDA graphs are skipped (inputs on the CPU)
and the traced graph runs through aot_autograd as it is, which is the part our attention must survive: dynamo's
trace of ComfyUI's real model code, with ComfyUI 0.19's guard filter where it applies. Backend "inductor" compiles
the graph to C++ on the CPU (about a minute on 2 cores): marked slow.
"""

from __future__ import annotations

import re

import pytest
import torch

import comfyui_harness as H
from comfyui_harness import COMFY

pytestmark = H.NEEDS_COMFYUI

from calibatt.masks import BlockGeometry, MaskBundle, ModelSignature, RepetitionPlan, TokenGrid  # noqa
from calibatt.masks import save_bundle  # noqa: E402

W, HGT, LEN = 128, 64, 9  # latent [1, 16, 3, 8, 16] -> 3 x 4 x 8 = 96 tokens
STEPS = 4
GRID = TokenGrid(frames=3, height=4, width=8)
SIGNATURE = ModelSignature("wan21", 2, 2, 128, 256, {"in_channels": 16, "model_type": "t2v"})
# Calibrated sigmas and their buckets: Wan's 4-step "simple" schedule (shift 8: 1.0, 0.96, 0.89, 0.73) falls in
# buckets 0, 0, 1, 2.
SIGMAS = [1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.5, 0.3]
STEP_BUCKET = [0, 0, 1, 1, 2, 2, 2, 2]


def _bundle() -> MaskBundle:
    g = BlockGeometry(GRID.video_tokens, 16, 16)
    gen = torch.Generator().manual_seed(5)
    qi, ki = torch.arange(g.nq)[:, None], torch.arange(g.nk)[None, :]
    buckets, plans = [], []
    for b in range(3):
        m = ((ki - qi).abs() <= b) | (torch.rand(2, 2, g.nq, g.nk, generator=gen) < 0.15)
        slot = torch.full((2, 2), -1, dtype=torch.int32)
        slot[b % 2, 1] = 0  # a repetitive head, in another layer per bucket
        T = GRID.frame_tokens
        plan = RepetitionPlan(T, slot, torch.randperm(T, generator=gen)[:2][None],
                              torch.randint(0, 2, (1, T), generator=gen))
        buckets.append(m)
        plans.append(plan)
    return MaskBundle.from_block_masks(SIGNATURE, GRID, g, buckets, SIGMAS, STEP_BUCKET, repetition=plans)


@pytest.fixture(scope="module")
def comfy():
    from safetensors.torch import save_file

    base = H.make_base_dir()
    H.ComfyServer.prepare_base(base)
    save_file(H.tiny_wan_state_dict(), str(base / "models/diffusion_models/tiny_wan.safetensors"))
    save_bundle(_bundle(), base / "models/sparse_attention/banded.safetensors")
    server = H.ComfyServer(COMFY, base, env_extra={"TORCH_LOGS": "recompiles,graph_breaks"},
                           extra_args=["--use-pytorch-cross-attention"])
    server.start()
    yield server
    server.stop()
    H.remove_base_dir(base)


def _prompt(backend: str, seed: int) -> dict:
    p = {
        **H.tiny_wan_graph(W, HGT, LEN),
        "bundle": {"class_type": "LoadMaskBundle", "inputs": {"bundle_name": "banded.safetensors"}},
        "patch": {"class_type": "PatchModelAttention", "inputs": {
            "model": ["unet", 0], "bundle": ["bundle", 0], "dense_first_percent": 25.0,
            "dense_last_percent": 0.0, "quality": 0.0}},
        # patch, then compile
        "compile_after": {"class_type": "TorchCompileModel", "inputs": {"model": ["patch", 0], "backend": backend}},
        # compile, then patch
        "compile_first": {"class_type": "TorchCompileModel", "inputs": {"model": ["unet", 0], "backend": backend}},
        "patch_compiled": {"class_type": "PatchModelAttention", "inputs": {
            "model": ["compile_first", 0], "bundle": ["bundle", 0], "dense_first_percent": 25.0,
            "dense_last_percent": 0.0, "quality": 0.0}},
    }
    for name, model in (("eager", "patch"), ("unpatched", "unet"), ("after", "compile_after"),
                        ("first", "patch_compiled")):
        p[f"ks_{name}"] = {"class_type": "KSampler", "inputs": {
            "model": [model, 0], "seed": seed, "steps": STEPS, "cfg": 3.0, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["cond", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "denoise": 1.0}}
        p[f"save_{name}"] = {"class_type": "SaveLatent", "inputs": {"samples": [f"ks_{name}", 0],
                                                                    "filename_prefix": f"latents/{name}"}}
    return p


def _latent(server, entry, save_id):
    from safetensors.torch import load_file

    info = entry["outputs"][save_id]["latents"][0]
    return load_file(str(server.base / "output" / info["subfolder"] / info["filename"]))["latent_tensor"].float()


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _run(comfy, backend, timeout, seed):
    # Each test its own seed: ComfyUI would reuse the cached outputs of an identical uncompiled sampler.
    start = len(comfy.log_path.read_text(errors="replace"))
    entry = comfy.run(_prompt(backend, seed), timeout=timeout)
    err = H.status_error(entry)
    assert err is None, err + "\n" + comfy.log_tail()
    log = comfy.log_path.read_text(errors="replace")[start:]
    return entry, log


def _check(comfy, entry, log):
    lat = {n: _latent(comfy, entry, f"save_{n}") for n in ("eager", "unpatched", "after", "first")}
    for n in ("after", "first"):
        assert rel(lat[n], lat["eager"]) < 1e-4, (n, rel(lat[n], lat["eager"]))
    assert 1e-5 < rel(lat["eager"], lat["unpatched"]) < 0.5  # the bundle really changes the output
    # Every self-attention call of every evaluation was routed (2 layers), in the compiled samplers through the op.
    routed = re.findall(r"(\d+) self-attention calls routed over (\d+) model evaluations \(2 layers\)", log)
    assert len(routed) == 3 and all(int(n) == 2 * int(e) and int(e) == STEPS for n, e in routed), routed
    compiled = [int(n) for n in re.findall(r"(\d+) of the routed calls ran inside a compiled model", log)]
    assert compiled == [2 * STEPS, 2 * STEPS], compiled
    # No graph break and no recompile in the run: one trace serves every step, bucket and dense step. (The one
    # exception: the first sampler of a later test meets the graph the earlier test compiled with another backend,
    # which dynamo recompiles for the new backend, reason BACKEND_MATCH.)
    assert "Graph break" not in log, log[log.index("Graph break") - 2000:][:6000]
    reasons = re.findall(r"\[__recompiles\]\s+- \d+/\d+: (.*)", log)
    assert "Recompiling function" not in log or (reasons and all("BACKEND_MATCH" in r for r in reasons)), \
        log[log.index("Recompiling function"):][:6000]


def test_torch_compile_model_cudagraphs_backend_matches_eager_patch(comfy):
    entry, log = _run(comfy, "cudagraphs", 600, seed=3)
    _check(comfy, entry, log)


@pytest.mark.slow
def test_torch_compile_model_inductor_backend_matches_eager_patch(comfy):
    entry, log = _run(comfy, "inductor", 900, seed=4)
    _check(comfy, entry, log)
