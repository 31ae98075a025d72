"""The patch with the model files users load instead of the plain checkpoint, through a real ComfyUI (set
COMFYUI_PATH; see docs/COMFYUI.md): a LoRA (LoraLoaderModelOnly before and after Patch Model Attention), fp8
weights (UNETLoader weight_dtype), a GGUF-quantized model (ComfyUI-GGUF's UnetLoaderGGUF), Wan 2.2's two experts
(KSamplerAdvanced), a few-step distilled schedule (the "distilled" eps preset, 4 steps at CFG 1), and low-VRAM
partial loading (in-process: ComfyUI refuses --lowvram together with --cpu, and a CPU-only torch cannot start it
without --cpu; on a CPU load_models_gpu never loads partially).

One server for the module. The files are tiny and random (tests/comfyui_harness.py, tests/comfyui_model_variants.py);
bundles are built by the engine for the signature and grid the nodes read off the loaded model ("full": every block
kept, must reproduce the unpatched model; "band": a real, bounded change), or calibrated by the node. The summary
line each patched sampling run logs ("N self-attention calls routed over E model evaluations (L layers)") shows
N = E x L: every self-attention call was routed, none passed through.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import comfyui_families as F
import comfyui_harness as H

pytestmark = H.NEEDS_COMFYUI

import comfyui_model_variants as M  # noqa: E402
from calibatt.masks import load_bundle, save_bundle  # noqa: E402

VIDEO = {"width": 128, "height": 64, "length": 9}  # latent [1, 16, 3, 8, 16] -> 3 x 4 x 8 = 96 tokens
STEPS = 4
BLOCK = 16
TEXT = 32  # T5-shaped text tokens per prompt
LAYERS = 2
LORA = "tiny_wan_lora.safetensors"
DISTILLED_EPS = {"A": 0.763, "C": 0.863, "k": 5.64, "preset": "distilled"}
SUMMARY = re.compile(r"Patch Model Attention: (\d+) self-attention calls routed over (\d+) model evaluations "
                     r"\((\d+) layers\); (\d+) other attention calls ran unchanged")

rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def base_sd():
    return H.tiny_wan_state_dict()


@pytest.fixture(scope="module")
def lora_sd(base_sd):
    return M.tiny_wan_lora(base_sd)


@pytest.fixture(scope="module")
def facts(base_sd):
    """(signature, layout, grid) the nodes read off the plain checkpoint."""
    return F.model_facts(F.load_model(base_sd), VIDEO)


@pytest.fixture(scope="module")
def comfy(base_sd, lora_sd, facts):
    """One server with the base checkpoint, a second expert, the LoRA, the GGUF file and ComfyUI-GGUF
    (where its code and the gguf package are at hand), and the engine-built bundles."""
    from safetensors.torch import save_file

    base = H.make_base_dir()
    H.ComfyServer.prepare_base(base)
    models = base / "models"
    (models / "loras").mkdir(parents=True, exist_ok=True)
    save_file(base_sd, str(models / "diffusion_models" / "tiny_wan.safetensors"))
    save_file(H.tiny_wan_state_dict(seed=1), str(models / "diffusion_models" / "tiny_wan_low.safetensors"))
    save_file(lora_sd, str(models / "loras" / LORA))
    gguf_skip = M.gguf_node_missing()
    gguf_counts = None
    if gguf_skip is None:
        M.extract_gguf_node(base / "custom_nodes")
        gguf_counts = M.write_tiny_wan_gguf(base_sd, models / "diffusion_models" / "tiny_wan.gguf")
    sig, _, grid = facts
    for kind in ("full", "band"):
        save_bundle(F.kind_bundle(sig, grid, kind, BLOCK), models / "sparse_attention" / f"{kind}.safetensors")
    server = H.ComfyServer(H.COMFY, base, env_extra={"PYTHONUNBUFFERED": "1"})
    server.start()
    server.gguf_skip, server.gguf_counts = gguf_skip, gguf_counts
    yield server
    server.stop()
    H.remove_base_dir(base)


# ------------------------------------------------------------------------------------------- graph pieces
def _graph(prompts: int = 1) -> dict:
    return H.tiny_wan_graph(**VIDEO, prompts=prompts, tokens=TEXT)


def _ksampler(p: dict, name: str, model, steps: int = STEPS, cfg: float = 3.0):
    p[f"ks_{name}"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": 3, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "simple",
        "positive": ["cond", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}}
    p[f"save_{name}"] = {"class_type": "SaveLatent", "inputs": {"samples": [f"ks_{name}", 0],
                                                                "filename_prefix": f"latents/{name}"}}


def _patch(p: dict, name: str, model, bundle_file: str):
    p[f"load_{name}"] = {"class_type": "LoadMaskBundle", "inputs": {"bundle_name": bundle_file}}
    p[f"patch_{name}"] = {"class_type": "PatchModelAttention", "inputs": {
        "model": model, "bundle": [f"load_{name}", 0], "dense_first_percent": 0.0, "dense_last_percent": 0.0,
        "quality": 0.0}}
    return [f"patch_{name}", 0]


def _lora(p: dict, name: str, model):
    p[f"lora_{name}"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": model, "lora_name": LORA, "strength_model": 1.0}}
    return [f"lora_{name}", 0]


def _calibrate(p: dict, name: str, model, steps: int = STEPS, cfg: float = 3.0, preset: str = "custom"):
    p[f"calib_{name}"] = {"class_type": "CalibrateSparseAttention", "inputs": dict(
        VIDEO, model=model, prompts="", steps=steps, cfg=cfg, sampler_name="euler", scheduler="simple", seed=11,
        preset=preset, eps_A=0.4, eps_C=0.6, eps_k=4.0, rho=0.5, filename=name, positive=["cond", 0],
        negative=["neg", 0], block_size=BLOCK)}
    p[f"preview_{name}"] = {"class_type": "SaveImage", "inputs": {"images": [f"calib_{name}", 1],
                                                                  "filename_prefix": name}}


def _run(comfy, p: dict, names) -> tuple:
    """-> ({name: latent}, [(routed, evaluations, layers, other) per patched sampling run], log text)."""
    entry, log_text = F.run_logged(comfy, p, timeout=600)
    latents = {n: F.read_latent(comfy, entry, f"save_{n}") for n in names}
    summaries = [tuple(int(x) for x in m) for m in SUMMARY.findall(log_text)]
    return latents, summaries, log_text


def _assert_all_routed(summaries: list, runs: int, evaluations: int = STEPS):
    """Each patched run routed every self-attention call: N = E x L, and the E x L text cross-attention calls
    are the "other" calls."""
    assert len(summaries) == runs, summaries
    for routed, e, layers, other in summaries:
        assert layers == LAYERS and e >= evaluations, (routed, e, layers, other)
        assert routed == e * layers and other == e * layers, (routed, e, layers, other)


def _bundle(comfy, name: str):
    return load_bundle(comfy.base / "models" / "sparse_attention" / f"{name}.safetensors")


# ------------------------------------------------------------------------------------------------- LoRA
def test_lora_before_and_after_the_patch(comfy):
    """LoraLoaderModelOnly after Patch Model Attention and before it: the LoRA really changes the output (every
    key placed, none "not loaded"), the patch routes every self-attention call of the LoRA'd model, an all-keep
    bundle reproduces the LoRA'd model, and the order does not matter (the patch touches attention, the LoRA
    weights)."""
    p = _graph()
    lora = _lora(p, "plain", ["unet", 0])
    _ksampler(p, "base", ["unet", 0])
    _ksampler(p, "lora", lora)
    _ksampler(p, "full_lora_then_patch", _patch(p, "after_full", lora, "full.safetensors"))
    _ksampler(p, "band_lora_then_patch", _patch(p, "after_band", lora, "band.safetensors"))
    _ksampler(p, "band_patch_then_lora",
              _lora(p, "on_band", _patch(p, "before_band", ["unet", 0], "band.safetensors")))
    names = ["base", "lora", "full_lora_then_patch", "band_lora_then_patch", "band_patch_then_lora"]
    out, summaries, log_text = _run(comfy, p, names)

    assert "lora key not loaded" not in log_text
    for name in names:
        assert torch.isfinite(out[name]).all(), name
    assert rel(out["lora"], out["base"]) > 0.05, rel(out["lora"], out["base"])  # measured 0.93
    _assert_all_routed(summaries, runs=3)
    assert rel(out["full_lora_then_patch"], out["lora"]) < 1e-3, rel(out["full_lora_then_patch"], out["lora"])
    for order in ("lora_then_patch", "patch_then_lora"):
        d = rel(out[f"band_{order}"], out["lora"])
        assert 1e-5 < d < 0.5, (order, d)  # measured 0.18
    assert rel(out["band_patch_then_lora"], out["band_lora_then_patch"]) < 1e-4


@pytest.fixture(scope="module")
def calibrated(comfy):
    """Calibrate Sparse Attention on the plain model and on the LoRA'd model (2 prompts, 4 steps, one graph)."""
    p = _graph(prompts=2)
    _calibrate(p, "cal_base", ["unet", 0])
    _calibrate(p, "cal_lora", _lora(p, "cal", ["unet", 0]))
    F.run_logged(comfy, p, timeout=600)
    return {name: _bundle(comfy, name) for name in ("cal_base", "cal_lora")}


