"""The Triton kernels with a text key bias (key-padding mask on the trailing text keys), run by Triton's interpreter
on the CPU, against the reference and float64. float16 only (the interpreter's bf16 tl.dot is wrong; bf16 is in
test_kernels_gpu.py)."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels' @triton.jit runs (it decides at decoration time)

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
from triton_interp import interpreted_kernels  # noqa: E402

TA, TS = interpreted_kernels()

from calibatt.kernels.attention.naive import sparse_attention_reference  # noqa: E402
from calibatt.kernels.block_energy.naive import block_energy_reference  # noqa: E402
from calibatt.masks import BlockGeometry, RepetitionPlan, SkipLists  # noqa: E402
import helpers_core  # noqa: E402
from helpers_core import masked_sdpa64, rel, token_mask  # noqa: E402

# -max * log2(e) overflows to -inf in float32, which is the intended value; numpy (the interpreter) says so loudly.
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.usefixtures("one_thread")]

def padded_bias(B, T, gen, shared):
    # Rows pad 1 + 3r keys, and unshared biases carry a boolean-mask style -inf as well.
    return helpers_core.padded_bias(B, T, gen, shared, step=3, inf_first_key=not shared)


def make_inputs(B, H, N, D, layout, gen):
    q, k, v = (torch.randn(B, H, N, D, generator=gen).half() for _ in range(3))
    if layout == "bld":
        q, k, v = (t.transpose(1, 2).reshape(B, N, H * D) for t in (q, k, v))
    return q, k, v


def run_poisoned(q, k, v, layer, layout, H, bias, **kw):
    out = torch.full_like(q, float("nan"))
    res = TA.sparse_attention_triton(q, k, v, layer, layout=layout, heads=H, out=out, text_bias=bias, **kw)
    assert res.data_ptr() == out.data_ptr()
    return res


@pytest.mark.parametrize("layout,shared,n,n_text,block", [
    ("bhld", True, 50, 13, (16, 16)),  # text shorter than a tile, partial last video block
    ("bld", False, 64, 70, (32, 16)),  # text over two dense-row tiles (64), not a multiple of either tile
    ("bhld", False, 37, 5, (16, 32)),
])
def test_sparse_with_bias_matches_reference_and_float64(layout, shared, n, n_text, block):
    gen = torch.Generator().manual_seed(n + n_text)
    B, H, D = 2, 2, 16
    g = BlockGeometry(n, *block)
    layer = SkipLists.from_block_mask(torch.rand(1, H, g.nq, g.nk, generator=gen) < 0.4, g).layer(0)
    q, k, v = make_inputs(B, H, n + n_text, D, layout, gen)
    bias = padded_bias(B, n_text, gen, shared)
    out = run_poisoned(q, k, v, layer, layout, H, bias)
    assert not torch.isnan(out).any()
    ref = sparse_attention_reference(q.float(), k.float(), v.float(), layer, layout=layout, heads=H, text_bias=bias)
    assert rel(out, ref) < 3e-3
    qh, kh, vh, oh = (TA.to_bhld(t, layout, H) for t in (q, k, v, out))
    assert rel(oh, masked_sdpa64(qh, kh, vh, bias, n, token_mask(layer, n, n_text))) < 3e-3
    # without the bias the result differs (the bias was really applied), and a zero bias changes nothing
    assert rel(TA.sparse_attention_triton(q, k, v, layer, layout=layout, heads=H), ref) > 1e-2
    zero = TA.sparse_attention_triton(q, k, v, layer, layout=layout, heads=H, text_bias=torch.zeros(n_text))
    assert rel(zero, TA.sparse_attention_triton(q, k, v, layer, layout=layout, heads=H)) < 1e-3


def test_repetition_head_and_skip_heads_with_bias():
    gen = torch.Generator().manual_seed(5)
    frames, T, H, D, n_text, B = 3, 40, 2, 16, 11, 2
    n = frames * T
    g = BlockGeometry(n, 16, 16)
    plan = RepetitionPlan(T, torch.tensor([[-1, 0]], dtype=torch.int32), torch.randperm(T, generator=gen)[:3][None],
                          torch.randint(0, 3, (1, T), generator=gen))
    layer = SkipLists.from_block_mask(torch.rand(1, H, g.nq, g.nk, generator=gen) < 0.4, g, plan).layer(0)
    q, k, v = make_inputs(B, H, n + n_text, D, "bld", gen)
    bias = padded_bias(B, n_text, gen, shared=False)
    out = run_poisoned(q, k, v, layer, "bld", H, bias)
    assert not torch.isnan(out).any()
    ref = sparse_attention_reference(q.float(), k.float(), v.float(), layer, layout="bld", heads=H, text_bias=bias)
    assert rel(out, ref) < 3e-3
    o, r = TA.to_bhld(out, "bld", H), TA.to_bhld(ref, "bld", H)
    assert rel(o[:, 1, :n], r[:, 1, :n]) < 3e-3  # the repetitive head's broadcast anchor rows
    out2 = run_poisoned(q, k, v, layer, "bld", H, bias, skip_heads=torch.tensor([True, False]))
    o2 = TA.to_bhld(out2, "bld", H)
    assert torch.isnan(o2[:, 0]).all()
    assert rel(o2[:, 1], r[:, 1]) < 3e-3


def test_host_descriptor_loads_with_bias():
    """tma=2 (the Hopper default) reads K/V through host TMA descriptors; the text tiles start at an arbitrary
    row (the video length), with a shared bias; head 1 is repetitive (the gathered anchor-row launch)."""
    gen = torch.Generator().manual_seed(9)
    H, D, frames, T, n_text = 2, 16, 3, 15, 21
    n = frames * T
    g = BlockGeometry(n, 16, 16)
    plan = RepetitionPlan(T, torch.tensor([[-1, 0]], dtype=torch.int32), torch.tensor([[1, 7, 12]]),
                          torch.randint(0, 3, (1, T), generator=gen))
    layer = SkipLists.from_block_mask(torch.rand(1, H, g.nq, g.nk, generator=gen) < 0.5, g, plan).layer(0)
    q, k, v = make_inputs(1, H, n + n_text, D, "bhld", gen)
    bias = padded_bias(1, n_text, gen, shared=True)
    tiles = TA.TileConfig(16, 16, 4, 2, 2)
    out = run_poisoned(q, k, v, layer, "bhld", H, bias, tiles=tiles)
    e = TS.block_energy_triton(q, k, g, text_bias=bias, tiles=tiles)
    assert not torch.isnan(out).any()
    assert rel(out, sparse_attention_reference(q.float(), k.float(), v.float(), layer, text_bias=bias)) < 3e-3
    assert rel(out[:, 0], masked_sdpa64(q, k, v, bias, n, token_mask(layer, n, n_text))[:, 0]) < 3e-3
    assert rel(e, block_energy_reference(q.float(), k.float(), g, text_bias=bias)) < 1e-4


@pytest.mark.parametrize("shared,row_stride,n_text", [(True, 1, 9), (False, 1, 70), (False, 2, 13)])
def test_block_energy_with_bias(shared, row_stride, n_text):
    gen = torch.Generator().manual_seed(row_stride * 10 + n_text)
    B, H, n, D = 2, 2, 70, 16
    g = BlockGeometry(n, 16, 16)
    q, k = (torch.randn(B, H, n + n_text, D, generator=gen).half() for _ in range(2))
    bias = padded_bias(B, n_text, gen, shared)
    init = torch.rand(H, g.nq, g.nk, generator=gen)
    out = TS.block_energy_triton(q, k, g, out=init.clone(), row_stride=row_stride, row_offset=1, text_bias=bias)
    ref = block_energy_reference(q.float(), k.float(), g, out=init.clone(), row_stride=row_stride, row_offset=1,
                                 text_bias=bias)
    assert rel(out - init, ref - init) < 1e-4
    assert rel(TS.block_energy_triton(q, k, g, row_stride=row_stride, row_offset=1), ref - init) > 1e-3
    if row_stride == 1:  # float64 from the full masked probability matrix
        assert rel(out - init, helpers_core.block_energy64(q, k, bias, n, g)) < 1e-4


def test_bad_bias_raises():
    g = BlockGeometry(32, 16, 16)
    layer = SkipLists.from_block_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool), g).layer(0)
    q = torch.randn(1, 1, 40, 16).half()
    with pytest.raises(ValueError, match="8 text tokens"):
        TA.sparse_attention_triton(q, q, q, layer, text_bias=torch.zeros(1, 9))
    with pytest.raises(ValueError, match="8 text tokens"):
        TS.block_energy_triton(q, q, g, text_bias=torch.zeros(3, 8))
