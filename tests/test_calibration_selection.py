"""Unit tests of the calibration building blocks: eps schedule, per-row selection, vote, sharing, anchor plan."""

import math

import pytest
import torch

from calibatt.calibration.repetition import anchor_plan
from calibatt.calibration.selection import kept_mass, mean_block_mass, packed_iou, select_blocks, share_steps, vote
from calibatt.calibration.settings import EPS_PRESETS, CalibrationSettings, eps_spec
from calibatt.kernels.block_energy import block_energy
from calibatt.masks import BlockGeometry, TokenGrid
from calibatt.masks.packing import _pack_bits_torch, pack_bits


pytestmark = pytest.mark.usefixtures("one_thread")


def test_eps_schedule_presets_and_overrides():
    for name, (A, C, k) in EPS_PRESETS.items():
        s = CalibrationSettings(preset=name)
        assert s.eps(0, 50) == pytest.approx(C)
        vals = [s.eps(t, 50) for t in range(50)]
        assert all(a >= b for a, b in zip(vals, vals[1:]))
        assert vals[-1] == pytest.approx(A + (C - A) * math.exp(-k * 49 / 50))
    assert EPS_PRESETS["quality"][0] > EPS_PRESETS["balanced"][0] > EPS_PRESETS["fast"][0]
    assert EPS_PRESETS["distilled"] == (0.763, 0.863, 5.64)  # the paper's 4-step distilled schedule
    assert CalibrationSettings(preset="distilled").eps_params() == (0.763, 0.863, 5.64)
    s = CalibrationSettings(A=0.763, C=0.863, k=5.64)
    assert s.eps(0, 4) == pytest.approx(0.863)
    assert s.eps(2, 4) == pytest.approx(0.763 + 0.1 * math.exp(-5.64 * 0.5))
    assert CalibrationSettings.from_dict(s.to_dict()) == s
    # one spelling for an explicit schedule: preset "custom" with A, C and k, as the node and "A:C:k" give it
    c = CalibrationSettings(**eps_spec("0.7:0.95:8"))
    assert (c.preset, c.eps_params()) == ("custom", (0.7, 0.95, 8.0))
    assert eps_spec("fast") == {"preset": "fast"}
    with pytest.raises(ValueError, match="k not set"):
        CalibrationSettings(preset="custom", A=0.7, C=0.95)
    # One spelling per schedule: the recorded preset is a name only when A, C and k are exactly its values, and any
    # override, all three or one, records "custom" with the schedule's actual numbers (a partial override used to
    # keep the preset's name beside an A that was not the preset's).
    assert CalibrationSettings(preset="fast", A=0.7, C=0.95, k=8.0).preset == "custom"
    part = CalibrationSettings(preset="fast", A=0.7)  # one override: the preset still gives C and k
    assert (part.preset, part.eps_params()) == ("custom", (0.7,) + EPS_PRESETS["fast"][1:])
    assert part.to_dict()["preset"] == "custom" and (part.A, part.C, part.k) == part.eps_params()
    assert CalibrationSettings.from_dict(part.to_dict()) == part
    # the numbers of a preset, however given, are that preset
    assert s.preset == "distilled" and CalibrationSettings(**eps_spec("0.84:0.99:16")).preset == "balanced"
    assert CalibrationSettings(preset="fast", A=EPS_PRESETS["fast"][0]) == CalibrationSettings(preset="fast")
    named = CalibrationSettings(preset="quality")
    assert (named.A, named.C, named.k) == EPS_PRESETS["quality"]  # recorded with its numbers


@pytest.mark.parametrize("bad", [dict(A=0.99, C=0.9), dict(rho=0.0), dict(gamma=1.5), dict(anchors=0),
                                 dict(preset="turbo"), dict(share_iou=0), dict(steps=0)])
def test_settings_reject_bad_values(bad):
    with pytest.raises(ValueError):
        CalibrationSettings(**bad)
    with pytest.raises(ValueError, match="unknown calibration settings"):
        CalibrationSettings.from_dict({"rhoo": 0.5})


def _random_mass(shape, seed, text=0.0):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(shape, generator=g) ** 4  # skewed, like attention
    return m / m.sum(-1, keepdim=True) * (1.0 - text)


@pytest.mark.parametrize("eps", [0.5, 0.84, 0.95, 0.99])
def test_selection_reaches_eps_per_row_and_is_minimal(eps):
    mass = _random_mass((3, 20, 24), seed=int(eps * 100))
    keep = select_blocks(mass, eps)
    got = kept_mass(mass, keep)
    assert bool((got >= eps - 1e-6).all()), "every row must keep at least eps of its mass"
    # Minimal: removing the smallest kept block of any row drops it below eps.
    smallest = torch.where(keep, mass, torch.full_like(mass, float("inf"))).min(-1).values
    assert bool((got - smallest < eps + 1e-6).all())
    # Largest-first: every kept block outweighs (or ties) every dropped block of the row.
    kept_min = torch.where(keep, mass, torch.full_like(mass, float("inf"))).min(-1).values
    drop_max = torch.where(~keep, mass, torch.full_like(mass, -1.0)).max(-1).values
    assert bool((kept_min >= drop_max).all())


