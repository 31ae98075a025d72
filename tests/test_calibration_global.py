"""Global selection (CalibrationSettings.selection = "global"): one mass threshold per calibrated step over every
layer, head and query block, reaching eps on the mean row; against per-row eps ("row", the default)."""

import pytest
import torch

from calibatt.calibration import CalibrationSettings, Calibrator
from calibatt.calibration.selection import (MASS_BINS, MASS_BINS_PER_OCTAVE, bin_histogram, global_threshold,
                                            keep_from_bins, kept_mass, mass_bins, mean_block_mass, select_blocks)
from calibatt.kernels.block_energy import block_energy
from calibatt.kernels.call import AttentionCall
from calibatt.masks import ModelSignature, TokenGrid
from synthetic import planted_layer

pytestmark = pytest.mark.usefixtures("one_thread")


def select_blocks_global(masses, eps: float, texts=None):
    """One mass threshold over many calls (the layers of one step): masses a list of [..., nq, nk] mean row mass per
    video key block, texts the matching [..., nq] text shares (default 1 - row sum). Returns the keep masks, the
    kept rows' coverage reaching eps on average over every row of every call (all of them kept if it cannot).
    The exact binned form of what the Calibrator does incrementally with mass_bins / bin_histogram /
    global_threshold / keep_from_bins, all at once: the oracle its step-by-step selection is checked against."""
    texts = [(1.0 - m.sum(-1)).clamp(0.0, 1.0) for m in masses] if texts is None else list(texts)
    bins = [mass_bins(m) for m in masses]
    hist = sum(bin_histogram(m, b).reshape(-1, MASS_BINS).sum(0) for m, b in zip(masses, bins))
    rows = sum(t.numel() for t in texts)
    thr = global_threshold(hist, sum(t.sum() for t in texts), rows, eps)
    return [keep_from_bins(b, thr) for b in bins]


GRID = TokenGrid(4, 8, 8)
KINDS = [["local", "stripes", "repeat", "global"], ["global", "repeat", "local", "stripes"]]
SIG = ModelSignature("generic", 2, 4, 16, 64)
SIGMAS = [10.0, 1.0, 0.1]


def test_selection_setting_is_validated_recorded_and_keys_the_statistics():
    with pytest.raises(ValueError, match="selection must be one of 'row', 'global'.*got 'globl'"):
        CalibrationSettings(selection="globl")
    s = CalibrationSettings(selection="global")
    assert s.to_dict()["selection"] == "global"
    assert CalibrationSettings.from_dict(s.to_dict()) == s
    assert CalibrationSettings().selection == "row"
    # statistics of the two selections are different things: they must not merge
    assert s.selection_key() != CalibrationSettings().selection_key()


def _two_heads(nq=8, nk=8):
    """Head 0 peaky (0.8 of each row on its diagonal block, 0.2 on the others, halving with distance), head 1
    diffuse (uniform): per-row eps makes the peaky head buy its 0.1 / 0.05 tail blocks while the diffuse head drops
    blocks of 0.125."""
    tail = 0.5 ** torch.arange(1, nk).float()
    row = torch.cat([torch.tensor([0.8]), tail / tail.sum() * 0.2])
    peaky = torch.stack([row.roll(i) for i in range(nq)])
    return torch.stack([peaky, torch.full((nq, nk), 1.0 / nk)])


def test_global_keeps_strictly_more_mass_than_row_eps_at_equal_density():
    mass = _two_heads()
    rows = mass.shape[0] * mass.shape[1]
    keep_r = select_blocks(mass, 0.85)
    keep_g = select_blocks_global([mass], 0.9)[0]
    assert int(keep_g.sum()) == int(keep_r.sum()) == 72  # equal density, 72 of 128 blocks
    got_r, got_g = float(kept_mass(mass, keep_r).sum()), float(kept_mass(mass, keep_g).sum())
    assert got_g > got_r + 0.15, (got_g, got_r)
    assert got_g >= 0.9 * rows - 1e-5 > got_r  # global's mean row reaches 0.9 where per-row's does not
    # the global budget went to the diffuse head's blocks, not the peaky head's tail
    assert bool(keep_g[1].all()) and int(keep_g[0].sum()) == 8


