"""Patch Model Attention next to the attention stack users already run (set COMFYUI_PATH; docs/COMPATIBILITY.md).

One headless ComfyUI (CPU), started with --use-split-cross-attention so that ComfyUI's global attention backend (the
`func` every override is handed) is a chosen one, attention_split, not the CPU default. The tiny Wan 2.1 T2V
checkpoint of tests/comfyui_harness.py, a banded bundle (each query block keeps its own and the neighbouring key
blocks), 2 layers, 96 video tokens. Test-only nodes (tests/comfyui_coexist.py, written into the temporary
custom_nodes) stand in for ComfyUI core's Model Sparse Attention, for an attention-backend selector and for a
TeaCache-style step cache, and log what they served; EasyCache and LazyCache are ComfyUI's own nodes (both trees).

What each test proves is listed in docs/COMPATIBILITY.md, one row per combination.
"""

from __future__ import annotations

import pytest
import torch

import comfyui_coexist as C
import comfyui_families as F
import comfyui_harness as H
from comfyui_harness import COMFY

pytestmark = H.NEEDS_COMFYUI

from calibatt.masks import TokenGrid, save_bundle, signatures  # noqa: E402

W, HGT, LEN = 128, 64, 9  # latent [1, 16, 3, 8, 16] -> 3 x 4 x 8 = 96 tokens
TOKENS = 96
LAYERS = 2
STEPS = 4
DENSE_FIRST = 50.0  # our first 2 of 4 steps run on the dense fallback, the last 2 sparse
CACHE_STEPS = 8
GRID = TokenGrid(frames=3, height=4, width=8)
SIGNATURE = signatures.wan(num_layers=LAYERS, num_heads=2, head_dim=128, in_channels=16, out_channels=16,
                           patch=(1, 2, 2), image_embedding=False)
GLOBAL_BACKEND = "attention_split"  # what --use-split-cross-attention makes ComfyUI hand every override as func
BUNDLE = "tiny_band.safetensors"

rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731


@pytest.fixture(scope="module")
def comfy():
    from safetensors.torch import save_file

    base = H.make_base_dir()
    H.ComfyServer.prepare_base(base)
    (base / "custom_nodes" / "calibatt_test_coexist.py").write_text(C.COEXIST_NODE_SOURCE)
    save_file(H.tiny_wan_state_dict(), str(base / "models/diffusion_models/tiny_wan.safetensors"))
    save_bundle(F.kind_bundle(SIGNATURE, GRID, "band", 16), base / "models" / "sparse_attention" / BUNDLE)
    server = H.ComfyServer(COMFY, base, env_extra={"PYTHONUNBUFFERED": "1"},
                           extra_args=["--use-split-cross-attention"])
    server.start()
    yield server
    server.stop()
    H.remove_base_dir(base)


def _graph() -> dict:
    return {
        **H.tiny_wan_graph(W, HGT, LEN),
        "load": {"class_type": "LoadMaskBundle", "inputs": {"bundle_name": BUNDLE}},
    }


def _ours(model_ref, dense_first=0.0) -> dict:
    return {"class_type": "PatchModelAttention", "inputs": {
        "model": model_ref, "bundle": ["load", 0], "dense_first_percent": dense_first, "dense_last_percent": 0.0,
        "quality": 0.0}}