def test_signature_fingerprint_ignores_lora_and_weight_dtype(base_sd, lora_sd, facts):
    """In-process, as the nodes read it (describe_model -> signature_from_config): the plain model, the model with
    the LoRA applied (comfy.sd.load_lora_for_models, what LoraLoaderModelOnly calls) and the fp8 loads of the same
    file have one signature and fingerprint; the fp8 weights really are fp8."""
    F.import_comfy()
    import comfy.sd

    sig = facts[0]
    base = F.load_model(base_sd)
    lora_model, _ = comfy.sd.load_lora_for_models(base, None, lora_sd, 1.0, 0.0)
    assert len(lora_model.patches) > 0  # the LoRA's patches are on the clone
    variants = {"lora": lora_model}
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        m = comfy.sd.load_diffusion_model_state_dict(dict(base_sd), model_options={"dtype": dtype})
        assert m.model.diffusion_model.blocks[0].self_attn.q.weight.dtype == dtype
        variants[str(dtype)] = m
    for name, model in variants.items():
        s = F.model_facts(model, VIDEO)[0]
        assert s == sig and s.fingerprint() == sig.fingerprint(), name


def test_bundle_calibrated_on_base_patches_lora_model_and_vice_versa(comfy, calibrated, facts):
    """A bundle calibrated on the plain model carries the same signature fingerprint as one calibrated on the
    LoRA'd model; each patches the other model (the patch node checks the signature): every self-attention call
    routed, a bounded change."""
    sig = facts[0]
    for name, b in calibrated.items():
        assert b.signature == sig and b.signature.fingerprint() == sig.fingerprint(), name
        assert b.settings["prompts"] == 2 and len(b.calibrated_sigmas) == STEPS
        assert 0.05 < b.density < 0.85, b.summary()
    # The LoRA changes the model's attention, and the calibration sees it.
    assert calibrated["cal_base"].content_hash() != calibrated["cal_lora"].content_hash()

    p = _graph()
    lora = _lora(p, "x", ["unet", 0])
    _ksampler(p, "base", ["unet", 0])
    _ksampler(p, "lora", lora)
    _ksampler(p, "lora_with_base_bundle", _patch(p, "lb", lora, "cal_base.safetensors"))
    _ksampler(p, "base_with_lora_bundle", _patch(p, "bl", ["unet", 0], "cal_lora.safetensors"))
    out, summaries, _ = _run(comfy, p, ["base", "lora", "lora_with_base_bundle", "base_with_lora_bundle"])
    _assert_all_routed(summaries, runs=2)
    for patched, dense in (("lora_with_base_bundle", "lora"), ("base_with_lora_bundle", "base")):
        assert torch.isfinite(out[patched]).all()
        d = rel(out[patched], out[dense])
        assert 1e-5 < d < 0.5, (patched, d)