def test_selection_counts_text_share_as_covered():
    mass = _random_mass((2, 8, 10), seed=3, text=0.3)  # 30 % of each row sits on text keys
    keep = select_blocks(mass, 0.9)
    assert bool((kept_mass(mass, keep) >= 0.9 - 1e-6).all())
    video_only = (mass * keep).sum(-1)
    assert bool((video_only >= 0.6 - 1e-6).all()) and bool((video_only < 0.9).any())
    # Text alone above eps: nothing needs to be kept.
    assert not bool(select_blocks(_random_mass((1, 4, 6), 4, text=0.95), 0.9).any())


def test_selection_on_block_energy_with_text_tokens():
    grid = TokenGrid(2, 4, 6, text_tokens=7, text_position="end")
    g = BlockGeometry(grid.video_tokens, 8, 8)  # 48 video tokens: 6 blocks
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, grid.total_tokens, 16, generator=gen) * 0.8
    k = torch.randn(2, 3, grid.total_tokens, 16, generator=gen) * 0.8
    mass = mean_block_mass(block_energy(q, k, g), g, batch=2)
    s = torch.softmax((q @ k.transpose(-1, -2)) / 4.0, -1)  # float64-free dense check of the mass convention
    text = s[..., :grid.video_tokens, grid.video_tokens:].sum(-1).mean(0).reshape(3, g.nq, 8).mean(-1)
    assert torch.allclose(1.0 - mass.sum(-1), text, atol=1e-5)
    keep = select_blocks(mass, 0.9)
    assert bool((kept_mass(mass, keep) >= 0.9 - 1e-5).all())


def test_vote_keeps_blocks_kept_by_at_least_rho_of_prompts():
    counts = torch.tensor([0, 1, 2, 3, 4], dtype=torch.uint8)
    assert vote(counts, 4, 0.5).tolist() == [False, False, True, True, True]
    assert vote(counts, 4, 0.75).tolist() == [False, False, False, True, True]
    assert vote(counts, 4, 1.0).tolist() == [False, False, False, False, True]
    assert vote(counts, 3, 0.5).tolist() == [False, False, True, True, True]  # 2/3 >= .5, 1/3 < .5
    assert vote(torch.zeros(3, dtype=torch.uint8), 0, 0.5).all()  # never observed: dense


def test_share_steps_merges_adjacent_similar_steps_only():
    g = torch.Generator().manual_seed(1)
    base = torch.rand(2, 3, 8, 40, generator=g) < 0.3
    near = base.clone()
    near[0, 0, 0, :] = ~near[0, 0, 0, :]  # a few hundred bits differ out of ~1000 set: IoU well below 0.97
    tiny = base.clone()
    tiny[1, 2, 7, 39] = True  # one block added
    masks = [pack_bits(m) for m in (near, base, tiny, base)]
    assert packed_iou(masks[1], masks[1]) == 1.0
    step_bucket, bucket_masks, _ = share_steps(masks, [0.0, 0.25, 0.5, 0.75], 0.97)
    assert step_bucket == [0, 1, 1, 1]
    assert torch.equal(bucket_masks[1], pack_bits(base | tiny))  # union: no member loses a block
    step_bucket, _, _ = share_steps(masks, [0.0, 0.25, 0.5, 0.75], 0.97, share_after=0.6)
    assert step_bucket == [0, 1, 2, 2]
    rep = [torch.tensor([[True, False]]), torch.tensor([[True, True]])]
    _, _, reps = share_steps([masks[1], masks[1]], [0.0, 0.5], 0.97, rep_heads=rep)
    assert reps[0].tolist() == [[True, False]]  # repetitive only where every member is


def test_anchor_plan_spreads_anchors_and_maps_rows_to_the_nearest():
    grid = TokenGrid(3, 9, 12)
    anchors, row_anchor = anchor_plan(grid, 5)
    assert anchors.numel() == 5 and len(set(anchors.tolist())) == 5
    assert row_anchor.shape == (grid.frame_tokens,) and int(row_anchor.max()) < 5
    assert row_anchor[anchors].tolist() == list(range(5))  # an anchor stands for itself
    hw = torch.stack([torch.arange(108) // 12, torch.arange(108) % 12], -1).double()
    d = ((hw[:, None] - hw[anchors][None]) ** 2).sum(-1)
    assert torch.equal(d.gather(1, row_anchor[:, None]).squeeze(1), d.min(1).values)
    # More anchors than positions: every position is its own anchor.
    small = TokenGrid(1, 2, 2)
    a, r = anchor_plan(small, 9)
    assert a.tolist() == [0, 1, 2, 3] and r.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("nk", [1, 8, 13, 64])
def test_torch_packing_matches_numpys(nk):
    # The torch ops pack masks on a GPU (calibration, per call); numpy packs them on the CPU: one layout.
    m = torch.rand(3, 5, nk, generator=torch.Generator().manual_seed(nk)) < 0.4
    assert torch.equal(_pack_bits_torch(m), pack_bits(m))
