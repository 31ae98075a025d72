import torch
from hypothesis import given, settings, strategies as st

from calibatt.masks import BlockGeometry, BundleError, RepetitionPlan, SkipLists, mask_to_table


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), bq=st.sampled_from([8, 16, 32]), bk=st.sampled_from([8, 16, 32]),
       density=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_table_round_trip_keeps_mask_and_adds_diagonal(n, bq, bk, density, seed):
    g = BlockGeometry(n, bq, bk)
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(2, 2, g.nq, g.nk, generator=gen) < density
    sl = SkipLists.from_block_mask(mask, g)
    got = sl.block_mask()
    assert torch.equal(got, mask | g.diagonal())
    for lay in sl.layers:
        assert int(lay.kv_counts.min()) >= 1  # no empty row, ever
        # Indices ascend within the valid part, and padding repeats the last valid index (stays in bounds).
        W = lay.kv_indices.shape[-1]
        idx = lay.kv_indices.long()
        valid = torch.arange(W) < lay.kv_counts[..., None]
        assert bool((idx[..., 1:] >= idx[..., :-1])[valid[..., 1:]].all())
        last = idx.gather(-1, (lay.kv_counts.long() - 1)[..., None])
        assert bool((idx == torch.where(valid, idx, last)).all())
        assert int(idx.max()) < g.nk


def test_diagonal_covers_unequal_blocks():
    g = BlockGeometry(100, 32, 16)
    d = g.diagonal()
    assert d.shape == (4, 7)
    # query block 1 spans tokens 32..63 -> key blocks 2 and 3
    assert d[1].nonzero().flatten().tolist() == [2, 3]
    # last query block 96..99 -> key block 6 (96..99)
    assert d[3].nonzero().flatten().tolist() == [6]


def test_density_counts_blocks_and_repetitive_heads_at_anchor_share():
    g = BlockGeometry(64, 16, 16)  # 4 x 4 blocks
    mask = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    rep = RepetitionPlan(16, torch.tensor([[-1, 0]]), torch.tensor([[0, 5]]), torch.zeros(1, 16, dtype=torch.long))
    sl = SkipLists.from_block_mask(mask, g, rep)
    dens = sl.head_densities()
    assert abs(float(dens[0, 0]) - 4 / 16) < 1e-12  # diagonal only
    assert abs(float(dens[0, 1]) - (4 * 2) / 64) < 1e-12  # 4 frames x 2 anchor rows of 64


def test_mask_to_table_width_and_dtype():
    mask = torch.zeros(3, 40000 // 1000, dtype=torch.bool)
    mask[0, :5] = True
    mask[1, 7] = True
    mask[2, [1, 3]] = True
    table, counts = mask_to_table(mask)
    assert table.dtype == torch.int16 and table.shape == (3, 5)
    assert counts.tolist() == [5, 1, 2]
    assert table[1].tolist() == [7] * 5 and table[2].tolist() == [1, 3, 3, 3, 3]


def test_bad_shapes_raise_bundle_error():
    g = BlockGeometry(64, 16, 16)
    try:
        SkipLists.from_block_mask(torch.zeros(1, 1, 3, 4, dtype=torch.bool), g)
    except BundleError as e:
        assert "block mask must be" in str(e)
    else:
        raise AssertionError("expected BundleError")


def test_bundle_builds_the_same_skip_lists_in_one_chunk_or_layer_by_layer(monkeypatch):
    """skip_lists() unpacks several layers at once (bounded by _BUILD_ELEMENTS); chunking must not change them."""
    from calibatt.masks import MaskBundle, ModelSignature, TokenGrid
    from calibatt.masks import bundle as bundle_mod

    grid = TokenGrid(2, 6, 8)
    g = BlockGeometry(grid.video_tokens, 16, 16)
    gen = torch.Generator().manual_seed(7)
    # Layers of very different widths, so a shared table width differs from each layer's own.
    dens = torch.tensor([0.05, 0.9, 0.4, 0.2, 1.0])[:, None, None, None]
    masks = torch.rand(5, 3, g.nq, g.nk, generator=gen) < dens
    b = MaskBundle.from_block_masks(ModelSignature("generic", 5, 3, 16, 48), grid, g, [masks], [1.0], [0])
    whole = b.skip_lists(0)
    b.release()
    monkeypatch.setattr(bundle_mod, "_BUILD_ELEMENTS", 1)  # one layer per chunk
    per_layer = b.skip_lists(0)
    assert torch.equal(whole.block_mask(), masks | g.diagonal())
    assert torch.equal(per_layer.block_mask(), whole.block_mask())
    for a, c in zip(whole.layers, per_layer.layers):
        assert torch.equal(a.kv_counts, c.kv_counts)
        W = c.kv_indices.shape[-1]
        assert torch.equal(a.kv_indices[..., :W], c.kv_indices)  # the shared width only adds padding


def test_bundle_block_masks_are_the_written_masks_with_the_diagonal():
    """MaskBundle.block_masks (previews, the hybrid) unpacks the stored bits: the masks as written plus the block
    diagonal, equal to what the run-time tables hold, for every layer or a chosen few."""
    from calibatt.masks import MaskBundle, ModelSignature, TokenGrid

    grid = TokenGrid(frames=3, height=4, width=10)
    g = BlockGeometry(grid.video_tokens, 16, 16)
    gen = torch.Generator().manual_seed(11)
    masks = [torch.rand(3, 2, g.nq, g.nk, generator=gen) < 0.3 for _ in range(2)]
    b = MaskBundle.from_block_masks(ModelSignature("generic", 3, 2, 16, 32), grid, g, masks, [1.0, 0.5], [0, 1])
    for i, m in enumerate(masks):
        got = b.block_masks(i)
        assert got.dtype == torch.bool and torch.equal(got, m | g.diagonal())
        assert torch.equal(got, b.skip_lists(i).block_mask())
        assert torch.equal(b.block_masks(i, [2, 0]), got[[2, 0]])
