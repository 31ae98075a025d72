"""calibration/hybrid.py: static / dynamic heads from the calibration statistics, per-call routing of dynamic heads
from pooled q.k within the calibrated budget, and the block-mask attention against a per-block dense reference."""

import math

import pytest
import torch

from calibatt.calibration import CalibrationSettings, Calibrator
from calibatt.calibration.hybrid import (HybridAttention, HybridPlan, block_mask_attention, hybrid_block_mask,
                                         pooled_scores, route_dynamic)
from calibatt.kernels.attention.naive import sparse_attention_reference
from calibatt.kernels.call import AttentionCall
from calibatt.masks import BlockGeometry, ModelSignature, TokenGrid
from calibatt.kernels.dense import dense_attention
from synthetic import planted_layer

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = TokenGrid(2, 8, 8)  # 128 tokens, 8 blocks of 16
SIG = ModelSignature("generic", 1, 2, 16, 32)
SIGMAS = [2.0, 0.5]
G = BlockGeometry(GRID.video_tokens, 16, 16)


def layer_qkv(prompt: int, column_block: int):
    """Head 0 a local window (the same for every prompt); head 1 the same window plus one key block that every
    query attends strongly, a different block per prompt: a head that follows the content."""
    q, k, v = planted_layer(GRID, ["local", "local"], 16, prompt=prompt, layer=0)
    q[:, 1, :, 4] = 4.0
    cols = slice(column_block * 16, (column_block + 1) * 16)
    k[:, 1, cols, 4] = 4.0  # +16 on the scores
    return q, k, v


CALIB_COLUMNS = {0: 1, 1: 4, 2: 6}


@pytest.fixture(scope="module")
def calibrated():
    st = CalibrationSettings(block_q=16, block_k=16, A=0.9, C=0.9, k=0.0, stats_row_stride=1, repetition=False)
    cal = Calibrator(SIG, GRID, st, background=False)
    for p, c in CALIB_COLUMNS.items():
        cal.begin_prompt(sample_sigmas=SIGMAS + [0.0], key=f"p{p}")
        for s in SIGMAS:
            q, k, v = layer_qkv(p, c)
            cal.observe(AttentionCall(q, k, v, "bhld", 2, 0, s, GRID, scale=1.0))
        cal.end_prompt()
    return cal.finish(), cal.state()


def test_plan_classifies_the_content_following_head_dynamic(calibrated):
    bundle, stats = calibrated
    plan = HybridPlan.from_calibration(bundle, stats)
    for b in plan.buckets:
        assert float(b.stability[0, 0]) > float(b.stability[0, 1])
        assert b.static[0].tolist() == [True, False], b.stability
        # the budget is a prompt's row count: room beyond the always-kept blocks for the prompt's own column block
        assert bool((b.budget[0, 1] >= b.always[0, 1].sum(-1) + 1).all()), (b.budget, b.always.sum(-1))
        assert bool((b.budget[0, 1] < b.mask[0, 1].sum(-1) + 3).all())
        assert bool((b.mask | ~b.always).all()) and bool(b.always[..., torch.arange(8), torch.arange(8)].all())
    # thresholds at the ends: 0 makes every head static, above the local head's stability none (bar dense ones)
    assert HybridPlan.from_calibration(bundle, stats, static_iou=0.0).static_share() == 1.0
    assert HybridPlan.from_calibration(bundle, stats, static_iou=1.0).static_share() < 1.0
    with pytest.raises(ValueError, match="static_iou must be in"):
        HybridPlan.from_calibration(bundle, stats, static_iou=1.5)


def test_route_dynamic_keeps_always_then_the_best_scores_up_to_the_budget():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 6, 10, generator=g)
    always = torch.rand(3, 6, 10, generator=g) < 0.2
    budget = torch.randint(1, 8, (2, 3, 6), generator=g)
    keep = route_dynamic(scores, always[None], budget)
    for b in range(2):
        for h in range(3):
            for r in range(6):
                a = always[h, r]
                want = a.clone()
                rest = [int(i) for i in torch.argsort(scores[b, h, r], descending=True, stable=True) if not a[i]]
                for i in rest[:max(0, int(budget[b, h, r]) - int(a.sum()))]:
                    want[i] = True
                assert torch.equal(keep[b, h, r], want), (b, h, r)


