"""Text key bias (a key-padding mask over the trailing text keys, HunyuanVideo's padded prompt) on the CPU paths:
the reference, the statistics reference, the runner's routes and the ComfyUI router. The interpreted Triton kernels
are in test_text_bias_triton_interp.py, the GPU ones in test_kernels_gpu.py."""

import logging

import pytest
import torch
import torch.nn.functional as F

from calibatt.kernels.call import AttentionCall
from calibatt.kernels.dense import dense_attention
from calibatt.kernels.attention.naive import sparse_attention_reference
from calibatt.kernels.runner import SparseRunner
from calibatt.kernels.block_energy import block_energy
from calibatt.kernels.block_energy.naive import block_energy_reference
from calibatt.kernels.text_bias import as_text_bias, select_rows
from calibatt.masks import BlockGeometry, MaskBundle, ModelSignature, RepetitionPlan, SkipLists, TokenGrid
from calibatt.nodes import model_info as mi
from calibatt.nodes.routing import LAYER_KEY, AttentionRouter, key_padding_bias
from helpers_core import (NEG, block_energy64, comfy_attention, from_layout, masked_sdpa64, padded_bias, rel,
                          to_layout, token_mask)

pytestmark = pytest.mark.usefixtures("one_thread")

# ---- the bias itself -----------------------------------------------------------------------------------------
def test_as_text_bias_forms_and_errors():
    b = torch.tensor([0.5, -1.0, 2.0])
    assert as_text_bias(b, 4, 3).shape == (1, 3)
    assert as_text_bias(b[None].expand(4, 3), 4, 3).shape == (4, 3)
    m = as_text_bias(torch.tensor([True, False, True]), 2, 3)
    assert m.dtype == torch.float32 and m[0, 0] == 0 and m[0, 1] == float("-inf")
    assert as_text_bias(None, 2, 3) is None and as_text_bias(torch.zeros(1, 0), 2, 0) is None
    with pytest.raises(ValueError, match="text tokens"):
        as_text_bias(torch.zeros(1, 4), 2, 3)
    with pytest.raises(ValueError, match="batch rows"):
        as_text_bias(torch.zeros(3, 3), 2, 3)
    with pytest.raises(ValueError, match="floating point"):
        as_text_bias(torch.zeros(1, 3, dtype=torch.long), 2, 3)
    per = torch.arange(12.0).view(4, 3)
    assert torch.equal(select_rows(per, [2, 3]), per[2:])
    assert torch.equal(select_rows(per, [3, 0]), per[[3, 0]])
    assert select_rows(per[:1], [3]).shape == (1, 3)  # shared: unchanged


# ---- reference -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["bhld", "bld"])
@pytest.mark.parametrize("shared", [True, False])
def test_reference_with_bias_matches_float64_masked_sdpa(layout, shared):
    gen = torch.Generator().manual_seed(3 + shared)
    B, H, n, T, D = 2, 2, 45, 11, 8
    g = BlockGeometry(n, 8, 16)
    layer = SkipLists.from_block_mask(torch.rand(1, H, g.nq, g.nk, generator=gen) < 0.4, g).layer(0)
    q, k, v = (torch.randn(B, H, n + T, D, generator=gen) for _ in range(3))
    bias = padded_bias(B, T, gen, shared)
    out = sparse_attention_reference(*(to_layout(t, layout) for t in (q, k, v)), layer, layout=layout, heads=H,
                                     text_bias=bias)
    want = masked_sdpa64(q, k, v, bias, n, token_mask(layer, n, T))
    assert rel(from_layout(out, layout, H), want) < 1e-5
    # the bias really changes the result
    assert rel(sparse_attention_reference(q, k, v, layer), want) > 1e-2


def test_reference_padding_equals_dropping_the_padded_keys():
    """-inf (or -max) on a text key is the same as that key not being there, for every row that remains."""
    gen = torch.Generator().manual_seed(11)
    B, H, n, T, D, keep = 2, 3, 40, 9, 8, 5
    g = BlockGeometry(n, 16, 16)
    layer = SkipLists.from_block_mask(torch.rand(1, H, g.nq, g.nk, generator=gen) < 0.5, g).layer(0)
    q, k, v = (torch.randn(B, H, n + T, D, generator=gen) for _ in range(3))
    pad = torch.arange(T) >= keep
    for bias in (torch.where(pad, NEG, 0.0), ~pad):  # additive and boolean (True = attend)
        out = sparse_attention_reference(q, k, v, layer, text_bias=bias)
        short = sparse_attention_reference(q[:, :, :n + keep], k[:, :, :n + keep], v[:, :, :n + keep], layer)
        assert rel(out[:, :, :n + keep], short) < 1e-6


