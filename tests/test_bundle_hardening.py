"""Each way a bundle file escaped the loader's promise (issue 13), as a file: every one is now a BundleError naming
the file, the field and a fix, found before anything large is allocated."""

import os
import time

import pytest
import torch

import bundle_fuzz as fz
from calibatt.masks import BundleError, MaskBundle, load_bundle, save_bundle
from calibatt.masks import bundle_limits as lim
from helpers_core import make_bundle


@pytest.fixture
def good(tmp_path):
    return save_bundle(make_bundle(L=2, H=3, steps=4, seed=3), tmp_path / "good.safetensors").read_bytes()


def _refused(tmp_path, data, *needles, seconds=5.0):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(data)
    t0 = time.perf_counter()
    with pytest.raises(BundleError) as e:
        load_bundle(p)
    took = time.perf_counter() - t0
    msg = str(e.value)
    assert msg.startswith(str(p)) and e.value.field and ";" in msg, msg  # file, field, fix
    for n in needles:
        assert n in msg, msg
    assert took < seconds, f"refusal took {took:.2f} s"
    return msg


def _raw_meta(data, fn):
    """Edit the metadata as JSON text (for what json.dumps cannot write)."""
    header, body = fz.split(data)
    return fz.join(header, body, raw_meta=fn(header["__metadata__"]["calibatt"]))


def test_json_numbers_the_parser_refuses(good, tmp_path):
    # integers beyond int64 (Python's int() raises ValueError past 4,300 digits), NaN, Infinity, overflowing floats
    _refused(tmp_path, _raw_meta(good, lambda t: t.replace('"frames":3', '"frames":' + "1" * 5000)),
             "[calibatt]", "5000 digits")
    _refused(tmp_path, _raw_meta(good, lambda t: t.replace('"density":', '"density":NaN,"x":')), "NaN")
    _refused(tmp_path, _raw_meta(good, lambda t: t.replace('"calibrated":[1.0', '"calibrated":[Infinity')),
             "Infinity")
    _refused(tmp_path, _raw_meta(good, lambda t: t.replace('"calibrated":[1.0', '"calibrated":[1e999')),
             "overflows")
    _refused(tmp_path, _raw_meta(good, lambda t: t.replace('"frames":3', '"frames":1e300')),
             "[grid.frames]", "must be an integer")


def test_deep_nesting_and_duplicate_keys(good, tmp_path):
    deep = "[" * 200000 + "]" * 200000
    _refused(tmp_path, _raw_meta(good, lambda t: t.replace('"settings":{', f'"settings":{{"x":{deep},')),
             "[calibatt]", "nested too deeply")
    _refused(tmp_path, _raw_meta(good, lambda t: t.replace('"grid":{', '"grid":{"frames":3,')), "twice")


def test_safetensors_metadata_values_must_be_strings(good, tmp_path):
    header, body = fz.split(good)
    header["__metadata__"]["format_version"] = 1
    _refused(tmp_path, fz.join(header, body), "[__metadata__.format_version]", "must be strings")


@pytest.mark.parametrize("field,value,needle", [
    ("settings", [1, 2], "[settings] must be a JSON object"),
    ("producer", "calibatt", "[producer] must be a JSON object"),
    ("grid.patch", [1, 2], "[grid.patch] has 2 entries"),
    ("grid.vae_stride", [4, 8, 8, 8], "[grid.vae_stride] has 4 entries"),
    ("grid.text_postion", "none", "unknown key 'text_postion'"),  # a typo is an error, not a silent default
    ("sigmas.calibrated", [1e300, 0.5, 0.2, 0.1], "[sigmas.calibrated[0]]"),
    ("blocks.block_q", 2 ** 40, "[blocks.block_q]"),
    ("blocks.block_k", 2 ** 80, "integer of 25 digits"),
    ("model.extra", {"in_channels": [1, 2]}, "[model.extra.in_channels]"),
])
def test_fields_of_the_wrong_type_length_or_range(good, tmp_path, field, value, needle):
    def edit(meta):
        *parents, key = field.split(".")
        node = meta
        for p in parents:
            node = node[p]
        node[key] = value
    _refused(tmp_path, fz.with_meta(good, edit), needle)


def test_nan_in_stored_densities(good, tmp_path):
    def edit(meta):
        meta["densities"][0][0][0] = float("nan")
    _refused(tmp_path, fz.with_meta(good, edit), "NaN")  # json.dumps writes NaN; the parser refuses it


