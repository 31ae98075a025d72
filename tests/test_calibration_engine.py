"""The calibrator end to end on synthetic attention with planted structure (CPU, small grid).

Planted per layer: a 3D local window, temporal stripes, a repetitive head and a head with global columns (see
tests/synthetic.py); every prompt adds its own noise and values."""


import numpy as np
import pytest
import torch

from calibatt.calibration import CalibrationSettings, CalibrationStats, Calibrator, StatsError, calibrate
from calibatt.calibration.selection import kept_mass, mean_block_mass, select_blocks
from synthetic import global_columns, planted_layer, sparse_error
from calibatt.kernels.call import AttentionCall
from calibatt.kernels.attention.naive import sparse_attention_reference
from calibatt.kernels.runner import SparseRunner
from calibatt.kernels.block_energy import block_energy
from calibatt.masks import BlockGeometry, ModelSignature, TokenGrid, load_bundle, save_bundle
from calibatt.masks.packing import unpack_bits

GRID = TokenGrid(4, 8, 8)
KINDS = [["local", "stripes", "repeat", "global"], ["global", "repeat", "local", "stripes"]]
SIG = ModelSignature("generic", 2, 4, 16, 64)
SIGMAS = [10.0, 3.0, 1.0, 0.3, 0.1]
REPEAT = {(0, 2), (1, 1)}


pytestmark = pytest.mark.usefixtures("one_thread")


def settings(**kw):
    # Every query row (stats_row_stride=1): these tests check selections and votes exactly against the full block
    # energy; row subsampling has its own tests (test_calibration_rowstride.py).
    base = dict(block_q=16, block_k=16, A=0.85, C=0.97, k=4.0, stats_row_stride=1)
    base.update(kw)
    return CalibrationSettings(**base)


def layer_qkv(prompt, layer, sigma, **kw):
    return planted_layer(GRID, KINDS[layer], 16, prompt=prompt, layer=layer, sigma=sigma, **kw)


def run_prompt(cal, prompt, *, extra=False, fail_at=None, layout="bhld", cfg=False):
    """One synthetic denoising run through cal.observe; returns the max |output - dense| seen."""
    worst = 0.0
    for si, s in enumerate(SIGMAS):
        for layer in range(2):
            if fail_at == (si, layer):
                raise KeyboardInterrupt("user pressed cancel")
            q, k, v = layer_qkv(prompt, layer, s, extra_global=extra)
            pos = None
            if cfg:  # negative chunk first, positive second: only batch row 1 may feed the statistics
                qn, kn, vn = layer_qkv(prompt + 1000, layer, s)
                q, k, v = torch.cat([qn, q]), torch.cat([kn, k]), torch.cat([vn, v])
                pos = [1]
            dense = torch.softmax(q.double() @ k.double().transpose(-1, -2), -1) @ v.double()
            if layout == "bld":
                q, k, v = (t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1) for t in (q, k, v))
            out = cal.observe(AttentionCall(q, k, v, layout, 4, layer, s, GRID, positive_rows=pos, scale=1.0))
            if layout == "bld":
                out = out.reshape(out.shape[0], out.shape[1], 4, 16).transpose(1, 2)
            worst = max(worst, float((out.double() - dense).abs().max()))
    return worst


def calibrated(prompts, st=None, background=False, extra=()):
    cal = Calibrator(SIG, GRID, st or settings(), background=background)
    for p in prompts:
        cal.begin_prompt(sample_sigmas=SIGMAS + [0.0], key=f"p{p}")
        run_prompt(cal, p, extra=p in extra)
        cal.end_prompt()
    return cal


@pytest.fixture(scope="module")
def cal4():
    return calibrated(range(4))


@pytest.fixture(scope="module")
def bundle4(cal4):
    return cal4.finish()


def stats_equal(a: CalibrationStats, b: CalibrationStats):
    assert a.num_prompts == b.num_prompts
    assert sorted(a.prompt_keys) == sorted(b.prompt_keys)
    assert [s.sigma for s in a.steps] == [s.sigma for s in b.steps]
    assert set(a.counts) == set(b.counts)
    for key in a.counts:
        assert np.array_equal(a.get_counts(*key), b.get_counts(*key)), key
    for name in ("observed", "rep_err", "rep_frac", "drop"):
        for x, y in zip(getattr(a, name), getattr(b, name)):
            assert torch.allclose(x.double(), y.double(), rtol=1e-12, atol=1e-12), name


