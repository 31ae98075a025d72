"""Wan 2.1 I2V, Wan 2.2 I2V (A14B layout) and Wan 2.2 TI2V-5B through a real ComfyUI (set COMFYUI_PATH; see
docs/COMFYUI.md).

Tiny random checkpoints written from ComfyUI's own WanModel (tests/comfyui_wan_variants.py) are loaded by the
stock UNETLoader of a headless ComfyUI; a test-only node adds the image conditioning the stock WanImageToVideo /
Wan22ImageToVideoLatent nodes would (they need a real VAE and CLIP vision model). Each model is sampled through
Load Mask Bundle -> Patch Model Attention -> KSampler with bundles built for the signature and grid the nodes read
off the loaded model: an all-keep bundle matches the unpatched run, a banded bundle changes it boundedly, and the
per-run summary line shows every self-attention call routed (the image / text cross-attention calls are the
"other" calls). A bundle for Wan T2V fails at the patch node with the signature mismatch; Calibrate Sparse
Attention writes a bundle for each model that loads and patches.
"""

from __future__ import annotations

import re

import pytest
import torch

import comfyui_families as F
import comfyui_harness as H

pytestmark = H.NEEDS_COMFYUI

import comfyui_wan_variants as V  # noqa: E402
from calibatt.masks import load_bundle, save_bundle, signatures  # noqa: E402

STEPS = 3
BLOCK = 16
TEXT = 32  # T5-shaped text tokens per prompt
# Video sizes giving 3 x 4 x 8 = 96 tokens: Wan 2.1's VAE strides 4x8x8, Wan 2.2's 5B VAE 4x16x16.
VIDEO = {"wan21_i2v": {"width": 128, "height": 64, "length": 9},  # latent [1, 16, 3, 8, 16]
         "wan22_i2v": {"width": 128, "height": 64, "length": 9},
         "wan22_ti2v": {"width": 256, "height": 128, "length": 9}}  # latent [1, 48, 3, 8, 16]
# Attention calls per block besides self-attention: the text cross-attention, plus Wan 2.1 I2V's image
# cross-attention over the CLIP vision tokens.
CROSS_CALLS = {"wan21_i2v": 2, "wan22_i2v": 1, "wan22_ti2v": 1}
SUMMARY = re.compile(r"Patch Model Attention: (\d+) self-attention calls routed over (\d+) model evaluations "
                     r"\((\d+) layers\); (\d+) other attention calls ran unchanged")

rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731




@pytest.fixture(scope="module")
def state_dicts():
    return {v: V.tiny_wan_variant_state_dict(v) for v in V.VARIANTS}


@pytest.fixture(scope="module")
def facts(state_dicts):
    return {v: F.model_facts(F.load_model(sd), VIDEO[v]) for v, sd in state_dicts.items()}


def test_tiny_checkpoints_detect_as_the_intended_variants(state_dicts, facts):
    """ComfyUI 0.3.64's detection maps the files to WAN21_I2V (image_to_video, CLIP vision projection),
    WAN21_T2V with 36 input channels (Wan 2.2 I2V A14B has no img_emb) and WAN22_T2V (the TI2V-5B, out_dim 48);
    the nodes read the matching signatures and a 3x4x8-token grid at each model's own VAE stride."""
    for variant, sd in state_dicts.items():
        assert V.detected_class(sd) == V.DETECTED_AS[variant]
        cfg = F.detect(sd)
        want = V.VARIANTS[variant]
        assert {k: cfg[k] for k in want} == want
        assert (cfg["dim"], cfg["num_heads"], cfg["num_layers"]) == (V.DIM, V.HEADS, V.LAYERS)
    model = F.load_model(state_dicts["wan21_i2v"])
    assert model.model.image_to_video and model.model.diffusion_model.img_emb is not None
    assert type(F.load_model(state_dicts["wan22_ti2v"]).model).__name__ == "WAN22"

    fixed = {"patch": "1x2x2", "camera_control": False}
    expect = {"wan21_i2v": ("wan21", {"in_channels": 36, "image_embedding": True, **fixed}, (4, 8, 8)),
              "wan22_i2v": ("wan21", {"in_channels": 36, "image_embedding": False, **fixed}, (4, 8, 8)),
              "wan22_ti2v": ("wan22", {"in_channels": 48, "image_embedding": False, **fixed}, (4, 16, 16))}
    for variant, (family, extra, stride) in expect.items():
        sig, layout, grid = facts[variant]
        assert (sig.family, sig.num_layers, sig.num_heads, sig.head_dim, sig.dim) == (family, 2, 2, 128, 256)
        assert sig.extra == extra
        assert layout.vae_stride == stride and not layout.joint_text
        assert (grid.frames, grid.height, grid.width, grid.text_tokens) == (3, 4, 8, 0)


