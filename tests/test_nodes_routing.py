"""The attention override's routing, with a real SparseRunner and a ComfyUI-style dense backend (no ComfyUI)."""

import copy
import math

import pytest
import torch

from calibatt.kernels.attention.naive import sparse_attention_reference
from calibatt.kernels.runner import SparseRunner
from calibatt.masks import BlockGeometry, MaskBundle
from calibatt.nodes import model_info as mi
from calibatt.masks.sigmas import schedule_steps
from calibatt.nodes.routing import CALLS_KEY, LAYER_KEY, AttentionRouter, positive_rows
from helpers_core import comfy_attention

WAN = {"image_model": "wan2.1", "model_type": "t2v", "dim": 64, "num_heads": 2, "num_layers": 3, "in_dim": 16}
MOCHI = {"image_model": "mochi_preview", "num_layers": 3, "num_heads": 2, "dim": 64, "depth": 3}
LATENT = (2, 16, 2, 6, 8)  # -> 2 x 3 x 4 = 24 tokens
SIGMAS = [1.0, 0.75, 0.5, 0.25, 0.0]


def make_bundle(cfg, density, seed=0, block=4):
    layout = mi.family_layout(cfg)
    sig = mi.signature_from_config(cfg)
    grid = mi.grid_from_latent(layout, LATENT)
    g = BlockGeometry(grid.video_tokens, block, block)
    gen = torch.Generator().manual_seed(seed)
    buckets = [torch.rand(sig.num_layers, sig.num_heads, g.nq, g.nk, generator=gen) < density for _ in range(2)]
    return MaskBundle.from_block_masks(sig, grid, g, buckets, SIGMAS[:-1], [0, 0, 1, 1])


def make_router(cfg, bundle, **runner_kw):
    runner = SparseRunner(bundle, **runner_kw)
    router = AttentionRouter(mi.signature_from_config(cfg), mi.family_layout(cfg), cfg, handler=runner,
                             step_hook=runner.begin_step)
    router.begin_sampling(LATENT, SIGMAS)
    return router


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_self_attention_follows_the_bundle_and_cross_attention_stays_dense():
    bundle = make_bundle(WAN, 0.4)
    router = make_router(WAN, bundle)
    router.begin_model_call(0.74, [0, 1], 2, "cpu")
    q, k, v = (rand(2, 24, 64, seed=s) for s in (1, 2, 3))
    out = router(comfy_attention, q, k, v, heads=2, transformer_options={LAYER_KEY: 1})
    skip = bundle.skip_lists(bundle.bucket_for_sigma(0.74)).layer(1)
    want = sparse_attention_reference(q, k, v, skip, layout="bld", heads=2)
    assert out.shape == (2, 24, 64)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, comfy_attention(q, k, v, 2), atol=1e-3)  # really sparse
    # Cross-attention (512 text keys): the dense backend, untouched.
    kc, vc = rand(2, 512, 64, seed=4), rand(2, 512, 64, seed=5)
    torch.testing.assert_close(router(comfy_attention, q, kc, vc, heads=2, transformer_options={LAYER_KEY: 1}),
                               comfy_attention(q, kc, vc, 2), rtol=0, atol=0)
    assert (router.routed, router.passed) == (1, 1)


def test_full_bundle_matches_the_dense_backend():
    router = make_router(WAN, make_bundle(WAN, 1.1))
    router.begin_model_call(1.0, None, 2, "cpu")
    q, k, v = (rand(2, 24, 64, seed=s) for s in (6, 7, 8))
    out = router(comfy_attention, q, k, v, heads=2, transformer_options={LAYER_KEY: 0})
    torch.testing.assert_close(out, comfy_attention(q, k, v, 2), rtol=1e-5, atol=1e-6)


def test_only_the_first_attention_of_a_block_is_self_attention():
    """A cross-attention whose text has exactly as many tokens as the video must not be taken for self-attention."""
    router = make_router(WAN, make_bundle(WAN, 0.3))
    router.begin_model_call(0.5, None, 1, "cpu")
    to = {LAYER_KEY: 0, CALLS_KEY: [0]}  # what our per-block patch hands each block
    q, k, v = (rand(1, 24, 64, seed=s) for s in (30, 31, 32))
    self_out = router(comfy_attention, q, k, v, heads=2, transformer_options=to)
    kt, vt = rand(1, 24, 64, seed=33), rand(1, 24, 64, seed=34)  # 24 "text" tokens
    cross_out = router(comfy_attention, q, kt, vt, heads=2, transformer_options=to)
    assert not torch.equal(self_out, comfy_attention(q, k, v, 2))
    assert torch.equal(cross_out, comfy_attention(q, kt, vt, 2))
    assert (router.routed, router.passed) == (1, 1)