def _sample(p: dict, model_ref, name: str, steps=STEPS):
    p[f"ks_{name}"] = {"class_type": "KSampler", "inputs": {
        "model": model_ref, "seed": 3, "steps": steps, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple",
        "positive": ["cond", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}}
    p[f"save_{name}"] = {"class_type": "SaveLatent", "inputs": {"samples": [f"ks_{name}", 0],
                                                               "filename_prefix": f"latents/{name}"}}


def _latent(server, entry, name):
    from safetensors.torch import load_file

    info = entry["outputs"][f"save_{name}"]["latents"][0]
    out = load_file(str(server.base / "output" / info["subfolder"] / info["filename"]))["latent_tensor"].float()
    assert torch.isfinite(out).all(), f"{name}: non-finite output"
    return out


def _run_one(server, p, name):
    """-> (latent, log of this prompt)."""
    entry, log = F.run_logged(server, p)
    return _latent(server, entry, name), log


def _stack(order: str, other: dict, dense_first=0.0) -> dict:
    """A graph with our patch and `other` (a node dict with a "model" input) applied in `order`, sampled as 'out'."""
    p = _graph()
    steps = other.get("steps", STEPS)
    other = {"class_type": other["class_type"], "inputs": dict(other["inputs"])}
    if order == "ours_first":
        p["ours"] = _ours(["unet", 0], dense_first)
        other["inputs"]["model"] = ["ours", 0]
        p["other"] = other
        _sample(p, ["other", 0], "out", steps)
    else:
        other["inputs"]["model"] = ["unet", 0]
        p["other"] = other
        p["ours"] = _ours(["other", 0], dense_first)
        _sample(p, ["ours", 0], "out", steps)
    return p


def _reference(server, dense_first=0.0, steps=STEPS):
    """(unpatched, ours alone) latents."""
    p = _graph()
    p["ours"] = _ours(["unet", 0], dense_first)
    _sample(p, ["unet", 0], "plain", steps)
    _sample(p, ["ours", 0], "alone", steps)
    entry, log = F.run_logged(server, p)
    assert C.summaries(log) == [(steps * LAYERS, steps, LAYERS, steps * LAYERS)], C.summaries(log)
    return _latent(server, entry, "plain"), _latent(server, entry, "alone")


def _step_sigmas(counts: dict) -> list:
    """The run's step sigmas, noisiest first, from a report's per-sigma counts."""
    return sorted((float(s) for s in counts), reverse=True)


def test_global_backend_is_the_one_comfyui_was_started_with(comfy):
    assert "Using split optimization for attention" in comfy.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def reference(comfy):
    return _reference(comfy, DENSE_FIRST)


def test_model_sparse_attention_stand_in_in_either_order(comfy, reference):
    """ComfyUI core's Model Sparse Attention (reproduced by CalibAttTestSparseStandIn: on top at patch time, declines
    to previous/func, re-installs itself every step) and ours in one graph, in both node orders: ours answers every
    attention call first and serves the self-attention of the steps it runs sparse; the other node serves what ours
    hands down (its dense first 50%: 2 of 4 steps); neither is dropped, the chain stays the same length every step,
    and both orders give the same result."""
    plain, alone = reference
    outs = {}
    for order in ("ours_first", "stand_in_first"):
        tag = f"sparse_{order}"
        p = _stack(order, {"class_type": "CalibAttTestSparseStandIn", "inputs": {"tag": tag, "min_tokens": 0}},
                   DENSE_FIRST)
        outs[order], log = _run_one(comfy, p, "out")
        rep = C.reports(log)[tag]
        # Ours routed every self-attention call of every evaluation (CFG batched: one evaluation per step).
        assert C.summaries(log) == [(STEPS * LAYERS, STEPS, LAYERS, STEPS * LAYERS)], (order, C.summaries(log))
        sigmas = _step_sigmas(rep["entries"])
        assert len(sigmas) == STEPS, rep
        dense_steps = sigmas[:2]
        # The other node served exactly the self-attention calls of our dense steps, one per layer; the self-attention
        # of our sparse steps never reached it (ours served those).
        assert sorted(map(tuple, rep["served"])) == sorted((s, TOKENS) for s in dense_steps for _ in range(LAYERS)), \
            (order, rep)
        # How the chain looks. Ours first: the stand-in wrapped ours at patch time and never re-installed (its
        # override stayed on top of the run's options). Stand-in first: ours wrapped it at patch time, so in the
        # first step it wrapped ours once more (two of its overrides in the chain) and then left it alone.
        presences = {"ours_first": 1, "stand_in_first": 2}[order]
        assert (rep["installed"], rep["reinstalls"]) == (presences, presences - 1), (order, rep)
        # Cross-attention is declined by every copy of the stand-in down to func; the same count every step, so the
        # chain did not grow while both re-installed each step.
        assert rep["declined"] == {"cross": STEPS * LAYERS * presences}, (order, rep)
        for s in sigmas:
            want = LAYERS * presences + (LAYERS if s in dense_steps else 0)
            assert rep["entries"][repr(s)] == want, (order, s, rep)
        # Not silent: our log names the other override and says which answers first.
        lines = [ln for ln in log.splitlines() if "another attention override is installed" in ln]
        assert len(lines) == 1 and "calibatt_test_coexist" in lines[0], lines
    assert torch.equal(outs["ours_first"], outs["stand_in_first"])
    # The stand-in's kernel is exact attention, like the global backend ours falls back to when alone.
    assert rel(outs["ours_first"], alone) < 1e-4, rel(outs["ours_first"], alone)
    assert 1e-5 < rel(outs["ours_first"], plain) < 0.5, rel(outs["ours_first"], plain)


def test_attention_backend_override_is_our_dense_fallback_in_either_order(comfy, reference):
    """An attention-backend selector that replaces the override (KJNodes style; CalibAttTestBackendOverride) applied
    before or after ours: ours still routes every self-attention call, and everything ours does not serve sparse (its
    dense steps and all other attention) goes to that override, which is handed ComfyUI's global backend as func."""
    plain, alone = reference
    outs = {}
    for order in ("ours_first", "backend_first"):
        tag = f"backend_{order}"
        p = _stack(order, {"class_type": "CalibAttTestBackendOverride", "inputs": {"tag": tag}}, DENSE_FIRST)
        outs[order], log = _run_one(comfy, p, "out")
        rep = C.reports(log)[tag]
        assert C.summaries(log) == [(STEPS * LAYERS, STEPS, LAYERS, STEPS * LAYERS)], (order, C.summaries(log))
        assert rep["funcs"] == [GLOBAL_BACKEND], rep
        assert rep["cross_calls"] == STEPS * LAYERS, rep
        # Self-attention reached it only in our two dense steps (the noisiest two sigmas), once per layer each.
        selfs = rep["self_calls"]
        assert len(selfs) == 2 and set(selfs.values()) == {LAYERS}, rep
        lines = [ln for ln in log.splitlines() if "another attention override is installed" in ln]
        assert len(lines) == 1 and "CalibAttTestBackendOverride" in lines[0], lines
    # The backend override calls func, so ours on top of it computes exactly what ours alone does; without ours
    # (dropped by the replacing node) the result would be dense, i.e. `plain`.
    assert torch.equal(outs["ours_first"], alone) and torch.equal(outs["backend_first"], alone)
    assert 1e-5 < rel(alone, plain) < 0.5, rel(alone, plain)


@pytest.fixture(scope="module")
def cache_reference(comfy):
    return _reference(comfy, 0.0, CACHE_STEPS)


CACHES = {
    "EasyCache": {"class_type": "EasyCache", "inputs": {"reuse_threshold": 3.0, "start_percent": 0.0,
                                                        "end_percent": 1.0, "verbose": False}},
    "LazyCache": {"class_type": "LazyCache", "inputs": {"reuse_threshold": 3.0, "start_percent": 0.0,
                                                        "end_percent": 1.0, "verbose": False}},
    "StepCache": {"class_type": "CalibAttTestStepCache", "inputs": {"tag": "cache"}},
}


@pytest.mark.parametrize("order", ["ours_first", "cache_first"])
@pytest.mark.parametrize("cache", list(CACHES))
def test_step_caches_skip_and_ours_routes_the_rest(comfy, cache_reference, cache, order):
    """EasyCache (skips the diffusion model inside an evaluation), LazyCache (skips the whole evaluation) and a
    TeaCache/MagCache-style DIFFUSION_MODEL wrapper (every other evaluation reuses the previous output): sampling
    runs, the cache skips steps, and ours routes every self-attention call of the evaluations that ran the model."""
    _, alone = cache_reference
    node = dict(CACHES[cache], steps=CACHE_STEPS)
    if cache == "StepCache":
        node["inputs"] = dict(node["inputs"], tag=f"cache_{order}")
    out, log = _run_one(comfy, _stack(order, node), "out")
    [(routed, evaluations, layers, other)] = C.summaries(log)
    assert layers == LAYERS
    if cache == "StepCache":
        rep = C.reports(log)[f"cache_{order}"]
        skipped, total = rep["skipped"], rep["calls"]
        assert (skipped, total) == (CACHE_STEPS // 2, CACHE_STEPS), rep
    else:
        found = C.EASYCACHE.findall(log)
        assert len(found) == 1 and found[0][0] == cache, found
        skipped, total = int(found[0][1]), int(found[0][2])
        assert total == CACHE_STEPS and skipped > 0, found
    ran = CACHE_STEPS - skipped
    if cache == "LazyCache":  # skips before the model is called: no evaluation at all
        assert evaluations == ran, (evaluations, ran)
    else:  # the evaluation happens, the diffusion model inside it is skipped
        assert evaluations == CACHE_STEPS, evaluations
    assert routed == ran * LAYERS and other == ran * LAYERS, (routed, other, ran)
    # Reused outputs change the result (finite: checked by _latent); how much is the cache's business (EasyCache at
    # its loosest threshold on random weights drifts far).
    assert rel(out, alone) > 1e-5, rel(out, alone)