# --------------------------------------------------------------------------------------------- the server
T2V_SIGNATURE = signatures.wan(num_layers=2, num_heads=2, head_dim=128, in_channels=16, out_channels=16,
                               patch=(1, 2, 2), image_embedding=False)


@pytest.fixture(scope="module")
def comfy(state_dicts, facts):
    from safetensors.torch import save_file

    base = H.make_base_dir()
    H.ComfyServer.prepare_base(base)
    (base / "custom_nodes" / "calibatt_wan_variant_test_nodes.py").write_text(V.VARIANT_NODE_SOURCE)
    for variant, sd in state_dicts.items():
        save_file(sd, str(base / f"models/diffusion_models/tiny_{variant}.safetensors"))
    folder = base / "models" / "sparse_attention"
    for variant in V.VARIANTS:
        sig, _, grid = facts[variant]
        for kind in ("full", "band"):
            save_bundle(F.kind_bundle(sig, grid, kind, BLOCK), folder / f"{variant}_{kind}.safetensors")
    # What a Wan 2.1 T2V calibration at the same video size would have written.
    save_bundle(F.kind_bundle(T2V_SIGNATURE, facts["wan21_i2v"][2], "band", BLOCK),
                folder / "wan21_t2v_band.safetensors")
    server = H.ComfyServer(F.COMFY, base, env_extra={"PYTHONUNBUFFERED": "1"})
    server.start()
    yield server
    server.stop()
    H.remove_base_dir(base)





def _graph(variant: str, prompts: int = 1, image_seed: int = 5, image_id: str = "img") -> dict:
    """UNETLoader + T5-shaped text conditioning + the variant's image conditioning: positive = [image_id, 0],
    negative = [image_id, 1], latent = [image_id, 2]."""
    p = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": f"tiny_{variant}.safetensors",
                                                        "weight_dtype": "default"}},
        "cond": {"class_type": "CalibAttTestConditioning", "inputs": {"seed": 7, "prompts": prompts,
                                                                     "tokens": TEXT}},
        "neg_text": {"class_type": "CalibAttTestConditioning", "inputs": {"seed": 8, "prompts": 1, "tokens": TEXT}},
        "neg": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["neg_text", 0]}},
    }
    _add_image(p, variant, image_seed, image_id)
    return p


def _add_image(p: dict, variant: str, seed: int, node_id: str):
    p[node_id] = {"class_type": "CalibAttTestWanImageConditioning", "inputs": dict(
        VIDEO[variant], positive=["cond", 0], negative=["neg", 0], mode=variant, seed=seed)}


def _ksampler(p: dict, name: str, model, image_id: str = "img"):
    p[f"ks_{name}"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": 3, "steps": STEPS, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple",
        "positive": [image_id, 0], "negative": [image_id, 1], "latent_image": [image_id, 2], "denoise": 1.0}}
    p[f"save_{name}"] = {"class_type": "SaveLatent", "inputs": {"samples": [f"ks_{name}", 0],
                                                                "filename_prefix": f"latents/{name}"}}


def _patch(p: dict, name: str, bundle_file: str):
    p[f"load_{name}"] = {"class_type": "LoadMaskBundle", "inputs": {"bundle_name": bundle_file}}
    p[f"patch_{name}"] = {"class_type": "PatchModelAttention", "inputs": {
        "model": ["unet", 0], "bundle": [f"load_{name}", 0], "dense_first_percent": 0.0,
        "dense_last_percent": 0.0, "quality": 0.0}}
    return [f"patch_{name}", 0]


