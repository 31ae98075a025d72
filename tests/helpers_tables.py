"""Shared by the skip-table tests: random bundles with partial blocks, repetitive heads and dense heads, and the
previous table scheme (every layer's table built at once by a stable argsort, mixed layers widened by
LayerSkipList.with_full_heads) as the oracle the per-call tables must equal."""

import torch

from calibatt.masks import LayerSkipList, MaskBundle, ModelSignature, RepetitionPlan, SkipLists, TokenGrid
from calibatt.masks import BlockGeometry
from calibatt.masks.packing import unpack_bits


def random_bundle(seed, *, L=4, H=3, frames=3, height=5, width=7, block_q=16, block_k=16, buckets=2,
                  n_text=0, text_position="end", head_dim=16):
    """A bundle whose layers differ in density (one all-dense layer, one diagonal-only layer), with a repetitive
    head in bucket 0 and (by the grid) a partial last block. Returns (bundle, grid, per-bucket SkipLists)."""
    gen = torch.Generator().manual_seed(seed)
    grid = TokenGrid(frames=frames, height=height, width=width, text_tokens=n_text,
                     text_position=text_position if n_text else "none")
    g = BlockGeometry(grid.video_tokens, block_q, block_k)
    dens = torch.rand(L, H, 1, 1, generator=gen) * 0.6
    dens[0] = 1.1  # layer 0: every head keeps every block
    if L > 1:
        dens[1, 0] = 1.1  # layer 1: one dense head, the others sparse (a mixed layer at the default cutoff)
    if L > 2:
        dens[2] = -1.0  # layer 2: the diagonal only
    lists, masks, plans = [], [], []
    for b in range(buckets):
        m = torch.rand(L, H, g.nq, g.nk, generator=gen) < dens
        rep = None
        if b == 0:
            slot = torch.full((L, H), -1, dtype=torch.int32)
            slot[min(1, L - 1), H - 1] = 0
            slot[L - 1, 0] = 1
            K = 2
            anchors = torch.stack([torch.randperm(grid.frame_tokens, generator=gen)[:K] for _ in range(2)])
            row_anchor = torch.randint(0, K, (2, grid.frame_tokens), generator=gen)
            rep = RepetitionPlan(grid.frame_tokens, slot, anchors, row_anchor)
        masks.append(m)
        plans.append(rep)
        lists.append(SkipLists.from_block_mask(m, g, rep))
    sig = ModelSignature("wan21", L, H, head_dim, head_dim * H)
    sigmas = torch.linspace(1.0, 0.1, buckets).tolist()
    bundle = MaskBundle.from_block_masks(sig, grid, g, masks, sigmas, list(range(buckets)), repetition=plans)
    return bundle, grid, lists


def old_mask_to_table(mask, width):
    """The table builder before the prefix-sum compaction (a stable argsort puts the kept blocks first)."""
    nk = mask.shape[-1]
    counts = mask.sum(-1, dtype=torch.int32)
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[..., :width]
    take = torch.minimum(torch.arange(width).expand(*counts.shape, width), (counts.long() - 1).clamp(min=0)[..., None])
    dtype = torch.int16 if nk <= torch.iinfo(torch.int16).max else torch.int32
    return order.gather(-1, take).to(dtype), counts


def old_bucket_layers(bundle, bucket, full_heads=None):
    """Per layer (plain LayerSkipList, full-head variant or None) as the previous scheme built them: the whole
    bucket unpacked, every layer's table at the layer's longest row, mixed layers widened by with_full_heads."""
    g = bundle.geometry
    ids = bundle.entry_mask[bucket].long()
    mask = unpack_bits(bundle.packed_masks[ids.reshape(-1)], g.nk).view(*ids.shape, g.nq, g.nk)
    widths = bundle.max_counts()[ids].amax(-1).tolist()
    plan = bundle.repetition_plan(bucket)
    out = []
    for l in range(bundle.num_layers):
        table, counts = old_mask_to_table(mask[l], int(widths[l]))
        lay = LayerSkipList(g, table, counts, plan.for_layer(l) if plan is not None else None)
        full = None
        if full_heads is not None and bool(full_heads[l].any()):
            full = lay.with_full_heads(full_heads[l])
        out.append((lay, full))
    return out


def slots(layer):
    """Per head: None (not repetitive) or its (anchors, row -> anchor map)."""
    rep = layer.repetition
    if rep is None:
        return [None] * layer.num_heads
    return [(rep.anchors.cpu()[x].tolist(), rep.row_anchor.cpu()[x].tolist()) if x >= 0 else None
            for x in rep.head_slot.cpu().tolist()]


def assert_same_layer(new, old):
    """Same table (width, dtype, indices including the padding) and counts, same repetitive heads and plans."""
    assert new.kv_indices.dtype == old.kv_indices.dtype
    assert new.kv_indices.shape == old.kv_indices.shape
    assert torch.equal(new.kv_indices.cpu(), old.kv_indices.cpu())
    assert torch.equal(new.kv_counts.cpu(), old.kv_counts.cpu())
    assert slots(new) == slots(old)