# ------------------------------------------------------------------------------------------------- fp8
def test_fp8_weight_checkpoints_patch_and_sample(comfy):
    """UNETLoader with weight_dtype fp8_e4m3fn and fp8_e5m2 on the CPU (ComfyUI stores the weights in fp8 and
    casts them per layer): the base-model bundles patch it (same signature), every self-attention call is routed,
    an all-keep bundle reproduces the unpatched fp8 model, and the fp8 output is the fp16 model's up to
    quantization."""
    p = _graph()
    _ksampler(p, "fp16", ["unet", 0])
    for dtype in ("fp8_e4m3fn", "fp8_e5m2"):
        p[f"unet_{dtype}"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_wan.safetensors",
                                                                     "weight_dtype": dtype}}
        _ksampler(p, f"{dtype}_dense", [f"unet_{dtype}", 0])
        _ksampler(p, f"{dtype}_band", _patch(p, f"{dtype}_band", [f"unet_{dtype}", 0], "band.safetensors"))
    _ksampler(p, "fp8_e4m3fn_full", _patch(p, "e4_full", ["unet_fp8_e4m3fn", 0], "full.safetensors"))
    names = ["fp16"] + [f"{d}_{k}" for d in ("fp8_e4m3fn", "fp8_e5m2") for k in ("dense", "band")] \
        + ["fp8_e4m3fn_full"]
    out, summaries, log_text = _run(comfy, p, names)

    for dtype in ("fp8_e4m3fn", "fp8_e5m2"):
        torch_dtype = "torch.float8_e4m3fn" if dtype == "fp8_e4m3fn" else "torch.float8_e5m2"
        assert f"model weight dtype {torch_dtype}" in log_text, log_text[-3000:]
    _assert_all_routed(summaries, runs=3)
    for name in names:
        assert torch.isfinite(out[name]).all(), name
    for dtype in ("fp8_e4m3fn", "fp8_e5m2"):
        q = rel(out[f"{dtype}_dense"], out["fp16"])
        assert 1e-4 < q < 0.5, (dtype, q)  # really quantized, still the same model
        d = rel(out[f"{dtype}_band"], out[f"{dtype}_dense"])
        assert 1e-5 < d < 0.5, (dtype, d)
    assert rel(out["fp8_e4m3fn_full"], out["fp8_e4m3fn_dense"]) < 1e-3


