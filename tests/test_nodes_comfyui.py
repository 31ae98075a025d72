"""Integration tests against a real ComfyUI (set COMFYUI_PATH; see docs/COMFYUI.md).

One headless ComfyUI (CPU) serves the module: the package is symlinked into a temporary custom_nodes under an odd
folder name, a random tiny Wan 2.1 T2V checkpoint goes into models/diffusion_models, and a test-only node supplies
T5-shaped random conditioning. Everything is driven through the HTTP API with API-format prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import comfyui_harness as H
from comfyui_harness import COMFY

pytestmark = H.NEEDS_COMFYUI

from calibatt.masks import BlockGeometry, MaskBundle, TokenGrid, load_bundle, save_bundle, signatures

REPO = Path(__file__).resolve().parents[1]
W, HGT, LEN = 128, 64, 9  # latent [1, 16, 3, 8, 16] -> 3 x 4 x 8 = 96 tokens
STEPS = 4
BLOCK = 16
GRID = TokenGrid(frames=3, height=4, width=8)
# What the nodes read off the tiny Wan 2.1 T2V checkpoint (tests/comfyui_harness.tiny_wan_state_dict).
SIGNATURE = signatures.wan(num_layers=2, num_heads=2, head_dim=128, in_channels=16, out_channels=16, patch=(1, 2, 2),
                           image_embedding=False)
NODE_IDS = {"CalibrateSparseAttention": "Calibrate Sparse Attention", "LoadMaskBundle": "Load Mask Bundle",
            "PatchModelAttention": "Patch Model Attention", "MaskBundlePreview": "Mask Bundle Preview"}


@pytest.fixture(scope="module")
def comfy():
    from safetensors.torch import save_file

    base = H.make_base_dir()
    H.ComfyServer.prepare_base(base)
    save_file(H.tiny_wan_state_dict(), str(base / "models/diffusion_models/tiny_wan.safetensors"))
    server = H.ComfyServer(COMFY, base)
    server.start()
    yield server
    server.stop()
    H.remove_base_dir(base)


def _graph(width=W, height=HGT, length=LEN, cond_prompts=1, cond_seed=7):
    return H.tiny_wan_graph(width, height, length, prompts=cond_prompts, seed=cond_seed)


def _ksampler(model_ref, prefix, seed=3):
    return {
        f"ks_{prefix}": {"class_type": "KSampler", "inputs": {
            "model": model_ref, "seed": seed, "steps": STEPS, "cfg": 3.0, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["cond", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "denoise": 1.0}},
        f"save_{prefix}": {"class_type": "SaveLatent", "inputs": {"samples": [f"ks_{prefix}", 0],
                                                                  "filename_prefix": f"latents/{prefix}"}},
    }


def _read_latent(server, entry, save_id):
    from safetensors.torch import load_file

    info = entry["outputs"][save_id]["latents"][0]
    path = server.base / "output" / info["subfolder"] / info["filename"]
    return load_file(str(path))["latent_tensor"].float()


def _ok(entry):
    err = H.status_error(entry)
    assert err is None, err


def _dense_bundle(grid=GRID, signature=SIGNATURE, block=BLOCK) -> MaskBundle:
    """Every block kept: the sparse path must then reproduce dense attention up to float rounding."""
    g = BlockGeometry(grid.video_tokens, block, block)
    full = torch.ones(signature.num_layers, signature.num_heads, g.nq, g.nk, dtype=torch.bool)
    return MaskBundle.from_block_masks(signature, grid, g, [full],
                                      [1.0, 0.5], [0, 0], settings={"test": "dense"})


@pytest.fixture(scope="module")
def calibrated(comfy):
    """Calibrate on 2 prompts once for the module; returns (history entry, bundle path)."""
    prompt = _graph(cond_prompts=2)
    prompt["calib"] = {"class_type": "CalibrateSparseAttention", "inputs": {
        "model": ["unet", 0], "prompts": "", "width": W, "height": HGT, "length": LEN, "steps": STEPS,
        "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple", "seed": 11, "preset": "custom",
        "eps_A": 0.4, "eps_C": 0.6, "eps_k": 4.0, "rho": 0.5, "filename": "tiny_wan_test",
        "positive": ["cond", 0], "negative": ["neg", 0], "block_size": BLOCK}}
    prompt["preview_save"] = {"class_type": "SaveImage", "inputs": {"images": ["calib", 1],
                                                                   "filename_prefix": "calib_preview"}}
    entry = comfy.run(prompt, timeout=600)
    _ok(entry)
    return entry, comfy.base / "models" / "sparse_attention" / "tiny_wan_test.safetensors"


def test_nodes_registered(comfy):
    info = comfy.object_info()
    for node_id, display in NODE_IDS.items():
        assert node_id in info, f"{node_id} missing from /object_info"
        assert info[node_id]["display_name"] == display
        assert info[node_id]["category"] == "sampling/sparse attention"
    assert info["LoadMaskBundle"]["output"] == ["MASK_BUNDLE", "STRING"]
    assert info["PatchModelAttention"]["input"]["required"]["bundle"][0] == "MASK_BUNDLE"
    assert info["CalibrateSparseAttention"]["output"] == ["MASK_BUNDLE", "IMAGE", "STRING"]
    # Help pages are served from WEB_DIRECTORY, where the frontend looks for <NodeId>.md.
    for node_id, display in NODE_IDS.items():
        r = comfy.requests.get(f"{comfy.url}/extensions/{H.PACKAGE_DIR_NAME}/docs/{node_id}.md", timeout=30)
        assert r.status_code == 200 and r.text.startswith(f"# {display}"), (node_id, r.status_code)


def test_calibrate_writes_a_loadable_bundle(comfy, calibrated):
    entry, path = calibrated
    assert path.is_file(), f"calibration wrote no bundle at {path}"
    bundle = load_bundle(path)
    assert bundle.signature == SIGNATURE
    assert bundle.grid.mismatches(GRID) == []
    assert (bundle.geometry.block_q, bundle.geometry.block_k) == (BLOCK, BLOCK)
    assert len(bundle.calibrated_sigmas) == STEPS
    assert bundle.settings["prompts"] == 2
    # Random tiny weights give diffuse attention; with eps 0.4-0.6 the bundle must still skip blocks (and stay
    # below the runner's dense cutoff, so the patched run below exercises the sparse path).
    assert 0.05 < bundle.density < 0.85, bundle.summary()
    # The preview went through SaveImage: two images (heat map, block mask).
    images = entry["outputs"]["preview_save"]["images"]
    assert len(images) == 2
    assert not list((comfy.base / "models" / "sparse_attention").glob("*.tmp*")), "temporary file left behind"
    # The file shows up in the loader's dropdown.
    options = comfy.get_json("/object_info/LoadMaskBundle")["LoadMaskBundle"]["input"]["required"]["bundle_name"]
    names = options[1].get("options") if options[0] == "COMBO" else options[0]
    assert "tiny_wan_test.safetensors" in names


def _calibrate_counted(filename: str, tag: str, interrupt_after: int = 0, steps: int = 12) -> dict:
    prompt = _graph(cond_prompts=4)
    prompt["counted"] = {"class_type": "CalibAttTestModelCalls", "inputs": {
        "model": ["unet", 0], "tag": tag, "interrupt_after": interrupt_after}}
    prompt["calib"] = {"class_type": "CalibrateSparseAttention", "inputs": {
        "model": ["counted", 0], "prompts": "", "width": W, "height": HGT, "length": LEN, "steps": steps,
        "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple", "seed": 1, "preset": "balanced",
        "eps_A": 0.84, "eps_C": 0.99, "eps_k": 16.0, "rho": 0.5, "filename": filename,
        "positive": ["cond", 0], "negative": ["neg", 0], "block_size": BLOCK}}
    return prompt


def _model_calls(comfy, tag: str) -> int:
    path = comfy.base / "output" / f"model_calls_{tag}.txt"
    return int(path.read_text()) if path.exists() else 0


def test_interrupted_calibration_writes_nothing(comfy):
    # Cancel is pressed from inside the run, right after the first model evaluation (the first calibration step
    # observed), so the calibration is always interrupted mid-way, however fast the machine.
    entry = comfy.run(_calibrate_counted("interrupted", "interrupt", interrupt_after=1), timeout=300)
    kinds = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds, kinds
    # stopped at the end of that step (cond and uncond may be two evaluations), nothing sampled after
    assert 1 <= _model_calls(comfy, "interrupt") <= 2
    folder = comfy.base / "models" / "sparse_attention"
    assert not (folder / "interrupted.safetensors").exists()
    assert not [p for p in folder.iterdir() if "interrupted" in p.name]


def test_global_selection_is_calibrated_and_recorded(comfy):
    """The optional selection input reaches the calibrator: the bundle records it, and its masks differ from the
    per-row selection's at the same eps (one threshold over all heads, not one per query block)."""
    folder = comfy.base / "models" / "sparse_attention"
    for sel in ("row", "global"):
        p = _calibrate_counted(f"sel_{sel}", f"sel_{sel}", steps=4)
        # a low eps, so that the tiny model's masks are sparse enough for the two selections to differ
        p["calib"]["inputs"].update(selection=sel, preset="custom", eps_A=0.4, eps_C=0.6, eps_k=4.0)
        _ok(comfy.run(p, timeout=300))
    row, glob = (load_bundle(folder / f"sel_{s}.safetensors") for s in ("row", "global"))
    assert row.settings["calibration"]["selection"] == "row"
    assert glob.settings["calibration"]["selection"] == "global"
    assert float(row.entry_densities().mean()) < 1 and float(glob.entry_densities().mean()) < 1
    assert any(not torch.equal(row.bucket_masks(b), glob.bucket_masks(b)) for b in range(row.num_buckets))


