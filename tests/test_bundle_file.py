import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from calibatt.masks import BundleError, ModelSignature, TokenGrid, load_bundle, save_bundle
from calibatt.masks.bundle import FORMAT
from helpers_core import make_bundle


def _same(a, b):
    assert a.signature == b.signature and a.grid == b.grid and a.geometry == b.geometry
    assert a.calibrated_sigmas == b.calibrated_sigmas and a.step_bucket == b.step_bucket
    for bucket in range(a.num_buckets):
        sa, sb = a.skip_lists(bucket), b.skip_lists(bucket)
        assert torch.equal(sa.block_mask(), sb.block_mask())
        ra, rb = sa.repetition, sb.repetition
        assert (ra is None) == (rb is None)
        if ra is not None:
            assert torch.equal(ra.head_slot, rb.head_slot)
            assert torch.equal(ra.anchors, rb.anchors) and torch.equal(ra.row_anchor, rb.row_anchor)


def test_round_trip_with_dedup(tmp_path):
    b = make_bundle(L=3, H=4, steps=5)
    # buckets share most masks: far fewer distinct masks than entries
    assert b.num_unique_masks < b.num_buckets * 3 * 4
    p = save_bundle(b, tmp_path / "x.safetensors")
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".partial")]
    c = load_bundle(p)
    _same(b, c)
    assert c.num_unique_masks == b.num_unique_masks
    assert abs(c.density - b.density) < 1e-9
    assert c.settings == {"preset": "balanced", "rho": 0.5}
    assert c.producer["package"] == "calibatt"


def test_identical_buckets_are_stored_once(tmp_path):
    b = make_bundle(L=2, H=2, steps=3, repetition=False)
    size_3 = save_bundle(b, tmp_path / "a.safetensors").stat().st_size
    # Same masks listed twice as many times: the file grows only by the entry tables and metadata.
    from calibatt.masks import MaskBundle
    buckets = [b.skip_lists(i).block_mask() for i in range(b.num_buckets)] * 2
    n = len(buckets)
    b2 = MaskBundle.from_block_masks(b.signature, b.grid, b.geometry, buckets, torch.linspace(1, 0.1, n).tolist(),
                                     list(range(n)))
    assert b2.num_unique_masks == b.num_unique_masks
    size_6 = save_bundle(b2, tmp_path / "b.safetensors").stat().st_size
    assert size_6 - size_3 < 2000


def test_sigma_lookup_any_schedule():
    b = make_bundle(steps=5)  # sigmas 1.0 .. 0.05, last two steps share a bucket
    sig = b.calibrated_sigmas
    for i, s in enumerate(sig):
        assert b.bucket_for_sigma(s) == b.step_bucket[i]
    # A 30-step schedule of another sampler: every sigma maps to the nearest calibrated step's bucket.
    for s in torch.linspace(1.2, 0.0, 30).tolist():
        nearest = min(range(len(sig)), key=lambda i: abs(sig[i] - s))
        assert b.bucket_for_sigma(s) == b.step_bucket[nearest]


def test_one_sigma_to_step_rule_and_dense_window():
    from calibatt.masks.sigmas import SigmaSteps, in_dense_window, step_fraction
    steps = SigmaSteps([1.0, 0.5, 0.25])
    assert [steps.index(s) for s in (2.0, 0.76, 0.75, 0.74, 0.375, 0.3, 0.0)] == [0, 0, 1, 1, 2, 2, 2]
    # a hand-made schedule out of order: still the nearest entry, halfway to the less noisy one
    odd = SigmaSteps([0.25, 1.0, 0.75])
    assert [odd.index(s) for s in (0.1, 0.5, 0.6, 0.9)] == [0, 0, 2, 1]
    # 4 steps, the first and last quarter dense; without windows no step (the last included) is dense
    fr = [step_fraction(i, 4) for i in range(4)]
    assert [in_dense_window(f, 0.25, 0.25) for f in fr] == [True, False, False, True]
    assert not any(in_dense_window(f, 0.0, 0.0) for f in fr)
    assert not in_dense_window(None, 1.0, 1.0)


def test_check_compatible_names_the_mismatch():
    b = make_bundle(L=2, H=3)
    b.check_compatible(b.signature, b.grid)  # fits itself
    other = ModelSignature("wan21", 4, 3, 16, 48)
    with pytest.raises(BundleError, match="bundle was calibrated for 2 layers; this model has 4"):
        b.check_compatible(other, b.grid)
    g = TokenGrid(frames=5, height=6, width=8)
    with pytest.raises(BundleError, match="3 latent frames; this video has 5"):
        b.check_compatible(b.signature, g)
    g = TokenGrid(frames=3, height=8, width=8)
    with pytest.raises(BundleError, match="6x8-token frame; this video has 8x8"):
        b.check_compatible(b.signature, g)


