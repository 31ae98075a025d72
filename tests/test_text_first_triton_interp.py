"""The Triton kernels with the text tokens FIRST ([text][video], HunyuanVideo on ComfyUI 0.19+), run by Triton's
interpreter on the CPU: against the same tokens arranged text-last (rows moved back), the reference and float64
specifications with the mask on the true video tokens. float16 only (the interpreter's bf16 tl.dot is wrong; bf16
is in test_kernels_gpu.py)."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels' @triton.jit runs (it decides at decoration time)

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
from triton_interp import interpreted_kernels  # noqa: E402

TA, TS = interpreted_kernels()

from calibatt.kernels.attention.naive import sparse_attention_reference  # noqa: E402
from calibatt.kernels.block_energy.naive import block_energy_reference  # noqa: E402
from calibatt.masks import BlockGeometry, SkipLists  # noqa: E402
from helpers_core import (block_energy64, masked_sdpa64, padded_bias, rel, sparse_rep_layer,  # noqa: E402
                          text_to_back, text_to_front, to_layout, token_mask)

# -max * log2(e) overflows to -inf in float32, which is the intended value; numpy (the interpreter) says so loudly.
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.usefixtures("one_thread")]


def make_bias(kind, B, T, gen):
    if kind == "none":
        return None
    return padded_bias(B, T, gen, shared=kind == "shared", step=3, inf_first_key=kind == "rows")


def run_poisoned(q, k, v, layer, layout, H, **kw):
    out = torch.full_like(q, float("nan"))
    res = TA.sparse_attention_triton(q, k, v, layer, layout=layout, heads=H, out=out, **kw)
    assert res.data_ptr() == out.data_ptr()
    return res


@pytest.mark.parametrize("layout,bias_kind,n_text,block,tma", [
    ("bhld", "none", 11, (16, 16), 0),  # text shorter than a tile; video starts off any tile boundary
    ("bld", "shared", 21, (32, 16), 0),
    ("bhld", "rows", 70, (16, 32), 0),  # text over two dense-row tiles
    ("bhld", "rows", 21, (16, 16), 2),  # host TMA descriptors (the Hopper default): tiles at arbitrary rows
])
def test_sparse_text_first_equals_text_last_and_float64_spec(layout, bias_kind, n_text, block, tma):
    gen = torch.Generator().manual_seed(n_text + tma)
    B, H, frames, Tf, D = 2, 2, 3, 15, 16
    n = frames * Tf  # 45: a partial last video block
    T = n_text
    sd = 2 if layout == "bhld" else 1
    layer = sparse_rep_layer(gen, H, frames, Tf, block)
    q, k, v = (torch.randn(B, H, n + T, D, generator=gen).half() for _ in range(3))
    qf, kf, vf = (text_to_front(t, n, 2) for t in (q, k, v))
    bias = make_bias(bias_kind, B, T, gen)
    tiles = TA.TileConfig(16, 16, 4, 2, tma) if tma else None
    first = run_poisoned(*(to_layout(t, layout) for t in (qf, kf, vf)), layer, layout, H, text_bias=bias,
                         video_start=T, tiles=tiles)
    last = TA.sparse_attention_triton(*(to_layout(t, layout) for t in (q, k, v)), layer, layout=layout,
                                      heads=H, text_bias=bias, tiles=tiles)
    assert not torch.isnan(first).any(), "some output element was never written"
    assert rel(text_to_back(first, n, sd), last) < 2e-3
    ref = sparse_attention_reference(*(to_layout(t.float(), layout) for t in (qf, kf, vf)), layer, layout=layout,
                                     heads=H, text_bias=bias, video_start=T)
    assert rel(first, ref) < 3e-3
    o = TA.to_bhld(first, layout, H)
    want = masked_sdpa64(qf, kf, vf, bias, n, token_mask(layer, n, T, text_first=True), text_first=True)
    assert rel(o[:, 0], want[:, 0]) < 3e-3  # the ordinary head, on the true video tokens
    assert rel(o[:, :, :T], want[:, :, :T]) < 3e-3  # text rows dense, in every head
    dense = masked_sdpa64(qf, kf, vf, bias, n, text_first=True)
    rep = layer.repetition
    rows = (torch.arange(frames)[:, None] * Tf + rep.anchors[0][rep.row_anchor[0]][None, :]).reshape(-1)
    assert rel(o[:, 1, T:], dense[:, 1, T + rows]) < 3e-3  # the repetitive head: anchors' dense output


def test_skip_heads_text_first():
    gen = torch.Generator().manual_seed(5)
    B, H, frames, Tf, D, T = 2, 2, 3, 15, 16, 9
    n = frames * Tf
    layer = sparse_rep_layer(gen, H, frames, Tf, (16, 16))
    q, k, v = (text_to_front(torch.randn(B, H, n + T, D, generator=gen).half(), n, 2) for _ in range(3))
    bias = make_bias("rows", B, T, gen)
    out = run_poisoned(q, k, v, layer, "bhld", H, text_bias=bias, video_start=T,
                       skip_heads=torch.tensor([True, False]))
    assert torch.isnan(out[:, 0]).all()  # left to the caller, text rows included
    ref = sparse_attention_reference(q.float(), k.float(), v.float(), layer, text_bias=bias, video_start=T)
    assert rel(out[:, 1], ref[:, 1]) < 3e-3


@pytest.mark.parametrize("bias_kind,row_stride,n_text", [("none", 1, 9), ("rows", 1, 70), ("shared", 2, 13),
                                                         ("rows", 3, 21)])
def test_block_energy_text_first_equals_text_last(bias_kind, row_stride, n_text):
    gen = torch.Generator().manual_seed(row_stride * 10 + n_text)
    B, H, n, D = 2, 2, 70, 16
    T = n_text
    g = BlockGeometry(n, 16, 16)
    q, k = (torch.randn(B, H, n + T, D, generator=gen).half() for _ in range(2))
    qf, kf = (text_to_front(t, n, 2) for t in (q, k))
    bias = make_bias(bias_kind, B, T, gen)
    init = torch.rand(H, g.nq, g.nk, generator=gen)
    kw = dict(row_stride=row_stride, row_offset=1, text_bias=bias)
    first = TS.block_energy_triton(qf, kf, g, out=init.clone(), video_start=T, **kw)
    last = TS.block_energy_triton(q, k, g, out=init.clone(), **kw)
    assert rel(first - init, last - init) < 1e-4
    ref = block_energy_reference(qf.float(), kf.float(), g, video_start=T, **kw)
    assert rel(first - init, ref) < 1e-4
    if row_stride == 1:  # float64 from the full probability matrix, video tokens where they really are
        assert rel(first - init, block_energy64(qf, kf, bias, n, g, text_first=True)) < 1e-4
    assert rel(TS.block_energy_triton(qf, kf, g, **kw), ref) > 1e-3  # without the offset: other sums


def test_video_start_that_does_not_fit_raises():
    g = BlockGeometry(32, 16, 16)
    layer = SkipLists.from_block_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool), g).layer(0)
    q = torch.randn(1, 1, 40, 16).half()
    with pytest.raises(ValueError, match="video_start 4"):
        TA.sparse_attention_triton(q, q, q, layer, video_start=4)
    with pytest.raises(ValueError, match="video_start 4"):
        TS.block_energy_triton(q, q, g, video_start=4)