def test_unknown_selection_is_refused_before_sampling(comfy):
    p = _calibrate_counted("sel_bad", "sel_bad", steps=4)
    p["calib"]["inputs"]["selection"] = "sideways"
    # 0.19 refuses the COMBO value when queued; 0.3.64 leaves a v3 optional COMBO to the node, which refuses it
    # before sampling. Either way the message names the input and the value.
    try:
        message = H.status_error(comfy.wait(comfy.queue(p)))
    except RuntimeError as e:
        message = str(e)
    assert message is not None and "selection" in message and "sideways" in message, message
    assert _model_calls(comfy, "sel_bad") == 0, "sampling started"


def test_bad_output_name_is_refused_before_sampling(comfy):
    # A name the file system refuses (ENAMETOOLONG past 255 bytes) used to fail at the save, after the whole
    # calibration; now the node refuses it before the first model evaluation.
    for tag, name, needle in (("long", "x" * 240, "at most 128"), ("slash", "../escape", "characters")):
        entry = comfy.run(_calibrate_counted(name, tag), timeout=300)
        err = H.status_error(entry)
        assert err is not None and needle in err, err
        assert _model_calls(comfy, tag) == 0, "sampling started before the name was checked"


def test_patched_sampling_differs_by_a_bounded_amount(comfy, calibrated):
    save_bundle(_dense_bundle(), comfy.base / "models" / "sparse_attention" / "tiny_dense.safetensors")
    p = _graph()
    p.update(_ksampler(["unet", 0], "dense_a"))
    first = comfy.run(p)
    _ok(first)

    p = _graph()
    p["load"] = {"class_type": "LoadMaskBundle", "inputs": {"bundle_name": "tiny_wan_test.safetensors"}}
    p["patch"] = {"class_type": "PatchModelAttention", "inputs": {"model": ["unet", 0], "bundle": ["load", 0],
                                                                  "dense_first_percent": 0.0,
                                                                  "dense_last_percent": 0.0, "quality": 0.0}}
    p["load_full"] = {"class_type": "LoadMaskBundle", "inputs": {"bundle_name": "tiny_dense.safetensors"}}
    p["patch_full"] = {"class_type": "PatchModelAttention", "inputs": {"model": ["unet", 0],
                                                                       "bundle": ["load_full", 0],
                                                                       "dense_first_percent": 0.0,
                                                                       "dense_last_percent": 0.0, "quality": 0.0}}
    p["patch_edges"] = {"class_type": "PatchModelAttention", "inputs": {"model": ["unet", 0], "bundle": ["load", 0],
                                                                        "dense_first_percent": 50.0,
                                                                        "dense_last_percent": 50.0, "quality": 0.0}}
    p["patch_q1"] = {"class_type": "PatchModelAttention", "inputs": {"model": ["unet", 0], "bundle": ["load", 0],
                                                                     "dense_first_percent": 0.0,
                                                                     "dense_last_percent": 0.0, "quality": 1.0}}
    # An 8-bit precision is a GPU feature: on this CPU host the node accepts it and the run is the bf16 one.
    p["patch_int8"] = {"class_type": "PatchModelAttention", "inputs": {"model": ["unet", 0], "bundle": ["load", 0],
                                                                       "dense_first_percent": 0.0,
                                                                       "dense_last_percent": 0.0, "quality": 0.0,
                                                                       "precision": "int8"}}
    p.update(_ksampler(["patch", 0], "sparse"))
    p.update(_ksampler(["patch_int8", 0], "int8"))
    p.update(_ksampler(["patch_q1", 0], "q1"))
    p.update(_ksampler(["patch_full", 0], "full"))
    p.update(_ksampler(["patch_edges", 0], "edges"))
    p.update(_ksampler(["unet", 0], "dense_b"))  # the unpatched model in the same graph
    entry = comfy.run(p, timeout=600)
    _ok(entry)

    dense_a = _read_latent(comfy, first, "save_dense_a")
    dense_b = _read_latent(comfy, entry, "save_dense_b")
    sparse = _read_latent(comfy, entry, "save_sparse")
    full = _read_latent(comfy, entry, "save_full")
    edges = _read_latent(comfy, entry, "save_edges")
    q1 = _read_latent(comfy, entry, "save_q1")
    int8 = _read_latent(comfy, entry, "save_int8")
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731

    # Patching clones: the unpatched model, sampled beside the patched ones, is bit-identical to a run without them.
    assert torch.equal(dense_a, dense_b)
    # A bundle that keeps every block reproduces dense attention (the sparse path is exact where it computes).
    assert rel(full, dense_a) < 1e-4, rel(full, dense_a)
    # The calibrated bundle skips blocks: a real but bounded change.
    d = rel(sparse, dense_a)
    assert 1e-5 < d < 0.5, d
    # All steps in the dense windows (first 50% + last 50%): dense again.
    assert rel(edges, dense_a) < 1e-4, rel(edges, dense_a)
    # quality 1 sends every head to the dense path.
    assert rel(q1, dense_a) < 1e-4, rel(q1, dense_a)
    # precision int8 without a CUDA GPU: the same sparse run as bf16 (the 8-bit kernels are GPU-only).
    assert torch.equal(int8, sparse)