def test_text_position_start_and_end_geometry():
    end = TokenGrid(frames=3, height=6, width=8, text_tokens=7, text_position="end")
    start = TokenGrid(frames=3, height=6, width=8, text_tokens=7, text_position="start")
    none = TokenGrid(frames=3, height=6, width=8)
    assert (end.video_start, end.text_start, end.total_tokens) == (0, 144, 151)
    assert (start.video_start, start.text_start, start.total_tokens) == (7, 0, 151)
    assert (none.video_start, none.text_start, none.total_tokens) == (0, 144, 144)
    assert TokenGrid.from_dict(start.to_dict()) == start
    assert "before the video" in start.describe() and "before" not in end.describe()
    for pos in ("start", "end"):
        with pytest.raises(BundleError, match="text_tokens > 0 requires text_position"):
            TokenGrid(frames=3, height=6, width=8, text_tokens=0, text_position=pos)
    with pytest.raises(BundleError, match="text_position must be one of"):
        TokenGrid(frames=3, height=6, width=8, text_tokens=7, text_position="middle")


@pytest.mark.parametrize("made, used", [("end", "start"), ("start", "end")])
def test_bundle_fits_calls_with_the_text_on_the_other_side(tmp_path, made, used):
    # Masks cover the video tokens only, so where the text sits is no part of the fit.
    grid = TokenGrid(frames=3, height=6, width=8, text_tokens=9, text_position=made)
    b = load_bundle(save_bundle(make_bundle(grid=grid), tmp_path / "t.safetensors"))
    assert b.grid == grid
    call = TokenGrid(frames=3, height=6, width=8, text_tokens=9, text_position=used)
    b.check_compatible(b.signature, call)
    assert b.grid.mismatches(call) == [] and b.grid.mismatches(call, text=False) == []
    longer = TokenGrid(frames=3, height=6, width=8, text_tokens=20, text_position=used)
    assert b.grid.mismatches(longer, text=False) == []
    with pytest.raises(BundleError, match="3 latent frames; this video has 4"):
        b.check_compatible(b.signature, TokenGrid(frames=4, height=6, width=8, text_tokens=9, text_position=used))


def test_save_is_atomic(tmp_path, monkeypatch):
    b = make_bundle()
    target = tmp_path / "keep.safetensors"
    save_bundle(b, target)
    before = target.read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt("interrupted mid-save")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        save_bundle(make_bundle(seed=1), target)
    assert target.read_bytes() == before  # old file intact
    assert sorted(os.listdir(tmp_path)) == ["keep.safetensors"]  # no temp file left


# ------------------------------------------------------------------------------------------- malformed files
def _header(path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _write(path, header, body):
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + body)


def _edit_meta(src, dst, fn):
    header, body = _header(src)
    meta = json.loads(header["__metadata__"]["calibatt"])
    fn(meta, header)
    header["__metadata__"]["calibatt"] = json.dumps(meta)
    _write(dst, header, body)


@pytest.fixture
def good(tmp_path):
    return save_bundle(make_bundle(L=2, H=3, steps=4), tmp_path / "good.safetensors")


def _expect(path, *needles):
    with pytest.raises(BundleError) as e:
        load_bundle(path)
    msg = str(e.value)
    assert str(path) in msg, msg  # names the file
    for n in needles:
        assert n in msg, msg
    return msg