def _summaries(log_text: str) -> list:
    return [tuple(int(x) for x in m) for m in SUMMARY.findall(log_text)]


def _assert_every_self_attention_routed(summaries: list, variant: str, patched_runs: int):
    """N = E x L self-attention calls routed; the cross-attention calls (text, and Wan 2.1 I2V's image tokens)
    are the E x L x CROSS_CALLS other calls, so none of the self-attention calls passed through."""
    assert len(summaries) == patched_runs, summaries
    for routed, evaluations, layers, other in summaries:
        assert layers == V.LAYERS and evaluations >= STEPS
        assert routed == evaluations * layers, (routed, evaluations, layers)
        assert other == evaluations * layers * CROSS_CALLS[variant], (other, evaluations, layers)


@pytest.fixture(scope="module", params=sorted(V.VARIANTS))
def variant_run(request, comfy):
    """Unpatched, all-keep and banded samplers on one model, plus an unpatched run with another start image."""
    variant = request.param
    p = _graph(variant)
    _add_image(p, variant, seed=6, node_id="img_other")
    _ksampler(p, "dense", ["unet", 0])
    _ksampler(p, "full", _patch(p, "full", f"{variant}_full.safetensors"))
    _ksampler(p, "band", _patch(p, "band", f"{variant}_band.safetensors"))
    _ksampler(p, "other_image", ["unet", 0], image_id="img_other")
    p["save_start"] = {"class_type": "SaveLatent", "inputs": {"samples": ["img", 2],
                                                              "filename_prefix": "latents/start"}}
    entry, log_text = F.run_logged(comfy, p)
    out = {name: F.read_latent(comfy, entry, f"save_{name}") for name in ("dense", "full", "band", "other_image",
                                                                         "start")}
    out.update(variant=variant, summaries=_summaries(log_text), log=log_text)
    return out


def test_patched_sampling_matches_dense_or_changes_boundedly(variant_run, facts):
    run = variant_run
    from calibatt.nodes.model_info import latent_shape_for

    # The server sampled the latent shape the nodes derive for this model (Wan 2.2 5B: 48 channels, 16x stride).
    layout = facts[run["variant"]][1]
    assert list(run["dense"].shape) == latent_shape_for(layout, **VIDEO[run["variant"]])
    for name in ("dense", "full", "band"):
        assert torch.isfinite(run[name]).all(), name
    # Every block kept: the routed path reproduces dense attention.
    assert rel(run["full"], run["dense"]) < 1e-3, rel(run["full"], run["dense"])
    # The banded bundle skips blocks: a real, bounded change.
    d = rel(run["band"], run["dense"])
    assert 1e-5 < d < 0.5, d


def test_every_self_attention_call_is_routed(variant_run):
    _assert_every_self_attention_routed(variant_run["summaries"], variant_run["variant"], patched_runs=2)


def test_the_image_conditioning_reaches_the_model(variant_run):
    """The I2V inputs are live: another start image changes the unpatched output (Wan 2.1/2.2 I2V: the
    concatenated image latent and mask, Wan 2.1 also the CLIP vision tokens); on the TI2V-5B the noise mask keeps
    latent frame 0 at the start image in every run, patched or not, and the other frames are sampled."""
    run = variant_run
    assert rel(run["other_image"], run["dense"]) > 1e-3
    if run["variant"] == "wan22_ti2v":
        start = run["start"][:, :, :1]
        for name in ("dense", "full", "band"):
            assert rel(run[name][:, :, :1], start) < 1e-5, name
            assert rel(run[name][:, :, 1:], run["start"][:, :, 1:]) > 0.1, name


def _execution_error(entry: dict) -> dict:
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    raise AssertionError(f"the prompt did not fail: {entry.get('status')}")