def test_unknown_precision_is_refused_when_queued(comfy, calibrated):
    p = _graph()
    p["load"] = {"class_type": "LoadMaskBundle", "inputs": {"bundle_name": "tiny_wan_test.safetensors"}}
    p["patch"] = {"class_type": "PatchModelAttention", "inputs": {"model": ["unet", 0], "bundle": ["load", 0],
                                                                  "dense_first_percent": 0.0,
                                                                  "dense_last_percent": 0.0, "quality": 0.0,
                                                                  "precision": "fp4"}}
    p.update(_ksampler(["patch", 0], "bad_precision"))
    # ComfyUI 0.19's COMBO validation refuses it when queued; 0.3.64 does not validate a v3 optional COMBO, so
    # there the node itself refuses it before sampling. Either way the message names the input and the value.
    try:
        message = H.status_error(comfy.wait(comfy.queue(p)))
    except RuntimeError as e:
        message = str(e)
    assert message is not None, "a graph with precision 'fp4' ran"
    assert "precision" in message and "fp4" in message, message
    assert not list((comfy.base / "output" / "latents").glob("bad_precision*")), "sampling ran"


def _two_experts(p, high_ref, low_ref, prefix):
    """Wan 2.2 style: two models, KSamplerAdvanced split at step 2 of 4."""
    common = {"noise_seed": 5, "steps": STEPS, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple",
              "positive": ["cond", 0], "negative": ["neg", 0]}
    p[f"hi_{prefix}"] = {"class_type": "KSamplerAdvanced", "inputs": dict(
        common, model=high_ref, add_noise="enable", latent_image=["latent", 0], start_at_step=0, end_at_step=2,
        return_with_leftover_noise="enable")}
    p[f"lo_{prefix}"] = {"class_type": "KSamplerAdvanced", "inputs": dict(
        common, model=low_ref, add_noise="disable", latent_image=[f"hi_{prefix}", 0], start_at_step=2,
        end_at_step=10000, return_with_leftover_noise="disable")}
    p[f"save_{prefix}"] = {"class_type": "SaveLatent", "inputs": {"samples": [f"lo_{prefix}", 0],
                                                                  "filename_prefix": f"latents/{prefix}"}}


