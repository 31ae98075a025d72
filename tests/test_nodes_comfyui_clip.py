"""Calibrate Sparse Attention's CLIP text-prompt path in a real ComfyUI (set COMFYUI_PATH; see docs/COMFYUI.md).

Wan's own text encoder (umt5-xxl) cannot be made tiny, so a random full-size CLIP-L loaded by the stock CLIPLoader
with type "sd3" stands in (tests/comfyui_clip.py): SD3's encoder pads CLIP-L to the 4096 features Wan's
text_embedding takes. The tiny Wan checkpoint and the server come from tests/comfyui_harness.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import comfyui_harness as H
from comfyui_harness import COMFY

pytestmark = H.NEEDS_COMFYUI

import comfyui_clip as C  # noqa: E402
from calibatt.masks import TokenGrid, load_bundle, signatures  # noqa: E402

# The tiny size of tests/test_nodes_comfyui.py: latent [1, 16, 3, 8, 16] -> 3 x 4 x 8 = 96 tokens, blocks of 16.
W, HGT, LEN = 128, 64, 9
STEPS = 4
BLOCK = 16
GRID = TokenGrid(frames=3, height=4, width=8)
SIGNATURE = signatures.wan(num_layers=2, num_heads=2, head_dim=128, in_channels=16, out_channels=16, patch=(1, 2, 2),
                           image_embedding=False)

PROMPT_A = "a red fox running through fresh snow, morning light"
PROMPT_B = "a rainy city street at night with neon reflections"
NEGATIVE = "blurry, low quality, static"


@pytest.fixture(scope="module")
def comfy():
    """One server for the module; the ~250 MB random CLIP-L is written once, into the temporary models/."""
    from safetensors.torch import save_file

    base = H.make_base_dir()
    server = None
    try:
        H.ComfyServer.prepare_base(base)
        save_file(H.tiny_wan_state_dict(), str(base / "models/diffusion_models/tiny_wan.safetensors"))
        C.write_random_clip_l(base / "models" / "text_encoders" / C.CLIP_FILE_NAME)
        server = H.ComfyServer(COMFY, base)
        server.start()
        yield server
    finally:
        if server is not None:
            server.stop()
        H.remove_base_dir(base)


def _loaders() -> dict:
    return {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_wan.safetensors",
                                                        "weight_dtype": "default"}},
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": C.CLIP_FILE_NAME, "type": "sd3"}},
    }


def _calibrate(filename: str, prompts: str, **connections) -> dict:
    """A CalibrateSparseAttention node at the tiny size; `connections` adds clip / negative_prompt / positive /
    negative."""
    inputs = {"model": ["unet", 0], "prompts": prompts, "width": W, "height": HGT, "length": LEN, "steps": STEPS,
              "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple", "seed": 11, "preset": "custom",
              "eps_A": 0.4, "eps_C": 0.6, "eps_k": 4.0, "rho": 0.5, "filename": filename, "block_size": BLOCK}
    inputs.update(connections)
    return {"class_type": "CalibrateSparseAttention", "inputs": inputs}


def _encode(text: str) -> dict:
    return {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": text}}


def _bundle_path(comfy, name: str) -> Path:
    return comfy.base / "models" / "sparse_attention" / f"{name}.safetensors"


def test_random_clip_l_loads_completely_as_sd3_clip_l(comfy):
    """The random file has exactly the keys ComfyUI's CLIP-L expects (its loader, strict=False, would otherwise
    leave missing weights uninitialised and only log them), and CLIPLoader type sd3 builds SD3's CLIP-L branch."""
    got = C.missing_and_unexpected_keys(COMFY, comfy.base / "models" / "text_encoders" / C.CLIP_FILE_NAME)
    assert got == {"te_model": "CLIP_L", "model": "SD3ClipModel", "branches": ["clip_l"], "missing": [],
                   "unexpected": []}, got