def test_global_is_a_mass_threshold_and_minimal():
    g = torch.Generator().manual_seed(3)
    masses = []
    for shape in ((3, 10, 12), (2, 10, 12)):  # two "layers" of one step, different head counts
        m = torch.rand(shape, generator=g) ** 6
        masses.append(m / m.sum(-1, keepdim=True) * 0.9)  # 0.1 of each row on text
    rows = sum(m.shape[0] * m.shape[1] for m in masses)
    text = 0.1 * rows
    for eps in (0.6, 0.85, 0.95):
        keeps = select_blocks_global(masses, eps)
        kept = torch.cat([m[k] for m, k in zip(masses, keeps)])
        dropped = torch.cat([m[~k] for m, k in zip(masses, keeps)])
        # one threshold for all: nothing kept is lighter than anything dropped (up to the bin width)
        assert float(kept.min()) * 2 ** (1 / MASS_BINS_PER_OCTAVE) >= float(dropped.max())
        assert text + float(kept.sum()) >= eps * rows - 1e-4
        # minimal up to the threshold bin: without it the mean row falls short of eps
        bins = torch.cat([mass_bins(m)[k] for m, k in zip(masses, keeps)]).long()
        lowest = int(bins.min())
        assert text + float(kept[bins > lowest].sum()) < eps * rows
    # text alone covering eps keeps nothing
    assert not any(k.any() for k in select_blocks_global(masses, 0.05))


def _run(selection, prompts=(0, 1)):
    st = CalibrationSettings(block_q=16, block_k=16, A=0.6, C=0.9, k=2.0, stats_row_stride=1, rho=1.0,
                             selection=selection, repetition=False)
    cal = Calibrator(SIG, GRID, st, background=False)
    for p in prompts:
        cal.begin_prompt(sample_sigmas=SIGMAS + [0.0], key=f"p{p}")
        for sigma in SIGMAS:
            for layer in range(2):
                q, k, v = planted_layer(GRID, KINDS[layer], 16, prompt=p, layer=layer, sigma=sigma)
                cal.observe(AttentionCall(q, k, v, "bhld", 4, layer, sigma, GRID, scale=1.0))
        cal.end_prompt()
    return cal


def test_calibrator_global_selection_equals_the_function_over_the_steps_layers():
    cal = _run("global", prompts=(0,))
    st = cal.state()
    g = cal.geometry
    for sid in st.step_order():
        step = st.steps[sid]
        masses = []
        for layer in range(2):
            q, k, _ = planted_layer(GRID, KINDS[layer], 16, prompt=0, layer=layer, sigma=step.sigma)
            masses.append(mean_block_mass(block_energy(q, k, g, scale=1.0), g, 1))
        want = select_blocks_global(masses, step.eps)
        drop = torch.stack([(1 - kept_mass(m, w)).clamp_min(0).mean(-1) for m, w in zip(masses, want)])
        for layer in range(2):
            got = torch.from_numpy(st.get_counts(sid, layer)).bool()  # one prompt: its votes are its keep mask
            assert torch.equal(got, want[layer]), (sid, layer)
        assert torch.allclose(st.drop[sid].double(), drop.double(), atol=1e-5)
        # mean row coverage of the step reaches eps, while some row (a diffuse head's) falls short of it
        cover = torch.cat([kept_mass(m, w).reshape(-1) for m, w in zip(masses, want)])
        assert float(cover.mean()) >= step.eps - 1e-5
    assert float(cover.min()) < step.eps


def test_global_bundle_records_the_setting_and_spends_density_where_the_mass_is():
    row, glob = _run("row"), _run("global")
    b_row, b_glob = row.finish(), glob.finish()
    assert b_glob.settings["calibration"]["selection"] == "global"
    assert b_row.settings["calibration"]["selection"] == "row"
    d_row, d_glob = b_row.entry_densities(), b_glob.entry_densities()  # [B, L, H]
    # Same eps: the global step keeps fewer blocks overall (rows are no longer held to eps one by one) ...
    assert float(d_glob.mean()) < float(d_row.mean())