def test_two_expert_sampling_with_one_bundle_per_expert(comfy, calibrated):
    save_bundle(_dense_bundle(), comfy.base / "models" / "sparse_attention" / "tiny_dense.safetensors")
    p = _graph()
    p["unet_low"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_wan.safetensors",
                                                           "weight_dtype": "default"}}
    p["load_hi"] = {"class_type": "LoadMaskBundle", "inputs": {"bundle_name": "tiny_wan_test.safetensors"}}
    p["load_lo"] = {"class_type": "LoadMaskBundle", "inputs": {"bundle_name": "tiny_dense.safetensors"}}
    p["patch_hi"] = {"class_type": "PatchModelAttention", "inputs": {
        "model": ["unet", 0], "bundle": ["load_hi", 0], "dense_first_percent": 0.0, "dense_last_percent": 0.0, "quality": 0.0}}
    p["patch_lo"] = {"class_type": "PatchModelAttention", "inputs": {
        "model": ["unet_low", 0], "bundle": ["load_lo", 0], "dense_first_percent": 0.0, "dense_last_percent": 0.0, "quality": 0.0}}
    _two_experts(p, ["patch_hi", 0], ["patch_lo", 0], "experts_sparse")
    _two_experts(p, ["unet", 0], ["unet_low", 0], "experts_dense")
    entry = comfy.run(p, timeout=600)
    _ok(entry)
    sparse = _read_latent(comfy, entry, "save_experts_sparse")
    dense = _read_latent(comfy, entry, "save_experts_dense")
    d = float((sparse - dense).norm() / dense.norm())
    assert 1e-5 < d < 0.5, d