# ---------------------------------------------------------------------------------------------------------------
def test_observe_returns_dense_output_in_host_layout_and_uses_positive_rows_only():
    cal = Calibrator(SIG, GRID, settings(), background=False)
    cal.begin_prompt(sample_sigmas=SIGMAS)
    assert run_prompt(cal, 0, layout="bld", cfg=True) < 1e-4  # float32 vs float64 dense
    cal.end_prompt()
    ref = calibrated([0])
    a, b = cal.state(), ref.state()
    assert a.num_prompts == 1
    for key in b.counts:  # the negative chunk did not change a single vote
        assert np.array_equal(a.get_counts(*key), b.get_counts(*key))


def test_planted_blocks_are_recovered(cal4, bundle4):
    g = cal4.geometry
    for sigma in SIGMAS:
        b = bundle4.bucket_for_sigma(sigma)
        masks = bundle4.skip_lists(b).block_mask()
        eps_min = min(bundle4.settings["eps_per_step"])
        for layer in range(2):
            # Blocks that hold more than 1 - eps of a row's mass (noise-free structure, with a margin for the
            # prompts' noise) can be left out by no selection that reaches eps.
            q, k, _ = layer_qkv(0, layer, sigma, noise=0.0)
            mass = mean_block_mass(block_energy(q, k, g, scale=1.0), g, 1)
            must = mass > (1.0 - eps_min) + 0.05
            assert int(must.sum()) > 3 * g.nq
            assert bool((masks[layer] | ~must).all()), f"planted block dropped at sigma {sigma}, layer {layer}"
            # Global columns: every query block of a global head keeps the key blocks that hold them.
            gh = KINDS[layer].index("global")
            col_blocks = sorted(set((global_columns(GRID) // g.block_k).tolist()))
            assert bool(masks[layer, gh][:, col_blocks].all())
            # The local head is local: it is far from dense.
            lh = KINDS[layer].index("local")
            assert float(masks[layer, lh].float().mean()) < 0.6


def test_each_prompt_selection_reaches_eps_per_row():
    st = settings(rho=1.0)
    cal = calibrated([5], st)
    steps = cal.step_masks()
    g = cal.geometry
    for sigma, packed, _, rec in steps:
        voted = unpack_bits(packed, g.nk)
        for layer in range(2):
            q, k, _ = layer_qkv(5, layer, sigma)
            mass = mean_block_mass(block_energy(q, k, g, scale=1.0), g, 1)
            got = kept_mass(mass, voted[layer])
            assert bool((got >= rec.eps - 1e-5).all()), (sigma, layer, float(got.min()), rec.eps)
            # With one prompt the vote is that prompt's own smallest set (plus the diagonal).
            own = select_blocks(mass, rec.eps) | g.diagonal()
            assert torch.equal(voted[layer], own)


def test_vote_equals_the_rho_share_of_per_prompt_selections():
    prompts, extra = range(4), {0, 1}  # an extra global column only in prompts 0 and 1
    g = BlockGeometry(GRID.video_tokens, 16, 16)
    results = {}
    for rho in (0.5, 0.75):
        cal = calibrated(prompts, settings(rho=rho), extra=extra)
        voted = {round(s, 6): unpack_bits(m, g.nk) for s, m, _, _ in cal.step_masks()}
        for sigma in SIGMAS:
            for layer in range(2):
                eps = cal.settings.eps(SIGMAS.index(sigma), len(SIGMAS))
                votes = torch.zeros(4, g.nq, g.nk, dtype=torch.int32)
                for p in prompts:
                    q, k, _ = layer_qkv(p, layer, sigma, extra_global=p in extra)
                    votes += select_blocks(mean_block_mass(block_energy(q, k, g, scale=1.0), g, 1), eps)
                expect = (votes >= rho * 4) | g.diagonal()
                assert torch.equal(voted[round(sigma, 6)][layer], expect), (rho, sigma, layer)
        results[rho] = voted
    # The extra column (in 2 of 4 prompts) survives rho = 0.5 and not rho = 0.75 for far-away query blocks.
    col_block = (GRID.video_tokens - 1 - GRID.width // 2) // 16
    gh = KINDS[0].index("global")
    half, most = results[0.5][0.1][0, gh, :4, col_block], results[0.75][0.1][0, gh, :4, col_block]
    assert bool(half.all()) and not bool(most.any())


def test_repetition_is_found_where_planted_and_nowhere_else(bundle4):
    assert bundle4.rep_anchors.shape == (1, 5)  # one shared plan
    for b in range(bundle4.num_buckets):
        rep = {tuple(x) for x in (bundle4.entry_rep[b] >= 0).nonzero().tolist()}
        assert rep == REPEAT, (b, rep)
    off = calibrated([0], settings(repetition=False)).finish()
    assert not bool((off.entry_rep >= 0).any())


def test_held_out_prompt_error_within_1_2x_of_calibration_error(bundle4):
    def error(prompt):
        return sparse_error(bundle4, layer_qkv, prompt, SIGMAS, 2)

    calib = sum(error(p) for p in range(4)) / 4
    held = error(17)
    assert 0.0 < calib < 0.3
    assert held <= 1.2 * calib, (held, calib)
    assert bundle4.density < 0.6


def test_memory_is_blocks_not_tokens_and_does_not_grow_with_prompts():
    grid = TokenGrid(4, 16, 16)  # 1024 tokens, 16 blocks of 64
    sig = ModelSignature("generic", 1, 2, 16, 32)
    st = CalibrationSettings(block_q=64, block_k=64, steps=2)
    cal = Calibrator(sig, grid, st, background=False)
    sizes = []
    for p in range(3):
        cal.begin_prompt(key=str(p))
        for s in (2.0, 0.5):
            q, k, v = planted_layer(grid, ["local", "repeat"], 16, prompt=p, layer=0, sigma=s)
            cal.observe(AttentionCall(q, k, v, "bhld", 2, 0, s, grid, scale=1.0))
            for item in cal._queue:  # what waits on the device: packed bits and 3 floats per head
                assert tuple(item[2].shape) == (2, 16, 2) and item[2].dtype == torch.uint8
                assert item[3].numel() == 3 * 2
        rec = cal._record
        cal._drain()
        for step in rec.values():
            for lr in step["layers"].values():
                assert lr["bits"].nbytes == 2 * 16 * 2  # H * nq * ceil(nk / 8): one bit per block
        cal.end_prompt()
        state = cal.state()
        sizes.append((len(state.counts), state.raw_nbytes()))
        assert state.raw_nbytes() == 2 * 1 * 2 * 16 * 16  # steps * layers * heads * nq * nk bytes
        assert state.nbytes() < grid.video_tokens ** 2 // 8
    assert sizes[0] == sizes[1] == sizes[2]


def test_interrupt_discards_the_prompt_keeps_stats_and_writes_no_bundle(tmp_path):
    stats_path, bundle_path = tmp_path / "stats.safetensors", tmp_path / "bundle.safetensors"
    seen = []

    def host(prompt, cal):
        run_prompt(cal, prompt, fail_at=(2, 1) if prompt == 2 else None)

    cal = Calibrator(SIG, GRID, settings(steps=len(SIGMAS)), background=True)
    with pytest.raises(KeyboardInterrupt):
        calibrate(host, [0, 1, 2, 3], cal, keys=["p0", "p1", "p2", "p3"], stats_path=stats_path,
                  bundle_path=bundle_path, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 4), (2, 4)]
    assert not bundle_path.exists()
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())
    assert not cal.in_prompt
    stats_equal(cal.state(), calibrated([0, 1], settings(steps=len(SIGMAS))).state())
    stats_equal(CalibrationStats.load(stats_path), cal.state())
    # Resume in a fresh session: prompts 0 and 1 are skipped, the rest run, the result equals one clean run.
    cal2 = Calibrator(SIG, GRID, settings(steps=len(SIGMAS)), background=True)
    ran = []
    bundle = calibrate(lambda p, c: (ran.append(p), run_prompt(c, p)), [0, 1, 2, 3], cal2,
                       keys=["p0", "p1", "p2", "p3"], stats_path=stats_path, bundle_path=bundle_path)
    assert ran == [2, 3] and bundle_path.exists()
    clean = calibrated(range(4), settings(steps=len(SIGMAS)))
    stats_equal(cal2.state(), clean.state())
    assert bundle.content_hash() == clean.finish().content_hash()


def test_stats_save_load_merge_equals_single_run(tmp_path, cal4, bundle4):
    a, b = calibrated([0, 1], background=True), calibrated([2, 3])
    pa, pb = a.state().save(tmp_path / "a.safetensors"), b.state().save(tmp_path / "b.safetensors")
    merged = Calibrator(SIG, GRID, settings(), background=False)
    merged.merge(CalibrationStats.load(pa))
    merged.merge(CalibrationStats.load(pb))
    stats_equal(merged.state(), cal4.state())
    assert merged.finish().content_hash() == bundle4.content_hash()
    with pytest.raises(StatsError, match="count them twice"):
        merged.merge(CalibrationStats.load(pa))
    other = Calibrator(SIG, GRID, settings(block_q=32, block_k=32), background=False)
    with pytest.raises(StatsError, match="block_q"):
        other.merge(CalibrationStats.load(pa))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(StatsError, match="bad.safetensors"):
        CalibrationStats.load(bad)


def test_end_to_end_calibrate_finish_save_load_run(tmp_path, bundle4, cal4):
    path = save_bundle(bundle4, tmp_path / "wan_tiny.safetensors")
    loaded = load_bundle(path)
    assert loaded.content_hash() == bundle4.content_hash()
    assert loaded.calibrated_sigmas == SIGMAS
    s = loaded.settings
    assert s["prompts"] == 4 and s["steps"] == 5
    # the settings recorded once, as given: A, C and k all given are the schedule, its preset "custom"
    assert s["calibration"] == cal4.settings.to_dict()
    c = s["calibration"]
    assert (c["rho"], c["gamma"], c["seed"]) == (0.5, 0.87, 0)
    assert (c["A"], c["C"], c["k"], c["preset"]) == (0.85, 0.97, 4.0, "custom")
    assert not {"eps", "rho", "gamma", "seed", "sampler", "share_iou"} & set(s)  # no second copy beside it
    assert s["eps_per_step"][0] == pytest.approx(0.97)
    loaded.check_compatible(SIG, GRID)
    runner = SparseRunner(loaded)
    for sigma in (12.0, 2.0, 0.05):  # any sampler's sigmas map to a bucket
        runner.begin_step(sigma, "cpu")
        q, k, v = layer_qkv(9, 1, sigma)
        out = runner(AttentionCall(q, k, v, "bhld", 4, 1, sigma, GRID, scale=1.0))
        ref = sparse_attention_reference(q, k, v, bundle4.skip_lists(bundle4.bucket_for_sigma(sigma)).layer(1),
                                         scale=1.0)
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
        dense = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        assert float((out - dense).norm() / dense.norm()) < 0.35
    runner.end()


def test_late_steps_share_a_bucket_when_masks_agree():
    st = settings(share_iou=0.5)
    b = calibrated([0, 1], st).finish()
    assert b.num_buckets < len(SIGMAS) and b.step_bucket == sorted(b.step_bucket)
    strict = calibrated([0, 1], settings(share_iou=1.0)).finish()
    assert strict.num_buckets >= b.num_buckets
    for sigma in SIGMAS:  # a shared bucket keeps every block any of its steps kept
        own = strict.skip_lists(strict.bucket_for_sigma(sigma)).block_mask()
        shared = b.skip_lists(b.bucket_for_sigma(sigma)).block_mask()
        assert bool((shared | ~own).all())


def test_text_tokens_steps_without_schedule_and_clear_errors():
    grid = TokenGrid(2, 4, 8, text_tokens=6, text_position="end")
    sig = ModelSignature("mochi", 1, 2, 16, 32)
    seen = []
    cal = Calibrator(sig, grid, CalibrationSettings(block_q=16, block_k=16, steps=2), background=False,
                     progress=lambda d, t: seen.append((d, t)))
    with pytest.raises(RuntimeError, match="begin_prompt"):
        q, k, v = planted_layer(grid, ["local", "global"], 16, prompt=0, layer=0)
        cal.observe(AttentionCall(q, k, v, "bhld", 2, 0, 1.0, grid))
    cal.begin_prompt()
    for s in (5.0, 1.0):
        q, k, v = planted_layer(grid, ["local", "global"], 16, prompt=0, layer=0, sigma=s)
        out = cal.observe(AttentionCall(q, k, v, "bhld", 2, 0, s, grid, scale=1.0))
        assert out.shape == q.shape
    cal.end_prompt()
    assert seen == [(1, 2), (2, 2)]
    cal.begin_prompt()
    cal.observe(AttentionCall(q, k, v, "bhld", 2, 0, 5.0, grid, scale=1.0))
    with pytest.warns(UserWarning, match="never ended"):
        cal.begin_prompt()  # the unfinished prompt is dropped, the committed one stays
    cal.abort_prompt()
    assert cal.state().num_prompts == 1 and cal.discarded_prompts == 2
    steps = cal.step_masks()
    assert [round(x[3].eps, 6) for x in steps] == [round(cal.settings.eps(t, 2), 6) for t in (0, 1)]
    bundle = cal.finish()
    assert bundle.calibrated_sigmas == [5.0, 1.0]
    with pytest.raises(ValueError, match="heads"):
        cal.begin_prompt()
        q, k, v = planted_layer(grid, ["local", "global", "local"], 16, prompt=0, layer=0)
        cal.observe(AttentionCall(q, k, v, "bhld", 3, 0, 1.0, grid))
    with pytest.raises(ValueError, match="resolution differs"):
        other = TokenGrid(2, 4, 4, text_tokens=6, text_position="end")
        q, k, v = planted_layer(other, ["local", "global"], 16, prompt=0, layer=0)
        cal.observe(AttentionCall(q, k, v, "bhld", 2, 0, 1.0, other))
    empty = Calibrator(sig, grid, CalibrationSettings(block_q=16, block_k=16), background=False)
    with pytest.raises(StatsError, match="no calibration prompt"):
        empty.finish()
    nosteps = Calibrator(sig, grid, CalibrationSettings(block_q=16, block_k=16), background=False)
    nosteps.begin_prompt()
    with pytest.raises(ValueError, match="schedule length"):
        q, k, v = planted_layer(grid, ["local", "global"], 16, prompt=0, layer=0)
        nosteps.observe(AttentionCall(q, k, v, "bhld", 2, 0, 1.0, grid))


def test_joint_text_prompts_with_different_text_lengths_share_one_calibration():
    """Mochi crops its text to each prompt's valid tokens, so prompts arrive with different text counts; the
    calibrator compares the video part only and reads each call's text share itself."""
    video = TokenGrid(2, 4, 8)
    sig = ModelSignature("mochi", 1, 2, 16, 32)
    cal = Calibrator(sig, video, CalibrationSettings(block_q=16, block_k=16, stats_row_stride=1), background=False)
    sigmas = [5.0, 1.0]
    seen_text = []
    for prompt, text in enumerate((3, 11)):
        grid = TokenGrid(2, 4, 8, text_tokens=text, text_position="end")
        cal.begin_prompt(sample_sigmas=sigmas)
        for s in sigmas:
            q, k, v = planted_layer(grid, ["local", "global"], 16, prompt=prompt, layer=0, sigma=s)
            out = cal.observe(AttentionCall(q, k, v, "bhld", 2, 0, s, grid, scale=1.0))
            dense = torch.softmax(q.double() @ k.double().transpose(-1, -2), -1) @ v.double()
            assert float((out.double() - dense).abs().max()) < 1e-5
            seen_text.append(q.shape[2] - video.video_tokens)
        cal.end_prompt()
    assert seen_text == [3, 3, 11, 11]
    bundle = cal.finish()
    assert bundle.grid.text_tokens == 0 and cal.state().num_prompts == 2
    # A prompt of yet another text length runs on the bundle through the runner (text always dense).
    grid = TokenGrid(2, 4, 8, text_tokens=7, text_position="end")
    q, k, v = planted_layer(grid, ["local", "global"], 16, prompt=5, layer=0, sigma=1.0)
    runner = SparseRunner(bundle, dense_cutoff=1.0)
    out = runner(AttentionCall(q, k, v, "bhld", 2, 0, 1.0, grid, scale=1.0))
    dense = torch.softmax(q.double() @ k.double().transpose(-1, -2), -1) @ v.double()
    rel = float((out.double() - dense).norm() / dense.norm())
    assert 0.0 < rel < 0.2
    with pytest.raises(ValueError, match="tokens"):  # the call's own grid must describe its sequence
        cal.begin_prompt(sample_sigmas=sigmas)
        cal.observe(AttentionCall(q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], "bhld", 2, 0, 1.0, grid, scale=1.0))