# ------------------------------------------------------------------------------------------------- GGUF
def test_gguf_model_through_comfyui_gguf(comfy, facts, request):
    """ComfyUI-GGUF's UnetLoaderGGUF loads the tiny Wan written as a Q8_0 / Q4_0 GGUF file; the base-model
    bundles patch it (the patch node accepts its signature), every self-attention call is routed, the output is
    finite, an all-keep bundle reproduces the unpatched GGUF model, and Calibrate Sparse Attention on the GGUF
    model writes a bundle with the safetensors model's signature fingerprint."""
    if comfy.gguf_skip:
        pytest.skip(comfy.gguf_skip)
    calibrated = request.getfixturevalue("calibrated")  # only once the test is sure to run
    assert "UnetLoaderGGUF" in comfy.object_info(), f"ComfyUI-GGUF did not register:\n{comfy.log_tail()}"
    assert comfy.gguf_counts.get("Q8_0") and comfy.gguf_counts.get("Q4_0"), comfy.gguf_counts
    p = _graph(prompts=2)
    p["gguf"] = {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": "tiny_wan.gguf"}}
    _calibrate(p, "cal_gguf", ["gguf", 0])
    F.run_logged(comfy, p, timeout=600)
    b = _bundle(comfy, "cal_gguf")
    sig = facts[0]
    assert b.signature == sig and b.signature.fingerprint() == calibrated["cal_base"].signature.fingerprint()
    assert b.settings["prompts"] == 2 and len(b.calibrated_sigmas) == STEPS

    p = _graph()
    p["gguf"] = {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": "tiny_wan.gguf"}}
    _ksampler(p, "fp16", ["unet", 0])
    _ksampler(p, "gguf", ["gguf", 0])
    _ksampler(p, "gguf_full", _patch(p, "full", ["gguf", 0], "full.safetensors"))
    _ksampler(p, "gguf_calibrated", _patch(p, "cal", ["gguf", 0], "cal_base.safetensors"))
    out, summaries, _ = _run(comfy, p, ["fp16", "gguf", "gguf_full", "gguf_calibrated"])
    # ComfyUI-GGUF kept the quantized tensors as such (its loader logs the types it read).
    qtypes = re.search(r"gguf qtypes: (.*)", comfy.log_path.read_text(errors="replace"))
    assert qtypes and f"Q8_0 ({comfy.gguf_counts['Q8_0']})" in qtypes.group(1) \
        and f"Q4_0 ({comfy.gguf_counts['Q4_0']})" in qtypes.group(1), qtypes
    _assert_all_routed(summaries, runs=2)
    for name in ("gguf", "gguf_full", "gguf_calibrated"):
        assert torch.isfinite(out[name]).all(), name
    q = rel(out["gguf"], out["fp16"])
    assert 1e-4 < q < 0.5, q  # the quantized weights are used, and they are the same model's
    assert rel(out["gguf_full"], out["gguf"]) < 1e-3
    d = rel(out["gguf_calibrated"], out["gguf"])
    assert 1e-5 < d < 0.5, d


# ------------------------------------------------------------------------------------ Wan 2.2 two experts
def _two_experts(p: dict, name: str, high, low, split: int = 2):
    """Wan 2.2 A14B: the high-noise expert samples steps [0, split), the low-noise expert the rest."""
    common = {"noise_seed": 5, "steps": STEPS, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple",
              "positive": ["cond", 0], "negative": ["neg", 0]}
    p[f"hi_{name}"] = {"class_type": "KSamplerAdvanced", "inputs": dict(
        common, model=high, add_noise="enable", latent_image=["latent", 0], start_at_step=0, end_at_step=split,
        return_with_leftover_noise="enable")}
    p[f"lo_{name}"] = {"class_type": "KSamplerAdvanced", "inputs": dict(
        common, model=low, add_noise="disable", latent_image=[f"hi_{name}", 0], start_at_step=split,
        end_at_step=10000, return_with_leftover_noise="disable")}
    p[f"save_{name}"] = {"class_type": "SaveLatent", "inputs": {"samples": [f"lo_{name}", 0],
                                                                "filename_prefix": f"latents/{name}"}}


def test_wan22_two_experts_each_with_its_own_bundle(comfy):
    """Two different experts (the A14B layout: two Wan 2.1-shaped models), each patched with its own bundle, split
    by KSamplerAdvanced at step 2 of 4: each expert's run routes every self-attention call of its 2 steps; all-keep
    on both reproduces the unpatched pair; the banded bundle on either expert alone changes the result boundedly,
    and differently (each expert really runs with its own bundle)."""
    p = _graph()
    p["unet_low"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_wan_low.safetensors",
                                                           "weight_dtype": "default"}}
    hi, lo = ["unet", 0], ["unet_low", 0]
    _two_experts(p, "dense", hi, lo)
    _two_experts(p, "full_full", _patch(p, "hi_full", hi, "full.safetensors"),
                 _patch(p, "lo_full", lo, "full.safetensors"))
    _two_experts(p, "band_full", _patch(p, "hi_band", hi, "band.safetensors"), ["patch_lo_full", 0])
    _two_experts(p, "full_band", ["patch_hi_full", 0], _patch(p, "lo_band", lo, "band.safetensors"))
    out, summaries, _ = _run(comfy, p, ["dense", "full_full", "band_full", "full_band"])

    # 3 pipelines x 2 patched experts, each over its own 2 of the 4 steps; "full_band" starts with exactly the
    # high-noise run of "full_full" (same node inputs), which ComfyUI's cache runs once: 5 patched runs.
    _assert_all_routed(summaries, runs=5, evaluations=2)
    assert all(e == 2 for _, e, _, _ in summaries), summaries
    assert rel(out["full_full"], out["dense"]) < 1e-3
    for name in ("band_full", "full_band"):
        d = rel(out[name], out["dense"])
        assert 1e-5 < d < 0.5, (name, d)
    assert rel(out["band_full"], out["full_band"]) > 1e-5


# ------------------------------------------------------------------------------- few-step distilled models
def test_distilled_preset_calibrates_a_four_step_cfg1_schedule(comfy):
    """The paper's distilled schedule (preset "distilled": A 0.763, C 0.863, k 5.64) on a LightX2V-style run:
    4 steps at CFG 1, with the LoRA standing in for the distillation LoRA. The bundle records the preset's eps,
    4 calibrated steps and 2 prompts, keeps less as the steps go on (eps falls), and patching the same 4-step CFG 1
    sampling routes every self-attention call (CFG 1: one conditional evaluation per step) with a bounded change."""
    p = _graph(prompts=2)
    _calibrate(p, "cal_distilled", _lora(p, "d", ["unet", 0]), steps=4, cfg=1.0, preset="distilled")
    F.run_logged(comfy, p, timeout=600)
    b = _bundle(comfy, "cal_distilled")
    eps = {key: b.settings["calibration"][key] for key in DISTILLED_EPS}
    assert eps == DISTILLED_EPS, eps
    assert len(b.calibrated_sigmas) == 4 and b.settings["prompts"] == 2
    schedule = [round(0.763 + 0.1 * math.exp(-5.64 * t / 4), 6) for t in range(4)]
    assert b.settings["eps_per_step"] == pytest.approx(schedule, abs=1e-6), b.settings["eps_per_step"]
    steps = b.step_densities()
    # Measured 0.80 (0.85 at the first step, 0.78 at the last): the random model's attention is diffuse at the
    # block level, so eps 0.76-0.86 keeps most blocks; the bundle must still skip some.
    assert 0.05 < b.density < 0.9 and steps[0] >= steps[-1], (b.summary(), steps)

    p = _graph()
    lora = _lora(p, "x", ["unet", 0])
    _ksampler(p, "dense", lora, steps=4, cfg=1.0)
    _ksampler(p, "sparse", _patch(p, "d", lora, "cal_distilled.safetensors"), steps=4, cfg=1.0)
    out, summaries, _ = _run(comfy, p, ["dense", "sparse"])
    _assert_all_routed(summaries, runs=1, evaluations=4)
    assert summaries[0][1] == 4, summaries  # CFG 1: no unconditional evaluation
    assert torch.isfinite(out["sparse"]).all()
    d = rel(out["sparse"], out["dense"])
    assert 1e-5 < d < 0.5, d


# ---------------------------------------------------------------------------- partial loading (in-process)
def test_partially_loaded_model_routes_and_matches(base_sd, lora_sd, facts, monkeypatch):
    """Low-VRAM partial loading: ComfyUI loads only part of the weights and casts the rest per layer at call time
    (with the LoRA applied per call, not merged). On a CPU load_models_gpu never loads partially (the VRAM state is
    DISABLED), so here LoadedModel.model_load gets the budget a small GPU would (a third of the model) and the real
    ModelPatcher.partially_load does the rest. With the router installed as the node does (dense cutoff 1, so the
    all-keep bundle runs the block-sparse path), every self-attention call is routed and the result matches the
    unpatched, equally partially loaded model."""
    F.import_comfy()
    import comfy.model_management as mm
    import comfy.sample
    import comfy.sd
    from calibatt.kernels.runner import SparseRunner
    from calibatt.nodes.comfy_glue import describe_model, install
    from calibatt.nodes.routing import AttentionRouter

    base = F.load_model(base_sd)
    model, _ = comfy.sd.load_lora_for_models(base, None, lora_sd, 1.0, 0.0)
    budget = model.model_size() // 3
    seen = []
    original = mm.LoadedModel.model_load

    def partial_load(self, lowvram_model_memory=0, force_patch_weights=False):
        out = original(self, budget, force_patch_weights=force_patch_weights)
        seen.append((self.model.loaded_size(), self.model.model_size(), self.model.model.model_lowvram,
                     self.model.lowvram_patch_counter()))
        return out

    monkeypatch.setattr(mm.LoadedModel, "model_load", partial_load)
    sig, layout, grid = facts
    runner = SparseRunner(F.kind_bundle(sig, grid, "full", BLOCK), dense_cutoff=1.0)
    router = AttentionRouter(sig, layout, describe_model(model), handler=runner, step_hook=runner.begin_step)
    paths = []
    router.handler = lambda call: (paths.append(runner.route(call.layer)), runner(call))[1]
    patched = install(model, router, describe_model(model), on_end=runner.end)

    g = torch.Generator().manual_seed(1)
    pos = [[torch.randn(1, TEXT, 4096, generator=g), {}]]
    neg = [[torch.zeros(1, TEXT, 4096), {}]]
    latent = torch.zeros(1, 16, 3, 8, 16)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(2))
    try:
        out = [comfy.sample.sample(m, noise, STEPS, 3.0, "euler", "simple", pos, neg, latent, seed=1,
                                   disable_pbar=True) for m in (model, patched)]
    finally:
        mm.unload_all_models()
    assert seen, "sampling did not load the model"
    for loaded, size, lowvram, lora_patches in seen:
        assert loaded < size and lowvram, (loaded, size, lowvram)  # really partially loaded
        assert lora_patches > 0  # LoRA weights of the streamed layers are patched per call
    assert router.routed == STEPS * LAYERS and paths == ["sparse"] * router.routed, (router.routed, set(paths))
    assert runner.held is None and runner.bundle.resident() == []  # sampling ended: nothing left on the device
    assert torch.isfinite(out[1]).all()
    assert rel(out[1], out[0]) < 1e-4, rel(out[1], out[0])
