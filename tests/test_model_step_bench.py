"""bench/model_step.py at its tiny CPU configuration, against a real ComfyUI (set COMFYUI_PATH).

The benchmark builds ComfyUI's own WanModel (2 blocks, 2 heads of 32), samples it through ComfyUI's CFGGuider dense
and patched through the package, and writes JSON; here it runs in a subprocess (as on the GPU machine) and the JSON
is checked: every case that can run on the CPU has finite, positive times for each model evaluation of the CFG batch,
the patched cases routed every self-attention call, the densities are those of the bundles the run built, the patch
at density 1 (every head through the sparse reference path, dense cutoff 1) reproduces dense within the stated
tolerance while a sparser bundle does not, and the GPU-only cases are recorded as skipped with a reason. The
calibration mode runs Calibrate Sparse Attention's own function over 2 prompts x 3 steps and extrapolates.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import comfyui_harness as H

pytestmark = H.NEEDS_COMFYUI

SCRIPT = H.REPO / "bench" / "model_step.py"


def _run(tmp_path, *extra):
    out = tmp_path / "model_step.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("OUT", None)
    r = subprocess.run([sys.executable, str(SCRIPT), "--comfyui", H.COMFY, "--tiny", "--json", str(out), *extra],
                       cwd=str(H.REPO), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"model_step.py failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return json.loads(out.read_text())


def test_tiny_model_step(tmp_path):
    res = _run(tmp_path)
    tol = res["meta"]["tiny_tolerance"]
    assert tol <= 1e-3
    (shape,) = res["shapes"]
    layers, evaluations = shape["layers"], 2  # warm-up + 1 timed evaluation per case
    assert (shape["layers"], shape["heads"], shape["head_dim"], shape["tokens"]) == (2, 2, 32, 96)
    cases = {(c["kind"], c["precision"], c["target_density"]): c for c in res["cases"]}
    ran = [cases[k] for k in (("dense_cudnn", None, None), ("dense_comfy", None, None), ("patched", "bf16", 1.0),
                              ("patched", "bf16", 0.5))]
    for c in ran:
        assert "error" not in c and "skipped" not in c, c
        assert len(c["evaluations"]) == evaluations
        for e in c["evaluations"]:
            assert e["batch"] == 2  # cond and uncond in one model evaluation
            assert e["finite"] is True
            assert e["self_attn_calls"] == layers and e["cross_attn_calls"] == layers
            assert math.isfinite(e["ms"]) and e["ms"] > 0 and 0 < e["self_attn_ms"] < e["ms"]
        assert c["step_ms"] == min(e["ms"] for e in c["evaluations"][1:])
        assert c["cfg_batch"] == 2 and c["finite"] is True
    dense = cases[("dense_cudnn", None, None)]
    assert 0 < shape["self_attn_share"] < 1
    assert shape["self_attn_share"] == round(dense["self_attn_ms"] / dense["step_ms"], 4)

    full, sparse = cases[("patched", "bf16", 1.0)], cases[("patched", "bf16", 0.5)]
    for c in (full, sparse):
        assert c["routed_calls"] == layers * evaluations  # every self-attention call went through the package
        assert c["triton_failures"] == []
        # the density reported is the bundle's, and the shape lists the same bundle
        assert c["density"] == c["bundle"]["density"] == shape["bundles"][str(c["target_density"])]["density"]
        assert c["bound"] == round(1 / ((1 - dense["self_attn_ms"] / dense["step_ms"])
                                        + dense["self_attn_ms"] / dense["step_ms"] * c["density"]), 4)
    assert full["density"] == 1.0 and full["bundle"]["dense_heads_per_layer"] == 2
    assert "dense_cutoff=1.0" in full["path"]  # every head ran the sparse reference, none the dense route
    assert 0.3 < sparse["density"] < 0.8 and sparse["path"] == "nodes.actions.patch_model_attention"
    # density 1 reproduces dense (float32 on the CPU); a sparser bundle measurably does not
    assert full["rel_err_vs_dense_cudnn"] < tol, full["rel_err_vs_dense_cudnn"]
    assert sparse["rel_err_vs_dense_cudnn"] > 10 * tol, sparse["rel_err_vs_dense_cudnn"]
    assert cases[("dense_comfy", None, None)]["rel_err_vs_dense_cudnn"] < tol

    for key in (("patched", "fp8", 0.5), ("ck_sol", None, 0.5), ("ck_int8", None, None)):
        assert cases[key].get("skipped"), cases[key]  # GPU-only, with the reason
    assert res["meta"]["comfy_kitchen"]["reason"]


def test_tiny_other_families(tmp_path):
    """HunyuanVideo (joint text, text first in 0.19+), Mochi (joint text after the video) and LTX-Video through the
    same bench: every self-attention call routed, density 1 reproduces dense."""
    res = _run(tmp_path, "--models", "tiny-hunyuan,tiny-mochi,tiny-ltxv")
    tol = res["meta"]["tiny_tolerance"]
    assert [s["model"] for s in res["shapes"]] == ["tiny-hunyuan", "tiny-mochi", "tiny-ltxv"]
    for shape in res["shapes"]:
        cases = {(c["kind"], c["target_density"]): c for c in res["cases"] if c["model"] == shape["model"]}
        assert set(cases) == {("dense_cudnn", None), ("dense_comfy", None), ("patched", 1.0), ("patched", 0.5)}
        for c in cases.values():
            assert "error" not in c, c
            assert all(e["finite"] and e["batch"] == 2 and e["self_attn_calls"] == shape["layers"]
                       for e in c["evaluations"])
        for d in (1.0, 0.5):
            assert cases[("patched", d)]["routed_calls"] == shape["layers"] * 2
        assert cases[("patched", 1.0)]["rel_err_vs_dense_cudnn"] < tol
        assert cases[("patched", 0.5)]["rel_err_vs_dense_cudnn"] > 10 * tol


def test_tiny_calibration_cost(tmp_path):
    res = _run(tmp_path, "--calibration-only", "--calib-prompts", "2", "--calib-steps", "3")
    assert "error" not in res, res.get("error")
    recs = res["evaluations"]
    assert len(recs) == 2 * 3 and all(r["batch"] == 2 and r["finite"] for r in recs)
    assert all(r["self_attn_calls"] == res["shape"]["layers"] for r in recs)
    # Each prompt alone skips blocks of the random-weights model (one prompt: density 0.91), but the vote (rho 0.5
    # of 2 prompts) keeps a block either prompt kept, and the two prompts' skips differ: the bundle is dense.
    assert res["bundle_density"] == 1.0 and "density 1.000" in res["bundle_summary"], res["bundle_summary"]
    ex = res["extrapolated"]
    assert (ex["prompts"], ex["steps"]) == (16, 20)
    assert ex["seconds"] >= res["step_s_median"] * 16 * 20 > 0 and math.isfinite(ex["gpu_hours"])
    # the end-of-run time scaled by steps; the upper estimate by prompts too
    assert abs(ex["seconds"] - (res["step_s_median"] * 320 + res["non_step_s"] * 20 / 3)) < 1.0  # (rounding)
    assert ex["upper_gpu_hours"] >= ex["gpu_hours"]


def test_tiny_density_sweep_and_case_filter(tmp_path):
    """--densities: dense once, then ours and Sol-Attn at each density (Sol-Attn recorded as skipped on the CPU);
    --kinds keeps only the named kinds. The bundles land near their targets."""
    res = _run(tmp_path, "--densities", "0.4,0.8", "--kinds", "dense_cudnn,patched:bf16,ck_sol")
    keys = [(c["kind"], c["precision"], c["target_density"]) for c in res["cases"]]
    assert keys == [("dense_cudnn", None, None), ("patched", "bf16", 0.4), ("ck_sol", None, 0.4),
                    ("patched", "bf16", 0.8), ("ck_sol", None, 0.8)]
    ours = [c for c in res["cases"] if c["kind"] == "patched"]
    assert all("error" not in c and c["routed_calls"] > 0 for c in ours)
    assert ours[0]["density"] < ours[1]["density"]
    assert all(c.get("skipped") for c in res["cases"] if c["kind"] == "ck_sol")
    res = _run(tmp_path, "--kinds", "patched:fp8")
    assert [(c["kind"], c["precision"]) for c in res["cases"]] == [("patched", "fp8")]


def test_tiny_calibration_cfg_one(tmp_path):
    """--calib-cfg 1: ComfyUI runs no negative branch, so every calibration evaluation has batch 1."""
    res = _run(tmp_path, "--calibration-only", "--calib-prompts", "1", "--calib-steps", "2", "--calib-cfg", "1.0")
    assert "error" not in res, res.get("error")
    assert res["cfg"] == 1.0
    assert [r["batch"] for r in res["evaluations"]] == [1, 1]
