"""The reference block-sparse attention equals dense attention restricted to the selected blocks."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from calibatt.kernels.attention.naive import sparse_attention_reference
from calibatt.masks import BlockGeometry, RepetitionPlan, SkipLists


def token_mask(layer, n_video, n_text):
    """[H, N, N] bool from a LayerSkipList, built independently of the reference's own expansion."""
    g = layer.geometry
    blocks = layer.block_mask()
    H = blocks.shape[0]
    N = n_video + n_text
    m = torch.ones(H, N, N, dtype=torch.bool)
    qb = torch.arange(n_video) // g.block_q
    kb = torch.arange(n_video) // g.block_k
    m[:, :n_video, :n_video] = blocks[:, qb][:, :, kb]
    return m


def masked_sdpa64(q, k, v, mask):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask[None])


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 160), n_text=st.sampled_from([0, 0, 7]), heads=st.integers(1, 3),
       block=st.sampled_from([(16, 16), (32, 16), (16, 32)]), d=st.sampled_from([8, 16]),
       density=st.floats(0.0, 1.0), batch=st.integers(1, 2), seed=st.integers(0, 2**31 - 1),
       layout=st.sampled_from(["bhld", "bld"]))
def test_reference_equals_masked_dense(n, n_text, heads, block, d, density, batch, seed, layout):
    gen = torch.Generator().manual_seed(seed)
    g = BlockGeometry(n, *block)
    mask = torch.rand(1, heads, g.nq, g.nk, generator=gen) < density
    layer = SkipLists.from_block_mask(mask, g).layer(0)
    N = n + n_text
    q, k, v = (torch.randn(batch, heads, N, d, generator=gen, dtype=torch.float64) for _ in range(3))
    want = masked_sdpa64(q, k, v, token_mask(layer, n, n_text))
    if layout == "bld":
        to = lambda t: t.transpose(1, 2).reshape(batch, N, heads * d)  # noqa: E731
        got = sparse_attention_reference(to(q), to(k), to(v), layer, layout="bld", heads=heads)
        got = got.view(batch, N, heads, d).transpose(1, 2)
    else:
        got = sparse_attention_reference(q, k, v, layer)
    assert got.shape == want.shape
    err = (got - want).norm() / want.norm()
    assert err < 1e-12, err


def test_full_mask_equals_dense_sdpa_bf16():
    torch.manual_seed(0)
    g = BlockGeometry(200, 32, 32)
    layer = SkipLists.from_block_mask(torch.ones(1, 2, g.nq, g.nk, dtype=torch.bool), g).layer(0)
    q, k, v = (torch.randn(2, 2, 210, 64, dtype=torch.bfloat16) for _ in range(3))
    got = sparse_attention_reference(q, k, v, layer)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert got.dtype == torch.bfloat16
    err = (got.double() - want).norm() / want.norm()
    assert 0 < err < 1e-2, err


def test_sparse_mask_differs_from_dense():
    """Guards against a reference that ignores the mask."""
    torch.manual_seed(1)
    g = BlockGeometry(128, 16, 16)
    mask = torch.zeros(1, 1, g.nq, g.nk, dtype=torch.bool)
    layer = SkipLists.from_block_mask(mask, g).layer(0)
    q, k, v = (torch.randn(1, 1, 128, 16, dtype=torch.float64) for _ in range(3))
    got = sparse_attention_reference(q, k, v, layer)
    dense = F.scaled_dot_product_attention(q, k, v)
    assert (got - dense).norm() / dense.norm() > 0.1
    # diagonal only: block 0's rows see exactly keys 0..15
    want0 = F.scaled_dot_product_attention(q[:, :, :16], k[:, :, :16], v[:, :, :16])
    assert torch.allclose(got[:, :, :16], want0, atol=1e-12)


def test_repetition_broadcasts_anchor_rows():
    torch.manual_seed(2)
    frames, T = 3, 20
    n = frames * T
    g = BlockGeometry(n, 16, 16)
    K = 2
    anchors = torch.tensor([[3, 11]])
    row_anchor = (torch.arange(T) >= 10).long()[None]  # first half of a frame -> anchor 3, second -> anchor 11
    rep = RepetitionPlan(T, torch.tensor([[-1, 0]]), anchors, row_anchor)
    mask = torch.rand(1, 2, g.nq, g.nk) < 0.4
    layer = SkipLists.from_block_mask(mask, g, rep).layer(0)
    n_text = 5
    q, k, v = (torch.randn(2, 2, n + n_text, 16, dtype=torch.float64) for _ in range(3))
    got = sparse_attention_reference(q, k, v, layer)
    dense = F.scaled_dot_product_attention(q, k, v)
    # head 0 is ordinary: masked dense
    want0 = masked_sdpa64(q, k, v, token_mask(layer, n, n_text))[:, 0]
    assert torch.allclose(got[:, 0], want0, atol=1e-12)
    # head 1: each video row equals the dense output of its frame's anchor row
    for f in range(frames):
        for i in range(T):
            a = f * T + int(anchors[0, int(row_anchor[0, i])])
            assert torch.allclose(got[:, 1, f * T + i], dense[:, 1, a], atol=1e-12)
    # text rows stay dense
    assert torch.allclose(got[:, 1, n:], dense[:, 1, n:], atol=1e-12)
    assert K == anchors.shape[1]
