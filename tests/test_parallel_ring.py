"""Ring attention over calibrated skip lists (parallel/ring.py) in 2-4 gloo processes on the CPU: each rank's shard
of the output equals the one-process reference (kernels/attention/naive.py) on the whole sequence, in float64, with
dense, sparse and repetitive heads, text tokens after and before the video and a text key bias; and steps without
kept blocks are skipped."""

import dist_harness  # noqa: F401  (first: makes `calibatt` importable in the spawned ranks)

import pytest
import torch

from calibatt.kernels.attention.naive import sparse_attention_reference
from calibatt.masks import BlockGeometry, RepetitionPlan, SkipLists
from calibatt.parallel import RingPlan, merge_partial, partial_attention, ring_sparse_attention

FRAMES, FT, BLOCK, TEXT = 3, 16, 8, 8  # 48 video tokens, 6 blocks a side


def mixed_layer(H, seed, geometry=None):
    """Head 0 dense, the last head repetitive, the others local windows (sparse, real structure)."""
    gen = torch.Generator().manual_seed(seed)
    g = geometry or BlockGeometry(FRAMES * FT, BLOCK, BLOCK)
    i = torch.arange(g.nq)[:, None]
    j = torch.arange(g.nk)[None, :]
    m = torch.zeros(1, H, g.nq, g.nk, dtype=torch.bool)
    m[0, 0] = True
    for h in range(1, H):
        m[0, h] = ((i - j).abs() <= h % 2) | (torch.rand(g.nq, g.nk, generator=gen) < 0.1)
    slot = torch.full((1, H), -1, dtype=torch.int32)
    slot[0, H - 1] = 0
    plan = RepetitionPlan(FT, slot, torch.randperm(FT, generator=gen)[:3].sort().values[None],
                          torch.randint(0, 3, (1, FT), generator=gen))
    return SkipLists.from_block_mask(m, g, plan).layer(0)


def inputs(H, N, seed, B=2, D=8):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=gen, dtype=torch.float64) for _ in range(3))
    bias = torch.zeros(B, TEXT, dtype=torch.float64)
    bias[0, -2:] = float("-inf")  # padded prompt keys in one batch row
    bias[1, -1] = -3.0
    return q, k, v, bias


def _ring_worker(rank, world, H, text_first, seed):
    layer = mixed_layer(H, seed)
    N = FRAMES * FT + TEXT
    vs = TEXT if text_first else 0
    q, k, v, bias = inputs(H, N, seed)
    want = sparse_attention_reference(q, k, v, layer, text_bias=bias, video_start=vs)
    S = N // world
    sl = slice(rank * S, (rank + 1) * S)
    got = ring_sparse_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], layer, seq_len=N, video_start=vs,
                                text_bias=bias)
    err = float((got - want[:, :, sl]).abs().max())
    assert err < 1e-12, f"rank {rank}: max error {err}"


@pytest.mark.parametrize("world,text_first", [(2, False), (4, True)])
def test_ring_equals_one_process(world, text_first):
    # 56 tokens: shards of 28 / 14 cut through 8-token blocks, and the text sits in the last / first shard
    dist_harness.run_ranks(_ring_worker, world, 5, text_first, 7 + world)


def test_merge_partial_is_exact_softmax_over_the_union():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    full, _ = partial_attention(q, k, v, 0.5)
    keep = torch.rand(2, 5, 5, generator=gen) < 0.5
    keep[:, 0] = False  # a row without keys in one part
    a = partial_attention(q, k, v, 0.5, keep)
    b = partial_attention(q, k, v, 0.5, ~keep)
    out, _ = merge_partial(*a, *b)
    assert float((out - full).abs().max()) < 1e-13
    want = torch.softmax(q @ k.transpose(-1, -2) * 0.5, -1) @ v
    assert float((full - want).abs().max()) < 1e-13


def test_ring_plan_skips_steps_without_kept_blocks():
    # No text, local windows only: a far-away key shard has no kept block for the query shard.
    g = BlockGeometry(64, 8, 8)
    i = torch.arange(g.nq)[:, None]
    j = torch.arange(g.nk)[None, :]
    m = ((i - j).abs() <= 1).expand(1, 2, g.nq, g.nk)
    layer = SkipLists.from_block_mask(m, g).layer(0)
    plan = RingPlan.build(layer, 64, 4)
    # shard i (16 tokens = 2 blocks) reaches only its neighbours' shards
    want = (torch.arange(4)[:, None] - torch.arange(4)[None, :]).abs() <= 1
    assert torch.equal(plan.computed, want)
    # ring step s brings rank r the key shard of rank r - s: rank 0 computes its own (step 0), skips step 2's
    assert not plan.computed[0, (0 - 2) % 4] and plan.computed[0, 0]
    # 16 text tokens after the video: the last shard (44 video tokens on, then text) has work with every shard
    # both ways (text rows see every key, every row sees the text keys); far video-only pairs still skip
    plan = RingPlan.build(layer, 80, 4)
    assert bool(plan.computed[3].all()) and bool(plan.computed[:, 3].all())
    assert not plan.computed[0, 2] and not plan.computed[2, 0]


def _skip_worker(rank, world):
    g = BlockGeometry(64, 8, 8)
    i = torch.arange(g.nq)[:, None]
    j = torch.arange(g.nk)[None, :]
    layer = SkipLists.from_block_mask(((i - j).abs() <= 1).expand(1, 2, g.nq, g.nk), g).layer(0)
    q, k, v, _ = inputs(2, 64, 3)
    want = sparse_attention_reference(q, k, v, layer)
    plan = RingPlan.build(layer, 64, world)
    calls = []
    import calibatt.parallel.ring as ring
    real = ring.partial_attention
    ring.partial_attention = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    try:
        sl = slice(rank * 16, (rank + 1) * 16)
        got = ring_sparse_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], layer, seq_len=64, plan=plan)
    finally:
        ring.partial_attention = real
    assert float((got - want[:, :, sl]).abs().max()) < 1e-12
    assert len(calls) == int(plan.computed[rank].sum()) < world, (rank, len(calls))


def test_ring_skips_the_compute_of_empty_steps():
    dist_harness.run_ranks(_skip_worker, 4)