def _per_block_reference(q, k, v, mask, g: BlockGeometry, scale):
    """Dense attention of each query block over the token keys of its kept key blocks, one block at a time."""
    B, H, N, D = q.shape
    out = torch.empty_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(g.nq):
                rows = slice(i * g.block_q, min(N, (i + 1) * g.block_q))
                keys = torch.cat([torch.arange(j * g.block_k, min(N, (j + 1) * g.block_k))
                                  for j in range(g.nk) if mask[b, h, i, j]])
                p = torch.softmax(q[b, h, rows] @ k[b, h, keys].T * scale, -1)
                out[b, h, rows] = p @ v[b, h, keys]
    return out


def test_hybrid_attention_equals_the_per_block_reference(calibrated):
    bundle, stats = calibrated
    plan = HybridPlan.from_calibration(bundle, stats)
    q, k, v = (x.double() for x in layer_qkv(7, 3))
    q, k, v = (torch.cat([x, x.flip(2)]) for x in (q, k, v))  # two batch rows that route differently
    bucket = plan.buckets[plan.bucket_for_sigma(0.5)]
    mask = hybrid_block_mask(q, k, bucket, 0, G, 1.0)
    assert not torch.equal(mask[0, 1], mask[1, 1])  # the dynamic head routed each row by its own content
    assert torch.equal(mask[0, 0], bucket.mask[0, 0]) and torch.equal(mask[1, 0], bucket.mask[0, 0])
    got = block_mask_attention(q, k, v, mask, G, scale=1.0)
    want = _per_block_reference(q, k, v, mask, G, 1.0)
    assert torch.allclose(got, want, atol=1e-10)
    # partial last block: 120 tokens, blocks of 16 (8 blocks, the last of 8 tokens)
    g2 = BlockGeometry(120, 16, 16)
    m2 = route_dynamic(pooled_scores(q[..., :120, :], k[..., :120, :], g2, 1.0), g2.diagonal()[None, None],
                       torch.full((2, 2, 8), 3))
    assert torch.allclose(block_mask_attention(q[..., :120, :], k[..., :120, :], v[..., :120, :], m2, g2, 1.0),
                          _per_block_reference(q[..., :120, :], k[..., :120, :], v[..., :120, :], m2, g2, 1.0),
                          atol=1e-10)


def test_dynamic_head_follows_a_new_prompts_content_at_the_calibrated_density(calibrated):
    bundle, stats = calibrated
    plan = HybridPlan.from_calibration(bundle, stats)
    q, k, v = layer_qkv(11, 3)  # its strong key block (3) is one no calibration prompt had
    dense = dense_attention(q, k, v, scale=1.0)
    handler = HybridAttention(plan)
    handler.begin_step(0.5)
    hyb = handler(AttentionCall(q, k, v, "bhld", 2, 0, 0.5, GRID, scale=1.0))
    b = bundle.bucket_for_sigma(0.5)
    static = sparse_attention_reference(q, k, v, bundle.skip_lists(b).layer(0), scale=1.0)

    def err(o, h):
        return float((o[:, h] - dense[:, h]).norm() / dense[:, h].norm())
    assert err(hyb, 1) < 0.5 * err(static, 1), (err(hyb, 1), err(static, 1))
    assert err(hyb, 0) == pytest.approx(err(static, 0), abs=1e-6)  # the static head is the bundle's
    # the static head spends its calibrated mask, the dynamic head exactly its budget
    pb = plan.buckets[b]
    want = (float(pb.mask[0, 0].sum()) + float(pb.budget[0, 1].sum())) / (2 * G.nq * G.nk)
    assert handler.mean_density() == pytest.approx(want)
    assert float(plan.entry_densities()[b, 0].mean()) == pytest.approx(want)  # what the plan says it spends


def test_mask_budget_spends_the_heads_calibrated_density_uniformly(calibrated):
    bundle, stats = calibrated
    plan = HybridPlan.from_calibration(bundle, stats, budget="mask")
    for b in plan.buckets:
        per_row = b.mask[0, 1].sum(-1).double()
        uniform = int(math.ceil(float(per_row.mean())))
        assert uniform > 1
        assert b.budget[0, 1].tolist() == [max(uniform, int(a)) for a in b.always[0, 1].sum(-1)]
    with pytest.raises(ValueError, match="budget must be one of 'prompt', 'mask'"):
        HybridPlan.from_calibration(bundle, stats, budget="rows")
