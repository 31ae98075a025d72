"""`make demo` at a reduced size (4 frames, 2 steps, 2 + 2 prompts): the report's fields exist and are sane, and
the bundle and the comparison sheet are written."""

import importlib.util
import json
import math
import pathlib

import pytest

pytest.importorskip("diffusers", reason="the demo runs the tiny diffusers Wan model; install diffusers==0.42.1 "
                                        "(make setup) to run it")

from calibatt.masks import load_bundle  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _demo_module():
    spec = importlib.util.spec_from_file_location("run_demo", ROOT / "demo" / "run_demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_demo_report_at_reduced_size(tmp_path, capsys):
    demo = _demo_module()
    report = demo.main(["--out", str(tmp_path), "--frames", "4", "--steps", "2", "--calib-prompts", "2",
                        "--eval-prompts", "2", "--no-progress", "--device", "cpu"])
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["psnr_db"] == report["psnr_db"]
    for key in ("density", "attention_speedup", "psnr_db", "device", "ssim", "seconds", "bundle"):
        assert key in on_disk, key
    assert 0.0 < on_disk["density"] <= 1.0
    assert math.isfinite(on_disk["attention_speedup"]) and on_disk["attention_speedup"] > 0
    assert len(on_disk["psnr_db"]) == 2
    assert all(math.isfinite(v) and v > 5 for v in on_disk["psnr_db"].values())
    assert all(-1.0 <= v <= 1.0 for v in on_disk["ssim"].values())
    assert on_disk["device"].startswith("cpu")
    assert set(on_disk["held_out_prompts"]).isdisjoint(on_disk["calibration_prompts"])
    bundle = load_bundle(tmp_path / "tinywan_bundle.safetensors")
    assert bundle.grid.frames == 2 and bundle.signature.family == "wan21"
    assert bundle.signature.extra["in_channels"] == 3 and bundle.signature.extra["patch"] == "2x2x2"
    png = tmp_path / "comparison.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    assert "dB PSNR" in capsys.readouterr().out
    assert on_disk["model"] == "tinywan"  # the 32 px model on a CPU (auto)
    assert on_disk["settings"]["rho"] == 0.25 and on_disk["settings"]["repetition"] is False
    rep = demo.main(["--out", str(tmp_path / "rep"), "--frames", "4", "--steps", "2", "--calib-prompts", "2",
                     "--eval-prompts", "1", "--no-progress", "--device", "cpu", "--repetition", "--preset", "fast",
                     "--rho", "0.5"])
    assert rep["settings"]["repetition"] is True and rep["settings"]["preset"] == "fast"
    with pytest.raises(SystemExit, match="A:C:k"):
        demo.main(["--out", str(tmp_path / "bad"), "--preset", "0.9:x:1", "--device", "cpu", "--no-progress"])