@pytest.mark.parametrize("variant, sentences", [
    ("wan21_i2v", ["bundle was calibrated for in_channels=16; this model has in_channels=36",
                   "bundle was calibrated for image_embedding=False; this model has image_embedding=True"]),
    ("wan22_i2v", ["bundle was calibrated for in_channels=16; this model has in_channels=36"]),
    ("wan22_ti2v", ["bundle was calibrated for model family 'wan21'; this model is 'wan22'",
                    "bundle was calibrated for in_channels=16; this model has in_channels=48"]),
])
def test_t2v_bundle_fails_at_the_patch_node(comfy, variant, sentences):
    """A Wan 2.1 T2V bundle (same layers, heads and grid) on an image-to-video model stops at Patch Model Attention,
    before any sampling, naming every field that differs."""
    p = _graph(variant)
    _ksampler(p, "wrong", _patch(p, "t2v", "wan21_t2v_band.safetensors"))
    entry = comfy.run(p)
    err = _execution_error(entry)
    assert err["node_type"] == "PatchModelAttention", err
    assert err["exception_type"].endswith("BundleError"), err
    for sentence in sentences:
        assert sentence in err["exception_message"], err["exception_message"]
    assert "Calibrate Sparse Attention" in err["exception_message"]  # says what to do


@pytest.mark.parametrize("variant", sorted(V.VARIANTS))
def test_calibrate_two_prompts_then_patch(comfy, facts, variant):
    """Calibrate Sparse Attention on 2 image-conditioned prompts (the calibration samples its own empty latent of
    the model's latent shape; the image conditioning rides on the CONDITIONING) writes a bundle for the model's
    signature and grid that loads, and patches the model: every self-attention call routed, a bounded change."""
    name = f"{variant}_calibrated"
    p = _graph(variant, prompts=2)
    p["calib"] = {"class_type": "CalibrateSparseAttention", "inputs": dict(
        VIDEO[variant], model=["unet", 0], prompts="", steps=STEPS, cfg=3.0, sampler_name="euler",
        scheduler="simple", seed=11, preset="custom", eps_A=0.3, eps_C=0.5, eps_k=4.0, rho=0.5, filename=name,
        positive=["img", 0], negative=["img", 1], block_size=BLOCK)}
    p["preview"] = {"class_type": "SaveImage", "inputs": {"images": ["calib", 1], "filename_prefix": name}}
    F.run_logged(comfy, p)
    path = comfy.base / "models" / "sparse_attention" / f"{name}.safetensors"
    bundle = load_bundle(path)
    sig, _, grid = facts[variant]
    assert bundle.signature == sig
    assert bundle.grid.mismatches(grid) == []
    assert bundle.settings["prompts"] == 2 and len(bundle.calibrated_sigmas) == STEPS
    # Random tiny weights attend diffusely; with eps 0.3-0.5 (measured densities 0.60-0.66) the bundle must still
    # skip blocks, and stay below the runner's dense cutoff so the patched run below takes the sparse path.
    assert 0.05 < bundle.density < 0.85, bundle.summary()

    p = _graph(variant)
    _ksampler(p, "dense", ["unet", 0])
    _ksampler(p, "calibrated", _patch(p, "calibrated", f"{name}.safetensors"))
    entry, log_text = F.run_logged(comfy, p)
    _assert_every_self_attention_routed(_summaries(log_text), variant, patched_runs=1)
    dense, sparse = (F.read_latent(comfy, entry, f"save_{n}") for n in ("dense", "calibrated"))
    assert torch.isfinite(sparse).all()
    d = rel(sparse, dense)
    assert 1e-5 < d < 0.5, d


def test_ti2v_calibrates_from_the_start_image_latent(comfy, facts):
    """Wan 2.2 TI2V-5B keeps its start image in the latent (Wan22ImageToVideoLatent's first frame + noise mask), so
    Calibrate Sparse Attention takes an optional LATENT: its shape sets the grid (the size widgets are ignored) and
    its start frame and noise mask reach the sampling, so the statistics differ from an empty-latent calibration."""
    variant = "wan22_ti2v"
    bundles = {}
    for name, with_latent in (("ti2v_from_latent", True), ("ti2v_empty_latent", False)):
        p = _graph(variant, prompts=2)
        inputs = dict(
            VIDEO[variant], model=["unet", 0], prompts="", steps=STEPS, cfg=3.0, sampler_name="euler",
            scheduler="simple", seed=11, preset="custom", eps_A=0.3, eps_C=0.5, eps_k=4.0, rho=0.5, filename=name,
            positive=["img", 0], negative=["img", 1], block_size=BLOCK)
        if with_latent:
            # Wrong size widgets on purpose: the connected latent decides the video size.
            inputs.update(latent=["img", 2], width=512, height=512, length=33)
        p["calib"] = {"class_type": "CalibrateSparseAttention", "inputs": inputs}
        p["preview"] = {"class_type": "SaveImage", "inputs": {"images": ["calib", 1], "filename_prefix": name}}
        F.run_logged(comfy, p)
        bundles[name] = load_bundle(comfy.base / "models" / "sparse_attention" / f"{name}.safetensors")
    _, _, grid = facts[variant]
    for b in bundles.values():
        assert b.grid.mismatches(grid) == [] and b.settings["prompts"] == 2
    assert bundles["ti2v_from_latent"].content_hash() != bundles["ti2v_empty_latent"].content_hash()


