"""The shipped tiny model: weights load with the recorded checksum, the data set's grammar and held-out split."""

import shutil

import pytest
import torch

from calibatt.tinywan import data
from calibatt.tinywan.text import CaptionEncoder, vocabulary

diffusers = pytest.importorskip("diffusers", reason="the tiny model is a diffusers WanTransformer3DModel; "
                                                     "install diffusers==0.42.1 (make setup) to run these tests")

from calibatt.tinywan import model as M  # noqa: E402


def test_shipped_weights_load_and_checksum_matches():
    want = M.CHECKSUM_FILE.read_text().split()[0]
    assert len(want) == 64
    assert M.file_sha256(M.WEIGHTS_FILE) == want
    assert M.WEIGHTS_FILE.stat().st_size <= 20 * 1024 * 1024
    m = M.load_tinywan()
    sig = m.signature()
    assert (sig.family, sig.num_layers, sig.num_heads, sig.head_dim) == ("wan21", 6, 4, 32)
    assert sig.extra == {"in_channels": 3, "patch": "2x2x2", "image_embedding": False, "camera_control": False}
    assert all(torch.isfinite(p).all() for p in m.parameters())
    meta = M.file_metadata()
    assert "train" in meta and '"steps"' in meta["train"]


def test_shipped_64px_model_loads_with_its_checksum_and_the_weights_fit_the_budget():
    path = M.shipped_path("tinywan64w")
    want = (M.WEIGHTS_DIR / "tinywan64w.sha256").read_text().split()[0]
    assert M.file_sha256(path) == want
    # Everything shipped under weights/ stays within the 20 MB the issue allows.
    assert sum(f.stat().st_size for f in M.WEIGHTS_DIR.glob("*.safetensors")) <= 20 * 1024 * 1024
    m = M.load_tinywan(name="tinywan64w")
    assert m.cfg.size == 64 and m.cfg.grid().video_tokens == 8 * 32 * 32
    sig = m.signature()
    assert (sig.num_layers, sig.num_heads, sig.head_dim) == (6, 4, 64)
    assert all(torch.isfinite(p).all() for p in m.parameters())
    # A bundle of one model must not load on the other: their signatures differ.
    assert M.load_tinywan().signature().mismatches(sig)
    meta = M.file_metadata(path)
    assert '"init": "tinywan32w.safetensors"' in meta["train"] and '"size": 64' in meta["train"]
    assert '"save_dtype": "bfloat16"' in meta["train"]
    with pytest.raises(M.WeightsError, match="unknown shipped"):
        M.load_tinywan(name="tinywan128")


def test_render_at_64px_keeps_object_and_texture_pixel_sizes():
    """A larger canvas is a wider view of the same world; size 32 is exactly the training data."""
    s = data.parse_caption("a white square moving right over a blue grid")
    small = data.render([s], torch.Generator().manual_seed(0))
    big = data.render([s], torch.Generator().manual_seed(0), size=64)
    assert big.shape[-1] == 64 and float(big.min()) >= -1.0 and float(big.max()) <= 1.0
    white = lambda c: (c[0, :, 0] > 0.9) & (c[0, :, 1] > 0.9) & (c[0, :, 2] > 0.9)  # noqa: E731
    area_small, area_big = float(white(small)[0].sum()), float(white(big)[0].sum())
    assert area_small > 0 and abs(area_big - area_small) / area_small < 0.35


def test_damaged_weights_are_refused(tmp_path, monkeypatch):
    bad = tmp_path / "tinywan.safetensors"
    shutil.copy(M.WEIGHTS_FILE, bad)
    with open(bad, "r+b") as f:
        f.seek(-16, 2)
        f.write(b"\x01" * 16)
    monkeypatch.setattr(M, "WEIGHTS_FILE", bad)
    with pytest.raises(M.WeightsError, match="sha256"):
        M.load_tinywan()
    with pytest.raises(M.WeightsError, match="not found"):
        M.load_tinywan(tmp_path / "missing.safetensors")


def test_held_out_combinations_never_sampled_for_training():
    g = torch.Generator().manual_seed(3)
    specs = data.sample_specs(3000, g)
    assert not any(s.held_out for s in specs)
    held = data.held_out_captions(8)
    train_caps = {s.caption() for s in specs}
    assert not set(held) & train_caps
    for c in held:
        s = data.parse_caption(c)
        assert s.held_out and s.caption() == c
        # every word of a held-out caption is in the vocabulary the model trained with
        assert all(w in vocabulary() for w in c.split())


def test_render_moves_shapes_and_stays_in_range():
    s = data.parse_caption("a white square moving right over a blue grid")
    clip = data.render([s], torch.Generator().manual_seed(0))
    assert clip.shape == (1, 3, data.FRAMES, data.SIZE, data.SIZE)
    assert float(clip.min()) >= -1.0 and float(clip.max()) <= 1.0
    white = (clip[0].min(0).values > 0.9).float()  # [T, S, S]: the white object only
    xs = [float((white[t].sum(0) * torch.arange(data.SIZE)).sum() / white[t].sum()) for t in (0, data.FRAMES - 1)]
    assert xs[1] - xs[0] > 10  # moved right by more than 10 px over the clip


def test_caption_encoder_rejects_unknown_words():
    enc = CaptionEncoder(8)
    assert enc.tokenize(["a red square moving left over a blue grid", ""]).shape == (2, 16)
    with pytest.raises(ValueError, match="does not know"):
        enc.tokenize(["a crimson square moving left over a blue grid"])
    with pytest.raises(ValueError, match="not in the grammar"):
        data.parse_caption("a red blob moving left over a blue grid")