def test_truncated_file(good, tmp_path):
    data = good.read_bytes()
    for cut in (0, 5, 100, len(data) // 2, len(data) - 1):
        p = tmp_path / f"cut{cut}.safetensors"
        p.write_bytes(data[:cut])
        _expect(p)


def test_random_bytes(tmp_path):
    gen = torch.Generator().manual_seed(1)
    p = tmp_path / "noise.safetensors"
    p.write_bytes(bytes(torch.randint(0, 256, (5000,), generator=gen, dtype=torch.uint8).tolist()))
    _expect(p, "[header]")


def test_missing_file(tmp_path):
    _expect(tmp_path / "nope.safetensors", "not found", "models/sparse_attention")


def test_wrong_format_string(good, tmp_path):
    header, body = _header(good)
    header["__metadata__"]["format"] = "something-else"
    p = tmp_path / "fmt.safetensors"
    _write(p, header, body)
    _expect(p, "[format]", "not a mask bundle")


def test_future_version(good, tmp_path):
    header, body = _header(good)
    header["__metadata__"]["format_version"] = "7"
    p = tmp_path / "future.safetensors"
    _write(p, header, body)
    _expect(p, "[format_version]", "newer", "update")


def test_non_bundle_safetensors(tmp_path):
    p = tmp_path / "model.safetensors"
    save_file({"blocks.0.self_attn.q.weight": torch.randn(4, 4)}, str(p))
    _expect(p, "[format]", "not a mask bundle")


def test_shape_metadata_disagreement(good, tmp_path):
    p = tmp_path / "layers.safetensors"
    _edit_meta(good, p, lambda m, h: m["counts"].__setitem__("layers", 5))
    _expect(p, "[model]", "2 layers x 3 heads but the masks cover 5 x 3")

    def five_layers(m, h):
        m["counts"]["layers"] = 5
        m["model"]["num_layers"] = 5
        fields = {k: v for k, v in m["model"].items() if k != "fingerprint"}
        m["model"]["fingerprint"] = ModelSignature(**fields).fingerprint()
        m["densities"] = [layers + layers[:1] * 3 for layers in m["densities"]]
    p1 = tmp_path / "layers5.safetensors"
    _edit_meta(good, p1, five_layers)
    _expect(p1, "[entry_mask]", "does not match the metadata")
    p2 = tmp_path / "grid.safetensors"
    _edit_meta(good, p2, lambda m, h: m["grid"].__setitem__("frames", 4))
    _expect(p2, "[grid]", "video tokens")
    p3 = tmp_path / "dens.safetensors"

    def bump(m, h):
        m["densities"][0][0][0] += 0.25
    _edit_meta(good, p3, bump)
    _expect(p3, "[densities]", "disagree")


def _patch_tensor(src, dst, name, fn):
    from safetensors.torch import load_file
    header, _ = _header(src)
    t = load_file(str(src))
    t[name] = fn(t[name])
    meta = header["__metadata__"]
    save_file(t, str(dst), metadata=meta)


def test_out_of_range_index(good, tmp_path):
    p = tmp_path / "idx.safetensors"

    def bad(e):
        e = e.clone()
        e[0, 0, 0] = 10_000
        return e
    _patch_tensor(good, p, "entry_mask", bad)
    _expect(p, "[entry_mask]", "mask ids must be in")
    p2 = tmp_path / "rep.safetensors"

    def bad_rep(e):
        e = e.clone()
        e[0, 0, 0] = 99
        return e
    _patch_tensor(good, p2, "entry_rep", bad_rep)
    _expect(p2, "[entry_rep]")


def test_empty_row(tmp_path):
    import zlib
    from calibatt.masks.packing import row_bytes
    b = make_bundle(L=1, H=1, steps=2, shared_steps=False, repetition=False)
    good = save_bundle(b, tmp_path / "one.safetensors")
    g = b.geometry
    empty = bytes(g.nq * row_bytes(g.nk))  # every row empty
    comp = zlib.compress(empty)

    from safetensors.torch import load_file
    header, _ = _header(good)
    t = load_file(str(good))
    U = t["mask_parent"].numel()
    t["mask_payload"] = torch.frombuffer(bytearray(comp * U), dtype=torch.uint8)
    t["mask_offsets"] = torch.arange(U + 1, dtype=torch.int64) * len(comp)
    t["mask_parent"] = torch.full((U,), -1, dtype=torch.int32)
    p = tmp_path / "empty.safetensors"
    save_file(t, str(p), metadata=header["__metadata__"])
    _expect(p, "[mask_payload]", "empty row")


def test_absurd_sizes(good, tmp_path):
    p = tmp_path / "huge.safetensors"
    _edit_meta(good, p, lambda m, h: m["counts"].__setitem__("layers", 10**9))
    _expect(p, "[counts.layers]", "outside the allowed range")
    p2 = tmp_path / "blocks.safetensors"
    _edit_meta(good, p2, lambda m, h: m["blocks"].__setitem__("block_q", 0))
    _expect(p2, "[blocks.block_q]")
    # a header that claims to be enormous
    data = good.read_bytes()
    p3 = tmp_path / "hdr.safetensors"
    p3.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    _expect(p3, "[header]", "truncated")


def test_corrupt_payload(good, tmp_path):
    p = tmp_path / "payload.safetensors"

    def flip(x):
        x = x.clone()
        x[: min(8, x.numel())] ^= 0xFF
        return x
    _patch_tensor(good, p, "mask_payload", flip)
    _expect(p, "[mask_payload]")


def test_bad_sigmas(good, tmp_path):
    p = tmp_path / "sig.safetensors"
    _edit_meta(good, p, lambda m, h: m["sigmas"].__setitem__("calibrated", [0.1, 0.5, 0.7, 0.9]))
    _expect(p, "sigmas", "decreasing")


def test_every_message_offers_a_fix(good, tmp_path):
    p = tmp_path / "fmtfix.safetensors"
    _edit_meta(good, p, lambda m, h: m.__setitem__("format", "nope"))
    msg = _expect(p)
    assert "re-create" in msg or "download" in msg
    assert FORMAT in open(good, "rb").read(4096).decode("latin-1")