def test_bundle_for_another_video_size_fails_at_sampling_start(comfy, calibrated):
    p = _graph(width=64)  # 3 x 4 x 4 tokens instead of 3 x 4 x 8
    p["load"] = {"class_type": "LoadMaskBundle", "inputs": {"bundle_name": "tiny_wan_test.safetensors"}}
    p["patch"] = {"class_type": "PatchModelAttention", "inputs": {"model": ["unet", 0], "bundle": ["load", 0],
                                                                  "dense_first_percent": 0.0,
                                                                  "dense_last_percent": 0.0, "quality": 0.0}}
    p.update(_ksampler(["patch", 0], "wrong"))
    err = H.status_error(comfy.run(p))
    assert err is not None, "sampling with a bundle for another resolution must fail"
    assert "BundleError" in err
    assert "bundle was calibrated for a 4x8-token frame; this video has 4x4 (resolution differs)" in err
    assert "Calibrate Sparse Attention" in err  # says what to do


def test_bundle_for_another_model_fails_at_patch(comfy):
    other = signatures.wan(num_layers=3, num_heads=2, head_dim=128, in_channels=16, out_channels=16, patch=(1, 2, 2),
                           image_embedding=False)
    save_bundle(_dense_bundle(signature=other), comfy.base / "models" / "sparse_attention" / "three_layers.safetensors")
    p = _graph()
    p["load"] = {"class_type": "LoadMaskBundle", "inputs": {"bundle_name": "three_layers.safetensors"}}
    p["patch"] = {"class_type": "PatchModelAttention", "inputs": {"model": ["unet", 0], "bundle": ["load", 0],
                                                                  "dense_first_percent": 0.0,
                                                                  "dense_last_percent": 0.0, "quality": 0.0}}
    p.update(_ksampler(["patch", 0], "wrong_model"))
    err = H.status_error(comfy.run(p))
    assert err is not None
    assert "bundle was calibrated for 3 layers; this model has 2" in err