def test_reference_repetition_head_applies_the_bias_to_anchor_rows():
    gen = torch.Generator().manual_seed(5)
    frames, Tf, H, D, T, B = 3, 16, 2, 8, 7, 2
    n = frames * Tf
    g = BlockGeometry(n, 16, 16)
    anchors = torch.tensor([[2, 9, 13]])
    row_anchor = torch.randint(0, 3, (1, Tf), generator=gen)
    plan = RepetitionPlan(Tf, torch.tensor([[-1, 0]], dtype=torch.int32), anchors, row_anchor)
    layer = SkipLists.from_block_mask(torch.rand(1, H, g.nq, g.nk, generator=gen) < 0.4, g, plan).layer(0)
    q, k, v = (torch.randn(B, H, n + T, D, generator=gen) for _ in range(3))
    bias = padded_bias(B, T, gen, shared=False)
    out = sparse_attention_reference(q, k, v, layer, text_bias=bias)
    dense = masked_sdpa64(q, k, v, bias, n)  # anchors attend every key, with the bias
    rows = (torch.arange(frames)[:, None] * Tf + anchors[0][row_anchor[0]][None, :]).reshape(-1)
    assert rel(out[:, 1, :n], dense[:, 1, rows]) < 1e-5
    assert rel(out[:, 1, n:], dense[:, 1, n:]) < 1e-5  # text rows dense, with the bias
    assert rel(out[:, 0], masked_sdpa64(q, k, v, bias, n, token_mask(layer, n, T))[:, 0]) < 1e-5


# ---- statistics ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shared", [True, False])
def test_block_energy_with_bias_matches_float64_masked_softmax(shared):
    gen = torch.Generator().manual_seed(7 + shared)
    B, H, n, T, D = 2, 2, 37, 10, 8
    g = BlockGeometry(n, 8, 16)
    q, k = (torch.randn(B, H, n + T, D, generator=gen) * 2 for _ in range(2))
    bias = padded_bias(B, T, gen, shared)
    init = torch.rand(H, g.nq, g.nk, generator=gen)
    out = block_energy(q, k, g, out=init.clone(), text_bias=bias)  # CPU: the reference
    want = block_energy64(q, k, bias, n, g)
    assert rel(out - init, want) < 1e-5
    assert rel(block_energy_reference(q, k, g), want) > 1e-3  # padding moves mass to the video blocks
    # the strided estimate takes the bias too: at stride 2 it stays close to the exact sums
    est = block_energy_reference(q, k, g, row_stride=2, text_bias=bias)
    assert rel(est.sum(-1), want.sum(-1)) < 0.2


