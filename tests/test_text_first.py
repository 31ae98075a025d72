"""Joint attention with the text tokens FIRST ([text][video]: HunyuanVideo on ComfyUI 0.19+) on the CPU paths: the
reference, the dense fallback, the statistics reference, the runner's routes and a calibration. Each is checked two
ways: against the same tokens arranged text-last (rows moved back), and against float64 specifications that place
the mask on the true video tokens (helpers_core, text_first=True). The interpreted Triton kernels are in
test_text_first_triton_interp.py, the GPU ones in test_kernels_gpu.py."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from calibatt.calibration import CalibrationSettings, Calibrator
from synthetic import planted_layer
from calibatt.kernels.call import AttentionCall
from calibatt.kernels.dense import dense_attention
from calibatt.kernels.layouts import token_spans
from calibatt.kernels.attention.naive import sparse_attention_reference
from calibatt.kernels.runner import SparseRunner
from calibatt.kernels.block_energy import block_energy
from calibatt.kernels.block_energy.naive import block_energy_reference
from calibatt.masks import BlockGeometry, MaskBundle, ModelSignature, SkipLists, TokenGrid
from helpers_core import (NEG, block_energy64, from_layout, masked_sdpa64, padded_bias, rel, sparse_rep_layer,
                          text_to_back, text_to_front, to_layout, token_mask)

pytestmark = pytest.mark.usefixtures("one_thread")


def seq_dim(layout):
    return 2 if layout == "bhld" else 1


def make_bias(kind, B, T, gen):
    return None if kind == "none" else padded_bias(B, T, gen, shared=kind == "shared")


# ---- where the tokens sit ------------------------------------------------------------------------------------
def test_token_spans():
    assert token_spans(60, 45, 0) == (0, 45, 15)
    assert token_spans(60, 45, 15) == (15, 0, 15)
    assert token_spans(45, 45, 0) == (0, 45, 0)
    with pytest.raises(ValueError, match="pass 0 .text after the video. or 15"):
        token_spans(60, 45, 7)
    with pytest.raises(ValueError, match="does not cover"):
        token_spans(40, 45, 0)
    grid = TokenGrid(3, 3, 5, text_tokens=15, text_position="start")
    assert token_spans(grid.total_tokens, grid.video_tokens, grid.video_start) == (15, 0, 15)


# ---- reference -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["bhld", "bld"])
@pytest.mark.parametrize("bias_kind", ["none", "shared", "rows"])
def test_reference_text_first_equals_text_last_and_float64_spec(layout, bias_kind):
    gen = torch.Generator().manual_seed(11 + len(bias_kind) + len(layout))
    B, H, frames, Tf, T, D = 2, 3, 3, 15, 11, 8
    n = frames * Tf  # 45: a partial last video block of 13
    layer = sparse_rep_layer(gen, H, frames, Tf, (16, 16))
    q, k, v = (torch.randn(B, H, n + T, D, generator=gen, dtype=torch.float64) for _ in range(3))
    bias = make_bias(bias_kind, B, T, gen)
    qf, kf, vf = (text_to_front(t, n, 2) for t in (q, k, v))

    last = sparse_attention_reference(*(to_layout(t, layout) for t in (q, k, v)), layer, layout=layout, heads=H,
                                      text_bias=bias)
    first = sparse_attention_reference(*(to_layout(t, layout) for t in (qf, kf, vf)), layer, layout=layout,
                                       heads=H, text_bias=bias, video_start=T)
    assert rel(text_to_back(first, n, seq_dim(layout)), last) < 1e-12
    first = from_layout(first, layout, H)
    # Independent specification: float64 SDPA with the block mask on the true (text-first) video tokens.
    want = masked_sdpa64(qf, kf, vf, bias, n, token_mask(layer, n, T, text_first=True), text_first=True)
    assert rel(first[:, :H - 1], want[:, :H - 1]) < 1e-12
    assert rel(first[:, :, :T], want[:, :, :T]) < 1e-12  # text rows dense (the repetitive head's too)
    # The repetitive head: every video row carries its frame anchor's dense output.
    dense = masked_sdpa64(qf, kf, vf, bias, n, text_first=True)
    rep = layer.repetition
    rows = (torch.arange(frames)[:, None] * Tf + rep.anchors[0][rep.row_anchor[0]][None, :]).reshape(-1)
    assert rel(first[:, H - 1, T:], dense[:, H - 1, T + rows]) < 1e-12
    # and it is not the text-last arrangement's answer read in place (the offset matters)
    assert rel(first, from_layout(last, layout, H)) > 1e-2


def test_reference_rejects_a_video_start_that_does_not_fit():
    g = BlockGeometry(32, 16, 16)
    layer = SkipLists.from_block_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool), g).layer(0)
    q = torch.randn(1, 1, 40, 8)
    with pytest.raises(ValueError, match="video_start 3"):
        sparse_attention_reference(q, q, q, layer, video_start=3)


# ---- dense fallback ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shared", [True, False])
def test_dense_attention_text_first_bias(shared):
    gen = torch.Generator().manual_seed(23 + shared)
    n, T = 24, 6
    q, k, v = (torch.randn(2, 2, n + T, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    bias = padded_bias(2, T, gen, shared=shared)
    out = dense_attention(q, k, v, text_bias=bias, video_start=T)
    assert rel(out, masked_sdpa64(q, k, v, bias, n, text_first=True)) < 1e-12
    assert rel(out, dense_attention(q, k, v, text_bias=bias)) > 1e-2  # the bias sits on the first T keys
    with pytest.raises(ValueError, match="video_start 5"):
        dense_attention(q, k, v, text_bias=bias, video_start=5)


# ---- statistics ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias_kind,row_stride", [("none", 1), ("rows", 1), ("shared", 2)])
def test_block_energy_text_first_equals_text_last(bias_kind, row_stride):
    gen = torch.Generator().manual_seed(7 + row_stride)
    B, H, n, T, D = 2, 2, 37, 10, 8
    g = BlockGeometry(n, 8, 16)
    q, k = (torch.randn(B, H, n + T, D, generator=gen) * 2 for _ in range(2))
    bias = make_bias(bias_kind, B, T, gen)
    qf, kf = (text_to_front(t, n, 2) for t in (q, k))
    init = torch.rand(H, g.nq, g.nk, generator=gen)
    last = block_energy_reference(q, k, g, out=init.clone(), row_stride=row_stride, row_offset=1, text_bias=bias)
    first = block_energy(qf, kf, g, out=init.clone(), row_stride=row_stride, row_offset=1, text_bias=bias,
                         video_start=T)  # CPU: the reference
    assert rel(first - init, last - init) < 1e-6
    if row_stride == 1:
        assert rel(first - init, block_energy64(qf, kf, bias, n, g, text_first=True)) < 1e-5
    # read without the offset, the same tensors give other sums (the offset is really used)
    assert rel(block_energy_reference(qf, kf, g, row_stride=row_stride, row_offset=1, text_bias=bias),
               last - init) > 1e-3


# ---- runner --------------------------------------------------------------------------------------------------
def _banded_bundle(H, grid, mixed):
    """Layer 1 keeps the diagonal block and the next one (sparse); with mixed, head 0 keeps every block."""
    g = BlockGeometry(grid.video_tokens, 16, 16)
    i = torch.arange(g.nq)[:, None]
    j = torch.arange(g.nk)[None, :]
    m = ((j == i) | (j == i + 1)).expand(2, H, g.nq, g.nk).clone()
    if mixed:
        m[1, 0] = True
    sig = ModelSignature("hunyuan", 2, H, 16, 16 * H)
    return MaskBundle.from_block_masks(sig, grid, g, [m], [1.0], [0])


@pytest.mark.parametrize("layout", ["bhld", "bld"])
@pytest.mark.parametrize("route,cutoff", [("sparse", 1.0), ("dense", 0.0), ("mixed", 0.6), ("dense_step", 1.0)])
def test_runner_routes_text_first_equal_text_last(layout, route, cutoff):
    gen = torch.Generator().manual_seed(17)
    B, H, T, D = 2, 3, 13, 16
    video = TokenGrid(3, 4, 5)  # 60 tokens: a partial last block of 12
    n = video.video_tokens
    bundle = _banded_bundle(H, video, route == "mixed")
    q, k, v = (torch.randn(B, H, n + T, D, generator=gen, dtype=torch.float64) for _ in range(3))
    bias = padded_bias(B, T, gen, shared=False)
    outs = {}
    for pos in ("end", "start"):
        runner = SparseRunner(bundle, dense_cutoff=cutoff, dense_first=0.5 if route == "dense_step" else 0.0)
        runner.begin_step(1.0, "cpu", step_fraction=0.0)
        if route != "dense_step":
            assert runner.route(1) == route
        grid = TokenGrid(3, 4, 5, text_tokens=T, text_position=pos)
        qq, kk, vv = (t if pos == "end" else text_to_front(t, n, 2) for t in (q, k, v))
        call = AttentionCall(*(to_layout(t, layout) for t in (qq, kk, vv)), layout=layout, heads=H, layer=1,
                             sigma=1.0, grid=grid, text_bias=bias)
        assert call.video_start == (T if pos == "start" else 0)
        outs[pos] = from_layout(runner(call), layout, H)
    assert rel(text_to_back(outs["start"], n, 2), outs["end"]) < 1e-12
    qf, kf, vf = (text_to_front(t, n, 2) for t in (q, k, v))
    if route in ("sparse", "mixed"):
        layer = bundle.skip_lists(0).layer(1)
        want = masked_sdpa64(qf, kf, vf, bias, n, token_mask(layer, n, T, text_first=True), text_first=True)
        heads = slice(1, H) if route == "mixed" else slice(0, H)
        assert rel(outs["start"][:, heads], want[:, heads]) < 1e-12
    if route != "sparse":  # the dense heads (all of them on the dense routes)
        heads = slice(0, 1) if route == "mixed" else slice(0, H)
        want = masked_sdpa64(qf, kf, vf, bias, n, text_first=True)
        assert rel(outs["start"][:, heads], want[:, heads]) < 1e-12


# ---- calibration ---------------------------------------------------------------------------------------------
def _calibrate(pos):
    """Two prompts, CFG-style (negative row 0, positive row 1), 9 text tokens with padded keys as a per-batch bias
    and a repetitive head, every call arranged with the text at `pos`."""
    video = TokenGrid(2, 4, 8)
    n, T = video.video_tokens, 9
    kinds = ["local", "repeat", "global"]
    cal = Calibrator(ModelSignature("hunyuan", 1, 3, 16, 48), video,
                     CalibrationSettings(block_q=16, block_k=16, stats_row_stride=2), background=False)
    sigmas = [5.0, 1.0, 0.2]
    text_last = TokenGrid(2, 4, 8, text_tokens=T, text_position="end")
    grid = TokenGrid(2, 4, 8, text_tokens=T, text_position=pos)
    bias = torch.zeros(2, T)
    bias[0, 7:] = NEG
    bias[1, 4:] = NEG
    outs = []
    for prompt in range(2):
        cal.begin_prompt(sample_sigmas=sigmas)
        for s in sigmas:
            rows = [planted_layer(text_last, kinds, 16, prompt=prompt * 10 + r, layer=0, sigma=s) for r in range(2)]
            q, k, v = (torch.cat(t) for t in zip(*rows))
            k[:, :, n:] += 1.5 * q[:, :, :n].mean(2, keepdim=True)  # text keys that draw real attention
            if pos == "start":
                q, k, v = (text_to_front(t, n, 2) for t in (q, k, v))
            out = cal.observe(AttentionCall(q, k, v, "bhld", 3, 0, s, grid, positive_rows=[1], scale=1.0,
                                            text_bias=bias))
            outs.append(out if pos == "end" else text_to_back(out, n, 2))
        cal.end_prompt()
    return cal, outs


def test_calibration_text_first_gives_the_text_last_bundle():
    (cal_l, out_l), (cal_f, out_f) = _calibrate("end"), _calibrate("start")
    for a, b in zip(out_f, out_l):  # the dense outputs the calibrator hands back
        assert rel(a, b) < 1e-6
    sl, sf = cal_l.state(), cal_f.state()
    assert set(sl.counts) == set(sf.counts) and len(sl.counts) == 3
    for key in sl.counts:
        assert np.array_equal(sl.get_counts(*key), sf.get_counts(*key)), key
    for name in ("rep_err", "rep_frac", "drop"):
        for x, y in zip(getattr(sl, name), getattr(sf, name)):
            assert torch.allclose(x, y, rtol=1e-5, atol=1e-7), name
    bl, bf = cal_l.finish(), cal_f.finish()
    assert bl.step_bucket == bf.step_bucket and bl.num_buckets == bf.num_buckets
    assert bl.density < 0.95  # the masks skip blocks
    for i in range(bl.num_buckets):
        a, b = bl.skip_lists(i), bf.skip_lists(i)
        assert torch.equal(a.block_mask(), b.block_mask()), i
        assert (a.repetition is None) == (b.repetition is None)
        if a.repetition is not None:
            assert torch.equal(a.repetition.head_slot, b.repetition.head_slot)
    # the repetitive head was found from the text-first outputs too (the repetition check reads the video rows)
    assert any(bf.skip_lists(i).repetition is not None for i in range(bf.num_buckets))
    # and either bundle runs calls of another text length, on either side, to the same output
    T = 5
    text_last = TokenGrid(2, 4, 8, text_tokens=T, text_position="end")
    q, k, v = planted_layer(text_last, ["local", "repeat", "global"], 16, prompt=7, layer=0, sigma=1.0)
    out_l = SparseRunner(bf, dense_cutoff=1.0)(AttentionCall(q, k, v, "bhld", 3, 0, 1.0, text_last, scale=1.0))
    first = TokenGrid(2, 4, 8, text_tokens=T, text_position="start")
    qf, kf, vf = (text_to_front(t, 64, 2) for t in (q, k, v))
    out_f = SparseRunner(bl, dense_cutoff=1.0)(AttentionCall(qf, kf, vf, "bhld", 3, 0, 1.0, first, scale=1.0))
    assert rel(text_to_back(out_f, 64, 2), out_l) < 1e-6
    dense = F.scaled_dot_product_attention(q, k, v, scale=1.0)
    assert rel(out_l, dense) > 1e-3  # blocks were skipped
