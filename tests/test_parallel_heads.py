"""Ulysses head assignment and head slicing (parallel/heads.py), in one process: LPT balances calibrated costs
far better than the engines' contiguous split on skewed densities, every rank gets ceil(H / P) slots when P does
not divide H, and a rank's sliced skip list gives exactly the full layer's output on its heads (dense, sparse and
repetitive heads; text after and before the video)."""

import torch
import pytest

from calibatt.kernels.attention.naive import sparse_attention_reference
from calibatt.masks import BlockGeometry, RepetitionPlan, SkipLists
from calibatt.parallel import assign_heads, contiguous_heads, head_costs, slice_layer
from calibatt.parallel.heads import PAD, HeadAssignment


def test_lpt_beats_the_contiguous_split_on_skewed_densities():
    # Wan-like: 40 heads, the first 8 dense-routed (cost 1), the rest local windows of 3-12 % of the blocks
    gen = torch.Generator().manual_seed(0)
    dens = torch.cat([torch.full((8,), 0.97), 0.03 + 0.09 * torch.rand(32, generator=gen, dtype=torch.float64)])
    costs = head_costs(dens, dense_cutoff=0.93)
    assert torch.equal(costs[:8], torch.ones(8, dtype=torch.float64))
    for P in (2, 4, 8):
        lpt, cont = assign_heads(costs, P), contiguous_heads(40, P)
        assert lpt.imbalance(costs) < 1.05, (P, lpt.imbalance(costs))
        assert cont.imbalance(costs) > 1.5, (P, cont.imbalance(costs))  # rank 0 holds the dense heads
        assert all(len(r) == 40 // P for r in lpt.ranks)


@pytest.mark.parametrize("H,P", [(5, 2), (5, 4), (24, 5), (40, 3), (3, 3)])
def test_uneven_head_counts_get_equal_slots_with_padding(H, P):
    gen = torch.Generator().manual_seed(H * P)
    costs = torch.rand(H, generator=gen, dtype=torch.float64)
    for a in (assign_heads(costs, P), contiguous_heads(H, P)):
        slots = -(-H // P)
        assert a.slots == slots and len(a.order) == P * slots
        assert sorted(h for h in a.order if h != PAD) == list(range(H))
        assert all(1 <= len(r) <= slots for r in a.ranks)
        # a rank's real heads come first in its slots, padding after
        for r in range(P):
            part = a.order[r * slots:(r + 1) * slots]
            assert part == list(a.ranks[r]) + [PAD] * (slots - len(a.ranks[r]))


def test_lpt_is_no_worse_than_contiguous_and_deterministic():
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        H = int(torch.randint(4, 48, (1,), generator=gen))
        P = int(torch.randint(2, min(H, 8) + 1, (1,), generator=gen))
        costs = torch.rand(H, generator=gen, dtype=torch.float64) ** 3  # skewed
        a = assign_heads(costs, P)
        assert a.imbalance(costs) <= contiguous_heads(H, P).imbalance(costs) + 1e-12
        assert assign_heads(costs.tolist(), P) == a


def test_bad_assignments_and_costs_are_refused():
    with pytest.raises(ValueError, match="at least as many heads as ranks"):
        assign_heads([1.0, 1.0], 3)
    with pytest.raises(ValueError, match="finite and >= 0"):
        assign_heads([1.0, float("nan")], 2)
    with pytest.raises(ValueError, match="exactly one rank"):
        HeadAssignment(3, ((0, 1), (1,)), 2)


def _layer(H, text_gen):
    g = BlockGeometry(3 * 16, 8, 8)
    m = torch.rand(1, H, g.nq, g.nk, generator=text_gen) < 0.3
    m[0, 0] = True  # a dense head
    slot = torch.full((1, H), -1, dtype=torch.int32)
    slot[0, 1] = 1  # two repetitive heads with different plans
    slot[0, H - 1] = 0
    plan = RepetitionPlan(16, slot, torch.stack([torch.randperm(16, generator=text_gen)[:3] for _ in range(2)]),
                          torch.randint(0, 3, (2, 16), generator=text_gen))
    return SkipLists.from_block_mask(m, g, plan).layer(0)


@pytest.mark.parametrize("text_first", [False, True])
def test_sliced_skip_list_gives_the_full_layers_output_on_its_heads(text_first):
    gen = torch.Generator().manual_seed(11)
    H, T = 5, 6
    layer = _layer(H, gen)
    q, k, v = (torch.randn(2, H, 48 + T, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(2, T, generator=gen, dtype=torch.float64)
    vs = T if text_first else 0
    full = sparse_attention_reference(q, k, v, layer, text_bias=bias, video_start=vs)
    for heads in ([1, 4], [0], [3, 2], [4]):
        part = slice_layer(layer, heads)
        assert part.num_heads == len(heads)
        got = sparse_attention_reference(q[:, heads], k[:, heads], v[:, heads], part, text_bias=bias,
                                         video_start=vs)
        assert float((got - full[:, heads]).abs().max()) < 1e-13, heads
        assert torch.equal(part.head_densities(), layer.head_densities()[heads])
    # a rank without repetitive heads carries no repetition plan; one with one head of plan 1 carries just that plan
    assert slice_layer(layer, [0, 2]).repetition is None
    rep = slice_layer(layer, [2, 1]).repetition
    assert rep.head_slot.tolist() == [-1, 0] and rep.anchors.shape[0] == 1
    assert torch.equal(rep.anchors[0], layer.repetition.anchors[int(layer.repetition.head_slot[1])])


def test_for_bucket_routes_the_bundles_dense_heads_and_balances_its_costs():
    """One rank, no process group: the per-rank skip list of a bundle bucket lists every key block for the heads
    above the cutoff (exact dense, as SparseRunner routes them) and keeps the others' masks."""
    from helpers_core import make_bundle

    from calibatt.parallel import SequenceParallelSparse

    bundle = make_bundle(L=2, H=4, density=0.3)
    dens = bundle.entry_densities()[0]
    cutoff = float(dens.flatten().sort().values[5])  # some heads on each side
    sp = SequenceParallelSparse.for_bucket(bundle, 0, dense_cutoff=cutoff)
    assert torch.equal(sp.dense_heads, dens > cutoff)
    lists = bundle.skip_lists(0)
    N = bundle.grid.video_tokens
    for layer in range(2):
        skip, n, plan = sp.local_layer(layer, N, 0)
        assert n == 4 and plan is None and sp.assignment(layer).ranks == ((0, 1, 2, 3),)
        full = skip.block_mask().flatten(1).all(-1)
        want = lists.layer(layer).block_mask()
        for h in range(4):
            if dens[layer, h] > cutoff:
                assert bool(full[h]) and (skip.repetition is None or int(skip.repetition.head_slot[h]) < 0)
            else:
                assert torch.equal(skip.block_mask()[h], want[h])