def test_calls_outside_sampling_or_without_a_layer_fall_through():
    bundle = make_bundle(WAN, 0.3)
    router = make_router(WAN, bundle)
    q, k, v = (rand(1, 24, 64, seed=s) for s in (9, 10, 11))
    dense = comfy_attention(q, k, v, 2)
    assert torch.equal(router(comfy_attention, q, k, v, heads=2, transformer_options={LAYER_KEY: 0}), dense)
    router.begin_model_call(0.5, None, 1, "cpu")
    assert torch.equal(router(comfy_attention, q, k, v, heads=2, transformer_options={}), dense)
    assert torch.equal(router(comfy_attention, q, k, v, heads=2, transformer_options={LAYER_KEY: 7}), dense)
    mask = torch.zeros(1, 1, 24)
    assert torch.equal(router(comfy_attention, q, k, v, heads=2, mask=mask, transformer_options={LAYER_KEY: 0}),
                       comfy_attention(q, k, v, 2, mask=mask))
    # A sequence with extra (reference) tokens on a model without joint text attention runs dense too.
    q2, k2, v2 = (rand(1, 30, 64, seed=s) for s in (12, 13, 14))
    assert torch.equal(router(comfy_attention, q2, k2, v2, heads=2, transformer_options={LAYER_KEY: 0}),
                       comfy_attention(q2, k2, v2, 2))
    router.end_sampling()
    assert router.routed == 0


def test_newer_comfyui_block_index_and_containers():
    bundle = make_bundle(WAN, 0.4)
    router = make_router(WAN, bundle)
    router.begin_model_call(0.3, None, 1, "cpu")

    class Container:  # what newer ComfyUI hands around when wrap_attn has not unwrapped yet
        def __init__(self, t):
            self.t = t

        def take(self):
            return self.t

    q, k, v = (rand(1, 24, 64, seed=s) for s in (15, 16, 17))
    out = router(comfy_attention, Container(q), Container(k), Container(v), 2,
                 transformer_options={"block_index": 2, "block_type": "double"})
    skip = bundle.skip_lists(bundle.bucket_for_sigma(0.3)).layer(2)
    torch.testing.assert_close(out, sparse_attention_reference(q, k, v, skip, layout="bld", heads=2),
                               rtol=1e-5, atol=1e-6)


def test_joint_text_bhld_layout_and_output_reshape():
    bundle = make_bundle(MOCHI, 0.4)
    router = make_router(MOCHI, bundle)
    router.begin_model_call(0.9, [1, 0], 2, "cpu")
    seen = []
    inner = router.handler
    router.handler = lambda call: (seen.append(call), inner(call))[1]
    q, k, v = (rand(2, 2, 24 + 5, 32, seed=s) for s in (18, 19, 20))  # 5 text tokens after the video
    out = router(comfy_attention, q, k, v, 2, skip_reshape=True, transformer_options={LAYER_KEY: 0})
    call = seen[0]
    assert call.layout == "bhld" and call.grid.text_tokens == 5 and call.grid.video_tokens == 24
    assert list(call.positive_rows) == [1]
    skip = bundle.skip_lists(0).layer(0)
    want = sparse_attention_reference(q, k, v, skip)  # (B, H, L, D)
    assert out.shape == (2, 29, 64)  # ComfyUI's output layout without skip_output_reshape
    torch.testing.assert_close(out, want.transpose(1, 2).reshape(2, 29, 64), rtol=1e-5, atol=1e-6)
    out4 = router(comfy_attention, q, k, v, 2, skip_reshape=True, skip_output_reshape=True,
                  transformer_options={LAYER_KEY: 0})
    torch.testing.assert_close(out4, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sigma, dense", [(1.0, True), (0.75, False), (0.5, False), (0.25, True)])
def test_dense_first_and_last_steps(sigma, dense):
    router = make_router(WAN, make_bundle(WAN, 0.3), dense_first=0.25, dense_last=0.25)
    state = router.begin_model_call(sigma, None, 1, "cpu")
    assert state.step_fraction == pytest.approx(SIGMAS.index(sigma) / 4)
    q, k, v = (rand(1, 24, 64, seed=s) for s in (21, 22, 23))
    out = router(comfy_attention, q, k, v, heads=2, transformer_options={LAYER_KEY: 0})
    assert torch.equal(out, comfy_attention(q, k, v, 2)) == dense


def test_router_survives_model_option_deepcopies():
    router = make_router(WAN, make_bundle(WAN, 0.3))
    opts = {"transformer_options": {"optimized_attention_override": router}}
    assert copy.deepcopy(opts)["transformer_options"]["optimized_attention_override"] is router


def test_step_and_row_helpers():
    assert schedule_steps([14.6, 5.0, 1.2, 0.03, 0.0]).index(1.19) == 2
    assert schedule_steps([1.0, 0.0]).index(0.0) == 0
    assert positive_rows([1, 0], 4) == [2, 3]
    assert positive_rows([0], 2) is None  # every row is positive
    assert positive_rows(None, 2) is None
    assert math.isclose(make_router(WAN, make_bundle(WAN, 0.3)).begin_model_call(0.5, None, 1, "cpu")
                        .step_fraction, 0.5)