@pytest.fixture(scope="module")
def clip_calibrations(comfy):
    """One graph, five calibrations of the tiny Wan on two prompts each:
    text: the two prompts as text (with stray spaces and a blank line) + a negative prompt, through the CLIP;
    cond: the same prompts encoded by stock CLIP Text Encode nodes, joined by Conditioning (Combine);
    mixed: prompt A as text through the CLIP, prompt B as connected CONDITIONING (text prompts come first);
    same: prompt A twice; noneg: as text, but an empty negative prompt."""
    p = _loaders()
    p["enc_a"], p["enc_b"], p["enc_neg"] = _encode(PROMPT_A), _encode(PROMPT_B), _encode(NEGATIVE)
    p["both"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["enc_a", 0],
                                                                 "conditioning_2": ["enc_b", 0]}}
    p["calib_text"] = _calibrate("clip_text", f"  {PROMPT_A}  \n\n{PROMPT_B}\n", clip=["clip", 0],
                                 negative_prompt=NEGATIVE)
    p["calib_cond"] = _calibrate("clip_cond", "", positive=["both", 0], negative=["enc_neg", 0])
    p["calib_mixed"] = _calibrate("clip_mixed", PROMPT_A, clip=["clip", 0], negative_prompt=NEGATIVE,
                                  positive=["enc_b", 0])
    p["calib_same"] = _calibrate("clip_same", f"{PROMPT_A}\n{PROMPT_A}", clip=["clip", 0], negative_prompt=NEGATIVE)
    p["calib_noneg"] = _calibrate("clip_noneg", f"{PROMPT_A}\n{PROMPT_B}", clip=["clip", 0], negative_prompt="")
    entry = comfy.run(p, timeout=600)
    err = H.status_error(entry)
    assert err is None, f"{err}\n{comfy.log_tail(80)}"
    names = ("text", "cond", "mixed", "same", "noneg")
    return {name: load_bundle(_bundle_path(comfy, f"clip_{name}")) for name in names}


def _same_bundle(a, b) -> bool:
    return (a.content_hash() == b.content_hash() and list(a.calibrated_sigmas) == list(b.calibrated_sigmas)
            and list(a.step_bucket) == list(b.step_bucket))


def test_clip_prompts_calibrate_a_loadable_bundle(comfy, clip_calibrations):
    for name, bundle in clip_calibrations.items():
        assert bundle.signature == SIGNATURE, name
        assert bundle.grid.mismatches(GRID) == [], name
        assert (bundle.geometry.block_q, bundle.geometry.block_k) == (BLOCK, BLOCK), name
        assert len(bundle.calibrated_sigmas) == STEPS and bundle.settings["steps"] == STEPS, name
        assert bundle.settings["prompts"] == 2, (name, bundle.settings["prompts"])  # blank line / spaces dropped
        assert 0.0 < bundle.density < 1.0, (name, bundle.summary())
    log = comfy.log_path.read_text(errors="replace")
    # ComfyUI's loader only logs keys it left uninitialised; the loaded CLIP must be complete.
    assert "clip missing" not in log, log
    assert log.count("Calibrate Sparse Attention: 2 prompts") == 5, log


def test_clip_prompts_encode_like_clip_text_encode(clip_calibrations):
    """Text through the node's CLIP == the same prompts through stock CLIP Text Encode + Conditioning (Combine):
    each non-empty line is one prompt, stripped, in order, and the negative prompt goes through the CLIP too."""
    assert _same_bundle(clip_calibrations["text"], clip_calibrations["cond"])
    # Text prompts and connected CONDITIONING add up (text first), with the CLIP-encoded negative for both.
    assert _same_bundle(clip_calibrations["text"], clip_calibrations["mixed"])


def test_clip_prompts_are_distinct_and_the_negative_is_used(clip_calibrations):
    # Same seeds, same first prompt: only the second prompt's text differs, so B really was encoded and sampled.
    assert not _same_bundle(clip_calibrations["text"], clip_calibrations["same"])
    # Only the negative prompt differs: it reaches the sampler (through CFG).
    assert not _same_bundle(clip_calibrations["text"], clip_calibrations["noneg"])


def test_text_prompts_without_clip_fail_with_a_clear_message(comfy):
    p = _loaders()
    del p["clip"]
    p["calib"] = _calibrate("no_clip", f"{PROMPT_A}\n{PROMPT_B}")
    err = H.status_error(comfy.run(p))
    assert err is not None, "text prompts without a CLIP must fail"
    assert ("the prompts need a text encoder; connect the CLIP input (or connect precomputed positive "
            "CONDITIONING and leave the prompts empty)") in err, err
    assert not _bundle_path(comfy, "no_clip").exists()


@pytest.mark.parametrize("prompts", ["", " \n\n  \t\n"])
def test_empty_prompts_fail_with_a_clear_message(comfy, prompts):
    p = _loaders()
    p["calib"] = _calibrate("no_prompts", prompts, clip=["clip", 0], negative_prompt=NEGATIVE)
    err = H.status_error(comfy.run(p))
    assert err is not None, "a calibration without prompts must fail"
    assert ("no calibration prompts; write one prompt per line (the paper uses 16-64) or connect positive "
            "CONDITIONING") in err, err
    assert not _bundle_path(comfy, "no_prompts").exists()