# ---- runner --------------------------------------------------------------------------------------------------
def _full_bundle(H, n, mixed):
    grid = TokenGrid(frames=1, height=n // 8, width=8)
    g = BlockGeometry(n, 16, 16)
    m = torch.ones(2, H, g.nq, g.nk, dtype=torch.bool)
    if mixed:  # layer 1: head 0 keeps every block (dense route), the others one block a row (sparse)
        m[1, 1:] = False
    sig = ModelSignature("hunyuan", 2, H, 16, 16 * H)
    return MaskBundle.from_block_masks(sig, grid, g, [m], [1.0], [0]), grid


@pytest.mark.parametrize("layout", ["bhld", "bld"])
@pytest.mark.parametrize("route,cutoff", [("sparse", 1.0), ("dense", 0.0), ("mixed", 0.5), ("dense_step", 1.0)])
def test_runner_routes_apply_the_bias(layout, route, cutoff):
    gen = torch.Generator().manual_seed(17)
    B, H, n, T, D = 2, 3, 48, 13, 16
    bundle, grid = _full_bundle(H, n, route == "mixed")
    runner = SparseRunner(bundle, dense_cutoff=cutoff, dense_first=0.5 if route == "dense_step" else 0.0)
    runner.begin_step(1.0, "cpu", step_fraction=0.0)
    layer = 1
    if route != "dense_step":
        assert runner.route(layer) == route
    q, k, v = (torch.randn(B, H, n + T, D, generator=gen) for _ in range(3))
    bias = padded_bias(B, T, gen, shared=False)
    call = AttentionCall(*(to_layout(t, layout) for t in (q, k, v)), layout=layout, heads=H, layer=layer,
                         sigma=1.0, grid=TokenGrid(1, n // 8, 8, text_tokens=T, text_position="end"),
                         text_bias=bias)
    out = from_layout(runner(call), layout, H)
    want = masked_sdpa64(q, k, v, bias, n)
    if route == "mixed":  # head 0 dense, heads 1.. follow their (one block a row) skip lists
        sparse = sparse_attention_reference(q, k, v, bundle.skip_lists(0).layer(layer), text_bias=bias)
        assert rel(out[:, 0], want[:, 0]) < 1e-5
        assert rel(out[:, 1:], sparse[:, 1:]) < 1e-6
        assert rel(out[:, 1:], want[:, 1:]) > 1e-2
    else:
        assert rel(out, want) < 1e-5


def test_dense_attention_with_bias():
    gen = torch.Generator().manual_seed(23)
    q, k, v = (torch.randn(2, 2, 30, 8, generator=gen) for _ in range(3))
    bias = padded_bias(2, 6, gen, shared=True)
    assert rel(dense_attention(q, k, v, text_bias=bias), masked_sdpa64(q, k, v, bias, 24)) < 1e-5
    with pytest.raises(ValueError, match="only 30"):
        dense_attention(q, k, v, text_bias=torch.zeros(31))


# ---- ComfyUI router ------------------------------------------------------------------------------------------
HUNYUAN = {"image_model": "hunyuan_video", "num_layers": 3, "num_heads": 2, "dim": 32, "depth": 2,
           "patch_size": (1, 2, 2)}
LATENT = (2, 16, 2, 8, 8)  # -> 2 x 4 x 4 = 32 video tokens
SIGMAS = [1.0, 0.5, 0.0]


def hunyuan_router(density=1.1, seed=0):
    layout = mi.family_layout(HUNYUAN)
    sig = mi.signature_from_config(HUNYUAN)
    grid = mi.grid_from_latent(layout, LATENT)
    g = BlockGeometry(grid.video_tokens, 8, 8)
    gen = torch.Generator().manual_seed(seed)
    m = torch.rand(sig.num_layers, sig.num_heads, g.nq, g.nk, generator=gen) < density
    bundle = MaskBundle.from_block_masks(sig, grid, g, [m], SIGMAS[:-1], [0, 0])
    runner = SparseRunner(bundle, dense_cutoff=1.0)
    router = AttentionRouter(sig, layout, HUNYUAN, handler=runner, step_hook=runner.begin_step)
    router.begin_sampling(LATENT, SIGMAS)
    return router, bundle


def hunyuan_mask(T, padded, dtype=torch.float32, video=32):
    """(1, 1, L) as HunyuanVideo's forward builds it: 0 on image tokens, (txt_mask - 1) * finfo.max on text."""
    txt_mask = torch.ones(1, T)
    txt_mask[:, T - padded:] = 0
    m = torch.zeros(1, 1, video + T, dtype=dtype)
    m[:, 0, video:] = ((txt_mask - 1) * torch.finfo(dtype).max).to(dtype)
    return m


def test_hunyuan_mask_is_routed_and_matches_masked_dense():
    router, _ = hunyuan_router()
    router.begin_model_call(1.0, [0, 1], 2, "cpu")
    gen = torch.Generator().manual_seed(31)
    T = 9
    q, k, v = (torch.randn(2, 2, 32 + T, 16, generator=gen) for _ in range(3))
    mask = hunyuan_mask(T, 4)
    out = router(comfy_attention, q, k, v, 2, mask=mask, skip_reshape=True, skip_output_reshape=True,
                 transformer_options={LAYER_KEY: 1})
    assert (router.routed, router.passed) == (1, 0)
    want = comfy_attention(q, k, v, 2, mask=mask, skip_reshape=True, skip_output_reshape=True)
    assert rel(out, want) < 1e-5
    assert rel(out, comfy_attention(q, k, v, 2, skip_reshape=True, skip_output_reshape=True)) > 1e-2
    # the same again with a boolean mask (True = attend) and the 4-D and 1-D forms
    for m in (mask == 0, mask[:, None], mask[0, 0]):
        out2 = router(comfy_attention, q, k, v, 2, mask=m, skip_reshape=True, skip_output_reshape=True,
                      transformer_options={LAYER_KEY: 1})
        assert rel(out2, want) < 1e-5
    assert router.routed == 4


def test_hunyuan_per_batch_mask_follows_the_sparse_reference():
    router, bundle = hunyuan_router(density=0.4, seed=2)
    router.begin_model_call(0.5, None, 2, "cpu")
    gen = torch.Generator().manual_seed(37)
    T = 6
    q, k, v = (torch.randn(2, 2, 32 + T, 16, generator=gen) for _ in range(3))
    mask = torch.cat([hunyuan_mask(T, 1), hunyuan_mask(T, 3)])  # (2, 1, L): each prompt its own padding
    out = router(comfy_attention, q, k, v, 2, mask=mask, skip_reshape=True, skip_output_reshape=True,
                 transformer_options={LAYER_KEY: 2})
    assert router.routed == 1
    skip = bundle.skip_lists(bundle.bucket_for_sigma(0.5)).layer(2)
    want = sparse_attention_reference(q, k, v, skip, text_bias=mask[:, 0, 32:])
    assert rel(out, want) < 1e-6


def test_mask_with_video_part_runs_dense_and_warns_once(caplog):
    router, _ = hunyuan_router()
    router.begin_model_call(1.0, None, 1, "cpu")
    gen = torch.Generator().manual_seed(41)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=gen) for _ in range(3))
    mask = hunyuan_mask(8, 2)
    mask[0, 0, 5] = -1.0  # a video key masked: not a text-padding mask
    with caplog.at_level(logging.WARNING, logger="calibatt"):
        for _ in range(2):
            out = router(comfy_attention, q, k, v, 2, mask=mask, skip_reshape=True,
                         transformer_options={LAYER_KEY: 0})
            assert torch.equal(out, comfy_attention(q, k, v, 2, mask=mask, skip_reshape=True))
    assert (router.routed, router.passed) == (0, 2)
    assert sum("not zero on the video tokens" in r.getMessage() for r in caplog.records) == 1
    # a new sampling run checks again
    router.begin_sampling(LATENT, SIGMAS)
    router.begin_model_call(1.0, None, 1, "cpu")
    router(comfy_attention, q, k, v, 2, mask=hunyuan_mask(8, 2), skip_reshape=True, transformer_options={LAYER_KEY: 0})
    assert router.routed == 1