# ------------------------------------------------------------------ the sparse kernel path itself, in-process
def _in_process_inputs(variant: str, seed: int):
    """(positive, negative, latent, noise_mask) as the stock I2V / TI2V nodes would hand them to the sampler."""
    import comfy.clip_vision

    g = torch.Generator().manual_seed(seed)
    shape = [1, 48 if variant == "wan22_ti2v" else 16, 3, 8, 16]
    text = [torch.randn(1, TEXT, 4096, generator=g) for _ in range(2)]
    extra, noise_mask = {}, None
    latent = torch.zeros(shape)
    if variant == "wan22_ti2v":
        latent[:, :, :1] = torch.randn(shape[:2] + [1] + shape[3:], generator=g)
        noise_mask = torch.ones([1, 1] + shape[2:])
        noise_mask[:, :, :1] = 0.0
    else:
        mask = torch.ones([1, 1] + shape[2:])
        mask[:, :, :1] = 0.0
        extra = {"concat_latent_image": torch.randn(shape, generator=g), "concat_mask": mask}
        if variant == "wan21_i2v":
            extra["clip_vision_output"] = comfy.clip_vision.Output()
            extra["clip_vision_output"].penultimate_hidden_states = torch.randn(1, 257, 1280, generator=g)
    return [[text[0], dict(extra)]], [[text[1] * 0, dict(extra)]], latent, noise_mask


@pytest.mark.parametrize("variant", sorted(V.VARIANTS))
def test_all_keep_bundle_through_the_sparse_kernel_path_matches_dense(state_dicts, facts, variant):
    """The patch node sends an all-keep bundle's heads to dense attention (above the dense cutoff); here the router
    is installed as the node installs it but with the cutoff at 1, so every routed call of the image-conditioned
    model runs the block-sparse path and must reproduce the unpatched model."""
    F.import_comfy()
    import comfy.sample
    from calibatt.kernels.runner import SparseRunner
    from calibatt.nodes.comfy_glue import describe_model, install
    from calibatt.nodes.routing import AttentionRouter

    model = F.load_model(state_dicts[variant])
    sig, layout, grid = facts[variant]
    runner = SparseRunner(F.kind_bundle(sig, grid, "full", BLOCK), dense_cutoff=1.0)
    router = AttentionRouter(sig, layout, describe_model(model), handler=runner, step_hook=runner.begin_step)
    paths = []
    router.handler = lambda call: (paths.append(runner.route(call.layer)), runner(call))[1]
    patched = install(model, router, describe_model(model), on_end=runner.end)

    pos, neg, latent, noise_mask = _in_process_inputs(variant, seed=1)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(2))
    out = [comfy.sample.sample(m, noise, STEPS, 3.0, "euler", "simple", pos, neg, latent, noise_mask=noise_mask,
                               seed=1, disable_pbar=True) for m in (model, patched)]
    # Positive and negative batched: one evaluation per step, one routed call per layer.
    assert router.routed == STEPS * V.LAYERS and paths == ["sparse"] * router.routed, (router.routed, set(paths))
    assert router.passed == STEPS * V.LAYERS * CROSS_CALLS[variant]
    assert torch.isfinite(out[1]).all()
    assert rel(out[1], out[0]) < 1e-4, rel(out[1], out[0])