def test_unsupported_model_passes_through_unpatched(comfy):
    """A Wan variant that adds tokens (HuMo: audio) is not patched: a warning, and sampling is exactly dense."""
    from safetensors.torch import save_file

    sd = H.tiny_wan_state_dict()
    sd["audio_proj.audio_proj_glob_1.layer.bias"] = torch.zeros(512, dtype=torch.float16)  # -> detected as HuMo
    save_file(sd, str(comfy.base / "models/diffusion_models/tiny_humo.safetensors"))
    p = _graph()
    p["unet"]["inputs"]["unet_name"] = "tiny_humo.safetensors"
    p["load"] = {"class_type": "LoadMaskBundle", "inputs": {"bundle_name": "tiny_dense.safetensors"}}
    p["patch"] = {"class_type": "PatchModelAttention", "inputs": {"model": ["unet", 0], "bundle": ["load", 0],
                                                                  "dense_first_percent": 0.0,
                                                                  "dense_last_percent": 0.0, "quality": 0.0}}
    p.update(_ksampler(["patch", 0], "humo_patched"))
    p.update(_ksampler(["unet", 0], "humo_plain"))
    save_bundle(_dense_bundle(), comfy.base / "models" / "sparse_attention" / "tiny_dense.safetensors")
    entry = comfy.run(p)
    _ok(entry)
    assert torch.equal(_read_latent(comfy, entry, "save_humo_patched"), _read_latent(comfy, entry, "save_humo_plain"))
    assert "Wan variant 'humo' adds tokens or blocks beyond the video latent" in comfy.log_tail(400)