def test_block_size_edited_with_the_same_block_count(good, tmp_path):
    # 144 tokens: blocks of 16 and of 17 both make 9 x 9 blocks, so only the tables can tell.
    def edit(meta):
        assert meta["blocks"]["nq"] == -(-144 // 17)
        meta["blocks"]["block_q"] = 17
    msg = _refused(tmp_path, fz.with_meta(good, edit))
    assert "[digest]" in msg or "diagonal" in msg
    header, body = fz.split(fz.with_meta(good, edit))
    del header["__metadata__"]["digest"]  # without the digest, the diagonal check still sees it
    _refused(tmp_path, fz.join(header, body), "[mask_payload]", "does not keep the diagonal")


def test_consistent_edits_are_caught_by_the_digest_and_files_without_one_still_load(good, tmp_path):
    def swap(meta):
        g = meta["grid"]
        g["height"], g["width"] = g["width"], g["height"]  # same token count, another frame shape
    b = make_bundle(L=1, H=2, steps=2, repetition=False)
    plain = save_bundle(b, tmp_path / "plain.safetensors").read_bytes()
    _refused(tmp_path, fz.with_meta(plain, swap), "[digest]", "edited")
    _refused(tmp_path, fz.with_meta(good, lambda m: m["settings"].__setitem__("rho", 0.25)), "[digest]", "edited")
    header, body = fz.split(good)
    del header["__metadata__"]["digest"]
    p = tmp_path / "old.safetensors"
    p.write_bytes(fz.join(header, body))
    assert load_bundle(p).num_buckets == 3


def test_issue_amplification_files_are_refused_at_once(tmp_path):
    # The issue's files: 16,384 x 16,384 blocks, every mask XOR-identical to its parent, 0.3 / 1.1 / 8.4 MB; they
    # took 14.8 s and 1.15 GB, 72 s and 2 GB, and exhausted 8 GiB.
    for size in (300_000, 1_100_000, 8_400_000):
        data = fz.amplification_file_of_size(16384, size)
        assert abs(len(data) - size) / size < 0.15
        _refused(tmp_path, data, "[blocks]", "16384x16384 blocks exceeds the cap of 4096", seconds=1.0)


def test_decode_budget_is_checked_before_decoding(tmp_path):
    # 4,096 blocks a side (2 MiB per mask), distinct masks one block apart (each ~2 KB in the file): 33 of them
    # declare 66 MiB from a 74 KB payload, beyond max(64 MiB, 16 x payload).
    _refused(tmp_path, fz.amplification_file(4096, 33, identical=False), "[counts.unique_masks]",
             "exceed the decode budget", seconds=1.0)
    # XOR-identical masks within the budget are still refused (the writer stores each mask once)
    _refused(tmp_path, fz.amplification_file(512, 4, identical=True), "identical")


def test_the_most_a_small_file_can_cost_loads_within_the_bound(tmp_path):
    # 32 distinct 2 MiB masks from a 75 KB file: exactly the 64 MiB floor of the budget.
    p = tmp_path / "edge.safetensors"
    p.write_bytes(fz.amplification_file(4096, 32, identical=False))
    t0 = time.perf_counter()
    b = load_bundle(p)
    took = time.perf_counter() - t0
    assert b.packed_masks.numel() == 32 * lim.mask_bytes(4096, 4096) == lim.DECODE_FLOOR_BYTES
    assert took < 10.0  # ~1 s on a 2-core machine under load (docs/BENCHMARKS.md)


def test_writer_pads_what_compresses_beyond_the_budget(tmp_path, monkeypatch):
    # Masks that differ in one block from their parent compress ~300x; with the floor at 0 the budget binds, and
    # the writer stores the most compressible ones uncompressed until the file honestly holds what it declares.
    monkeypatch.setattr(lim, "DECODE_FLOOR_BYTES", 0)
    from calibatt.masks import BlockGeometry, TokenGrid
    from calibatt.masks.geometry import ModelSignature
    grid = TokenGrid(1, 64, 64)
    g = BlockGeometry(grid.video_tokens, 16, 16)
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(1, 2, g.nq, g.nk, generator=gen) < 0.2
    buckets = []
    for i in range(6):
        m = base.clone()
        m[0, :, 0, 10 + i] = True  # one more block per bucket
        buckets.append(m)
    b = MaskBundle.from_block_masks(ModelSignature("generic", 1, 2, 16, 32), grid, g, buckets,
                                    [1.0, 0.8, 0.6, 0.4, 0.2, 0.1], list(range(6)))
    p = save_bundle(b, tmp_path / "padded.safetensors")
    c = load_bundle(p)
    header, _ = fz.split(p.read_bytes())
    payload = header["mask_payload"]["shape"][0]
    assert c.num_unique_masks * lim.mask_bytes(g.nq, g.nk) <= lim.DECODE_RATIO * payload
    for i in range(6):
        assert torch.equal(c.skip_lists(i).block_mask(), b.skip_lists(i).block_mask())


def test_saver_writes_only_what_the_loader_accepts(tmp_path):
    b = make_bundle(L=1, H=2, steps=2, shared_steps=False, repetition=False)
    # duplicate and unused stored masks are folded away
    dup = MaskBundle(signature=b.signature, grid=b.grid, geometry=b.geometry, calibrated_sigmas=b.calibrated_sigmas,
                     step_bucket=b.step_bucket, packed_masks=torch.cat([b.packed_masks, b.packed_masks]),
                     entry_mask=b.entry_mask + b.num_unique_masks, entry_rep=b.entry_rep, rep_anchors=b.rep_anchors,
                     rep_row_anchor=b.rep_row_anchor, settings={"note": "x"})
    c = load_bundle(save_bundle(dup, tmp_path / "dup.safetensors"))
    assert c.num_unique_masks == b.num_unique_masks
    # settings that JSON cannot hold: refused before anything is written
    bad = make_bundle(L=1, H=2, steps=2)
    bad.settings = {"rho": float("nan")}
    with pytest.raises(BundleError, match=r"\[settings\]"):
        save_bundle(bad, tmp_path / "nan.safetensors")
    assert not (tmp_path / "nan.safetensors").exists()
    # masks with an empty row (no block diagonal): refused before writing, saying why
    empty = MaskBundle(signature=b.signature, grid=b.grid, geometry=b.geometry, calibrated_sigmas=b.calibrated_sigmas,
                       step_bucket=b.step_bucket, packed_masks=torch.zeros_like(b.packed_masks),
                       entry_mask=b.entry_mask, entry_rep=b.entry_rep, rep_anchors=b.rep_anchors,
                       rep_row_anchor=b.rep_row_anchor)
    with pytest.raises(BundleError, match="not saved: the loader would refuse this bundle: .*diagonal"):
        save_bundle(empty, tmp_path / "empty.safetensors")
    assert not (tmp_path / "empty.safetensors").exists()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".partial")]