def test_other_masks_run_dense(caplog):
    router, _ = hunyuan_router()
    router.begin_model_call(1.0, None, 2, "cpu")
    gen = torch.Generator().manual_seed(43)
    q, k, v = (torch.randn(2, 2, 40, 16, generator=gen) for _ in range(3))
    masks = [torch.zeros(40, 40),  # a full (Lq, Lk) mask
             torch.zeros(2, 40),  # (B, L) 2-D: ComfyUI reads it as (Lq, Lk)
             torch.zeros(3, 1, 40),  # batch mismatch
             torch.zeros(1, 2, 1, 40),  # per-head
             torch.zeros(1, 1, 39)]  # wrong key count
    with caplog.at_level(logging.WARNING, logger="calibatt"):
        for m in masks:
            try:
                want = comfy_attention(q, k, v, 2, mask=m, skip_reshape=True)
            except RuntimeError:
                want = None  # SDPA refuses it too; the router must still hand it to the backend untouched
            try:
                out = router(comfy_attention, q, k, v, 2, mask=m, skip_reshape=True,
                             transformer_options={LAYER_KEY: 0})
            except RuntimeError:
                assert want is None
                continue
            assert torch.equal(out, want)
    assert router.routed == 0 and router.passed == len(masks)
    assert sum("not a key-padding mask" in r.getMessage() for r in caplog.records) == 1


def test_key_padding_bias_shapes():
    L = 5
    base = torch.tensor([0.0, 0.0, 0.0, -2.0, NEG])
    for m in (base, base[None], base[None, None], base[None, None, None]):
        assert torch.equal(key_padding_bias(m, L, 2), base[None])
    per = torch.stack([base, base.flip(0)])[:, None]
    assert key_padding_bias(per, L, 2).shape == (2, L)
    assert key_padding_bias(per, L, 3) is None
    assert key_padding_bias(torch.ones(L, dtype=torch.long), L, 1) is None
    assert key_padding_bias(torch.zeros(1, L, L), L, 1) is None