def test_bad_bundle_file_reports_the_loader_error(comfy):
    (comfy.base / "models" / "sparse_attention" / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    p = {"load": {"class_type": "LoadMaskBundle", "inputs": {"bundle_name": "broken.safetensors"}},
         "show": {"class_type": "MaskBundlePreview", "inputs": {"bundle": ["load", 0]}},
         "save": {"class_type": "SaveImage", "inputs": {"images": ["show", 0], "filename_prefix": "broken"}}}
    err = H.status_error(comfy.run(p))
    assert err is not None and "BundleError" in err and "broken.safetensors" in err, err


def _widget_count(spec_inputs: dict) -> int:
    n = 0
    for section in ("required", "optional"):
        for name, spec in spec_inputs.get(section, {}).items():
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                if opts.get("forceInput"):
                    continue
                n += 1
                if opts.get("control_after_generate") or (kind == "INT" and name in ("seed", "noise_seed")):
                    n += 1
    return n


@pytest.mark.parametrize("folder", ["workflows"])
def test_workflows_match_object_info(comfy, folder):
    info = comfy.object_info()
    files = sorted((REPO / folder).glob("*.json"))
    assert files, f"no workflows in {folder}/"
    for f in files:
        wf = json.loads(f.read_text())
        assert "nodes" in wf and "links" in wf, f"{f.name}: not a UI-format workflow"
        by_id = {n["id"]: n for n in wf["nodes"]}
        for n in wf["nodes"]:
            if n["type"] in ("Note", "MarkdownNote"):
                continue
            assert n["type"] in info, f"{f.name}: node type {n['type']} unknown to ComfyUI"
            want = _widget_count(info[n["type"]]["input"])
            got = len(n.get("widgets_values", []))
            assert got == want, f"{f.name}: {n['type']} (node {n['id']}) has {got} widget values, ComfyUI expects {want}"
        for link in wf["links"]:
            _, src, src_slot, dst, dst_slot, kind = link
            out_types = info[by_id[src]["type"]]["output"]
            assert out_types[src_slot] == kind, f"{f.name}: link {link} type {kind} != {out_types[src_slot]}"
            dst_inputs = by_id[dst]["inputs"]
            assert dst_inputs[dst_slot]["type"] == kind, f"{f.name}: link {link} into a {dst_inputs[dst_slot]['type']}"


def test_example_workflows_are_served(comfy):
    templates = comfy.get_json("/workflow_templates")
    names = templates.get(H.PACKAGE_DIR_NAME, [])
    expected = sorted(p.stem for p in (REPO / "workflows").glob("*.json"))
    assert expected and sorted(names) == expected, (names, expected)  # listed once each


def test_v1_fallback_registers_and_runs_the_same_nodes(comfy):
    """CALIBATT_NODE_API=v1 loads NODE_CLASS_MAPPINGS (what ComfyUI without V3 uses): same ids and inputs, and the
    load -> patch -> sample path runs."""
    from safetensors.torch import save_file

    base = H.make_base_dir()
    try:
        H.ComfyServer.prepare_base(base)
        save_file(H.tiny_wan_state_dict(), str(base / "models/diffusion_models/tiny_wan.safetensors"))
        save_bundle(_dense_bundle(), base / "models" / "sparse_attention" / "tiny_dense.safetensors")
        with H.ComfyServer(COMFY, base, env_extra={"CALIBATT_NODE_API": "v1"}) as v1:
            info1 = v1.object_info()
            p = _graph()
            p["load"] = {"class_type": "LoadMaskBundle", "inputs": {"bundle_name": "tiny_dense.safetensors"}}
            p["patch"] = {"class_type": "PatchModelAttention", "inputs": {
                "model": ["unet", 0], "bundle": ["load", 0], "dense_first_percent": 0.0, "dense_last_percent": 0.0, "quality": 0.0}}
            p["show"] = {"class_type": "MaskBundlePreview", "inputs": {"bundle": ["load", 0]}}
            p["save_img"] = {"class_type": "SaveImage", "inputs": {"images": ["show", 0], "filename_prefix": "v1"}}
            p.update(_ksampler(["patch", 0], "v1"))
            entry = v1.run(p)
        _ok(entry)
        assert len(entry["outputs"]["save_img"]["images"]) == 2
        info3 = comfy.object_info()
        for node_id in NODE_IDS:
            assert node_id in info1
            for section in ("required", "optional"):  # V3 output nodes also list hidden inputs
                assert info1[node_id]["input_order"].get(section) == info3[node_id]["input_order"].get(section)
            assert info1[node_id]["output"] == info3[node_id]["output"]
            assert info1[node_id]["display_name"] == info3[node_id]["display_name"]
            assert _widget_count(info1[node_id]["input"]) == _widget_count(info3[node_id]["input"])
    finally:
        H.remove_base_dir(base)