def test_not_a_regular_file(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)  # reading it would block forever
    with pytest.raises(BundleError, match="not a regular file"):
        load_bundle(fifo)
    with pytest.raises(BundleError, match=r"\[path\]"):
        load_bundle(tmp_path)


def test_trailing_and_overlapping_bytes(good, tmp_path):
    _refused(tmp_path, good + b"\0" * 8, "[tensors]", "after the last tensor")
    header, body = fz.split(good)
    a, b = header["entry_rep"]["data_offsets"]
    header["entry_rep"]["data_offsets"] = [a - 4, b - 4]
    _refused(tmp_path, fz.join(header, body), "overlap or leave gaps")


def test_calibration_limits_are_checked_before_sampling():
    from calibatt.masks.bundle_limits import check_calibration_fits, estimated_file_bytes
    # Wan 2.1 14B, 720p x 81 frames, blocks of 128, 50 steps: fits
    check_calibration_fits(40, 40, 21 * 45 * 80, 128, 128, 50, 45 * 80, 5)
    # the issue's 16,384 blocks a side; 1000 steps of a 1,600-head model
    with pytest.raises(BundleError, match="more than 4096 a side") as e:
        check_calibration_fits(1, 1, 16384 * 16, 16, 16, 4, 16384 * 16)
    assert e.value.field == "blocks" and "larger block_size" in str(e.value)
    with pytest.raises(BundleError, match="use fewer steps"):
        check_calibration_fits(40, 40, 21 * 45 * 80, 128, 128, 1000, 45 * 80)
    # what the disk check asks for at Wan 720p x 50 steps: the masks at the writer's padded ratio
    need = estimated_file_bytes(40, 40, 591, 591, 50)
    assert 100 << 20 < need < 1 << 30