def test_mask_converted_once_per_evaluation_under_inference_mode():
    """Every block of one evaluation gets the same mask object: it is converted once (ComfyUI samples under
    inference_mode, whose tensors have no version counter); a new evaluation converts its own mask."""
    router, _ = hunyuan_router()
    seen = []
    inner = router.handler
    router.handler = lambda call: (seen.append(call.text_bias), inner(call))[1]
    gen = torch.Generator().manual_seed(47)
    with torch.inference_mode():
        q, k, v = (torch.randn(1, 2, 40, 16, generator=gen) for _ in range(3))
        for step in range(2):
            router.begin_model_call(1.0 - 0.5 * step, None, 1, "cpu")
            mask = hunyuan_mask(8, 2 + step)
            for layer in range(3):
                router(comfy_attention, q, k, v, 2, mask=mask, skip_reshape=True,
                       transformer_options={LAYER_KEY: layer})
            router.end_model_call()
    assert router.routed == 6 and len(seen) == 6
    assert len({t.data_ptr() for t in seen[:3]}) == 1 and seen[3].data_ptr() != seen[0].data_ptr()
    assert torch.equal(seen[0], hunyuan_mask(8, 2)[0, :, 32:]) and torch.equal(seen[3], hunyuan_mask(8, 3)[0, :, 32:])


# ---- calibration statistics ----------------------------------------------------------------------------------
def _calibrate_with(mode):
    """Two prompts through Calibrator.observe, CFG-style (negative row 0, positive row 1) with 11 text tokens of
    which the positive prompt pads the last 7 and the negative the last 3. mode 'bias': the padding as a per-batch
    text bias; 'crop': the positive row alone with its padded text keys removed; 'ignore': no bias at all."""
    from calibatt.calibration import CalibrationSettings, Calibrator
    from synthetic import planted_layer
    video = TokenGrid(2, 4, 8)
    Nv, T, keep = video.video_tokens, 11, 4
    cal = Calibrator(ModelSignature("hunyuan", 1, 2, 16, 32), video,
                     CalibrationSettings(block_q=16, block_k=16, stats_row_stride=1), background=False)
    sigmas = [5.0, 1.0]
    grid = TokenGrid(2, 4, 8, text_tokens=T, text_position="end")
    bias = torch.zeros(2, T)
    bias[0, 8:] = NEG
    bias[1, keep:] = NEG
    for prompt in range(2):
        cal.begin_prompt(sample_sigmas=sigmas)
        for s in sigmas:
            rows = [planted_layer(grid, ["local", "global"], 16, prompt=prompt * 10 + r, layer=0, sigma=s)
                    for r in range(2)]
            q, k, v = (torch.cat(t) for t in zip(*rows))
            # text keys that draw real attention, so that padding them moves the video blocks' share
            k[:, :, Nv:] += 1.5 * q[:, :, :Nv].mean(2, keepdim=True)
            if mode == "crop":
                q, k, v = (t[1:, :, :Nv + keep] for t in (q, k, v))
                g = TokenGrid(2, 4, 8, text_tokens=keep, text_position="end")
                call = AttentionCall(q, k, v, "bhld", 2, 0, s, g, scale=1.0,
                                     dense=lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, scale=1.0))
            else:
                tb = bias if mode == "bias" else None
                full = torch.cat([torch.zeros(2, Nv), bias], -1)[:, None, None, :]
                call = AttentionCall(q, k, v, "bhld", 2, 0, s, grid, positive_rows=[1], scale=1.0, text_bias=tb,
                                     dense=lambda q=q, k=k, v=v, m=full: F.scaled_dot_product_attention(
                                         q, k, v, attn_mask=m, scale=1.0))
            cal.observe(call)
        cal.end_prompt()
    return cal.state()


def test_calibrator_statistics_exclude_padded_text_keys():
    """Padding text keys through the bias gives the statistics of the prompt with those keys removed."""
    biased, cropped, ignored = (_calibrate_with(m) for m in ("bias", "crop", "ignore"))
    assert len(cropped.counts) == 2 and biased.num_prompts == cropped.num_prompts == 2
    same = different = 0
    for key in cropped.counts:
        assert torch.equal(torch.as_tensor(biased.get_counts(*key)), torch.as_tensor(cropped.get_counts(*key))), key
    for x, y, z in zip(biased.drop, cropped.drop, ignored.drop):
        assert torch.allclose(x.double(), y.double(), rtol=1e-4, atol=1e-6)
        same += 1
        different += not torch.allclose(x.double(), z.double(), rtol=1e-3, atol=1e-4)
    assert same > 0 and different > 0
    assert any(not torch.equal(torch.as_tensor(ignored.get_counts(*key)), torch.as_tensor(cropped.get_counts(*key)))
               for key in cropped.counts)
