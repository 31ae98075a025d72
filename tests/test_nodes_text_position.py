"""Where the text of a joint-attention call sits: the router reads it from the host (no ComfyUI here).

ComfyUI 0.3.x's HunyuanVideo puts the text after the video, 0.19+ before it; the router establishes the order per
call from ComfyUI's img_slice, the key-padding mask's layout or the RoPE table the blocks share (Mochi: its
family code), and runs a call dense with one warning when it cannot. Each source is exercised in both orders with
the tensors the host would hand over (the RoPE table is built here from token ids with the standard rotary formula,
the masks as HunyuanVideo builds them), and the routed call must carry the right grid and text bias.
"""

import logging

import pytest
import torch

from calibatt.kernels.attention.naive import sparse_attention_reference
from calibatt.kernels.runner import SparseRunner
from calibatt.masks import BlockGeometry, MaskBundle
from calibatt.nodes import model_info as mi
from calibatt.nodes.routing import (CALLS_KEY, LAYER_KEY, AttentionRouter, rope_text_position,
                                    slice_text_position)
from helpers_core import NEG, comfy_attention, rel

HUNYUAN = {"image_model": "hunyuan_video", "num_layers": 3, "num_heads": 2, "dim": 32, "depth": 2,
           "patch_size": (1, 2, 2)}
LATENT = (2, 16, 2, 8, 8)  # -> 2 x 4 x 4 = 32 video tokens
V = 32
SIGMAS = [1.0, 0.5, 0.0]
AXES = (4, 6, 6)  # RoPE axes (t, h, w) of head_dim 16


def make_router(density=0.4, seed=0, record=None):
    """A HunyuanVideo router with a real SparseRunner (cutoff 1: every routed call takes the sparse path); record
    (a list) receives every AttentionCall the handler gets."""
    layout, sig = mi.family_layout(HUNYUAN), mi.signature_from_config(HUNYUAN)
    grid = mi.grid_from_latent(layout, LATENT)
    g = BlockGeometry(grid.video_tokens, 8, 8)
    gen = torch.Generator().manual_seed(seed)
    m = torch.rand(sig.num_layers, sig.num_heads, g.nq, g.nk, generator=gen) < density
    m |= torch.eye(g.nq, dtype=torch.bool)
    bundle = MaskBundle.from_block_masks(sig, grid, g, [m], SIGMAS[:-1], [0, 0])
    runner = SparseRunner(bundle, dense_cutoff=1.0)

    def handler(call):
        if record is not None:
            record.append(call)
        return runner(call)

    router = AttentionRouter(sig, layout, HUNYUAN, handler=handler, step_hook=runner.begin_step)
    router.begin_sampling(LATENT, SIGMAS)
    router.begin_model_call(1.0, None, 1, "cpu")
    return router, bundle


def video_ids():
    t, h, w = torch.meshgrid(torch.arange(2), torch.arange(4), torch.arange(4), indexing="ij")
    return torch.stack([t, h, w], -1).reshape(1, V, 3).float()


def rope_table(ids, axes=AXES, theta=256.0):
    """(B, 1, L, D/2, 2, 2) rotations [[cos, -sin], [sin, cos]] of each token id and frequency (the standard
    rotary formula, frequencies theta^(-2i/d) per axis, concatenated over the axes)."""
    parts = []
    for i, d in enumerate(axes):
        omega = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        a = ids[..., i].double()[..., None] * omega  # (B, L, d/2)
        parts.append(torch.stack([a.cos(), -a.sin(), a.sin(), a.cos()], -1).reshape(*a.shape, 2, 2))
    return torch.cat(parts, dim=-3).float()[:, None]


def joint_ids(T, position):
    text = torch.zeros(1, T, 3)
    return torch.cat([text, video_ids()] if position == "start" else [video_ids(), text], dim=1)


def hunyuan_mask(T, padded, position):
    """(1, 1, L) as HunyuanVideo builds it: zeros on the video keys, (txt_mask - 1) * finfo.max on the text."""
    m = torch.zeros(1, 1, V + T)
    txt = torch.zeros(T)
    txt[T - padded:] = torch.finfo(torch.float32).min
    if position == "start":
        m[0, 0, :T] = txt
    else:
        m[0, 0, V:] = txt
    return m


def qkv(T, seed, B=1):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, 2, V + T, 16, generator=gen) for _ in range(3))


def reference(q, k, v, skip, T, position, bias=None):
    """The sparse specification with the masks on the video tokens wherever they sit: move the video first (the
    reference's own order), attend, move back."""
    if position == "start":
        perm = torch.cat([torch.arange(T, T + V), torch.arange(T)])
    else:
        perm = torch.arange(V + T)
    out = sparse_attention_reference(*(t[:, :, perm] for t in (q, k, v)), skip, text_bias=bias)
    return out[:, :, torch.argsort(perm)]


def route(router, q, k, v, mask=None, **to):
    return router(comfy_attention, q, k, v, 2, mask=mask, skip_reshape=True, skip_output_reshape=True,
                  transformer_options=to)


class CountReads:
    """Counts host reads of small device results (the router reads its layout facts with Tensor.tolist)."""

    def __enter__(self):
        self.reads, self.real = [], torch.Tensor.tolist
        real, reads = self.real, self.reads
        torch.Tensor.tolist = lambda t: (reads.append(tuple(t.shape)), real(t))[1]
        return self.reads

    def __exit__(self, *exc):
        torch.Tensor.tolist = self.real


# --------------------------------------------------------------------------------------------- the sources
@pytest.mark.parametrize("position", ["start", "end"])
def test_img_slice_places_the_text(position):
    """Newer ComfyUI's single blocks carry img_slice = [text, total]: the video is [a, b)."""
    seen = []
    router, bundle = make_router(record=seen)
    T = 7
    q, k, v = qkv(T, 1)
    img_slice = [T, T + V] if position == "start" else [0, V]
    out = route(router, q, k, v, block_index=0, block_type="single", img_slice=img_slice)
    call = seen[-1]
    assert (call.layer, call.grid.text_position, call.grid.text_tokens) == (2, position, T)
    assert call.text_bias is None
    skip = bundle.skip_lists(0).layer(2)
    assert rel(out, reference(q, k, v, skip, T, position)) < 1e-5
    # the masks on the wrong tokens would give another output: the placement matters at this size
    other = "end" if position == "start" else "start"
    assert rel(out, reference(q, k, v, skip, T, other)) > 1e-2


@pytest.mark.parametrize("img_slice, reason", [
    ([3, 3 + V], "text on both sides of the video"),
    ([0, V - 1], "is not this latent's 32 video tokens"),
    ([7, 7 + V + 1], "is not this latent's 32 video tokens"),
    (None, "is not a pair of token indices"),
])
def test_an_img_slice_that_is_not_the_video_runs_dense_with_one_warning(img_slice, reason, caplog):
    router, _ = make_router()
    q, k, v = qkv(7, 2)
    with caplog.at_level(logging.WARNING, logger="calibatt"):
        for _ in range(2):
            out = route(router, q, k, v, block_index=0, block_type="single", img_slice=img_slice)
            assert torch.equal(out, comfy_attention(q, k, v, 2, skip_reshape=True, skip_output_reshape=True))
    assert (router.routed, router.passed) == (0, 2)
    assert [r.getMessage() for r in caplog.records if reason in r.getMessage()] == \
        [r.getMessage() for r in caplog.records]
    assert len(caplog.records) == 1


@pytest.mark.parametrize("position", ["start", "end"])
def test_padding_mask_places_the_text_and_gives_the_text_bias(position):
    """HunyuanVideo's padded prompt: the mask is zero on the video keys and marks the padded text keys; where its
    nonzero entries sit gives the order, and the text part becomes the call's text bias."""
    seen = []
    router, bundle = make_router(record=seen)
    T, padded = 9, 4
    q, k, v = qkv(T, 3)
    mask = hunyuan_mask(T, padded, position)
    out = route(router, q, k, v, mask=mask, block_index=1, block_type="double")
    call = seen[-1]
    text_part = mask[0, :, :T] if position == "start" else mask[0, :, V:]
    assert (call.grid.text_position, call.grid.text_tokens, call.layer) == (position, T, 1)
    assert torch.equal(call.text_bias, text_part)
    assert (call.text_bias != 0).sum() == padded
    skip = bundle.skip_lists(0).layer(1)
    assert rel(out, reference(q, k, v, skip, T, position, bias=text_part)) < 1e-5
    # the order holds for the whole sampling run: a later evaluation with another prompt length is placed alike
    router.end_model_call()
    router.begin_model_call(0.5, None, 1, "cpu")
    q2, k2, v2 = qkv(T + 3, 4)
    route(router, q2, k2, v2, mask=hunyuan_mask(T + 3, 2, position), block_index=0, block_type="double")
    assert (seen[-1].grid.text_position, seen[-1].grid.text_tokens) == (position, T + 3)
    assert router.routed == 2


def test_the_mask_order_is_read_once_per_sampling_run():
    """The mask is read on the first masked call of a run (one host read); a new run reads again."""
    seen = []
    router, _ = make_router(record=seen)
    T = 6
    q, k, v = qkv(T, 5)
    with CountReads() as reads:
        for layer in range(3):
            route(router, q, k, v, mask=hunyuan_mask(T, 2, "start"), **{LAYER_KEY: layer})
        router.end_model_call()
        router.end_sampling()
        router.begin_sampling(LATENT, SIGMAS)
        router.begin_model_call(1.0, None, 1, "cpu")
        route(router, q, k, v, mask=hunyuan_mask(T, 2, "end"), **{LAYER_KEY: 0})
    assert reads == [(2,), (2,)]  # two flags per run, nothing per call
    assert [c.grid.text_position for c in seen] == ["start"] * 3 + ["end"]


@pytest.mark.parametrize("position", ["start", "end"])
def test_rope_table_places_the_text_when_nothing_else_does(position):
    """Newer ComfyUI's double blocks with an unpadded prompt carry neither img_slice nor a mask; the RoPE table
    our block patch sees (computed from cat(text ids, video ids) or the reverse; text ids are zero) does."""
    seen = []
    router, bundle = make_router(record=seen)
    T = 5
    router.note_block({"img": None, "txt": None, "pe": rope_table(joint_ids(T, position))})
    q, k, v = qkv(T, 6)
    out = route(router, q, k, v, block_index=0, block_type="double")
    assert (seen[-1].grid.text_position, seen[-1].grid.text_tokens) == (position, T)
    skip = bundle.skip_lists(0).layer(0)
    assert rel(out, reference(q, k, v, skip, T, position)) < 1e-5
    # a zero mask (an encoder that sends all-ones) marks nothing: the RoPE table still decides
    route(router, q, k, v, mask=torch.zeros(1, 1, V + T), block_index=1, block_type="double")
    assert seen[-1].grid.text_position == position and router.routed == 2


def test_rope_text_position_reads_the_identity_rows():
    for T in (1, 2, 5, 40):
        for position in ("start", "end"):
            assert rope_text_position(rope_table(joint_ids(T, position)), V) == (position, ""), (T, position)
    # shifted positions (video token 0 not at the origin) change nothing
    ids = joint_ids(5, "start")
    ids[:, 5:] += torch.tensor([0.0, 1.0, 1.0])
    assert rope_text_position(rope_table(ids), V)[0] == "start"
    pos, why = rope_text_position(rope_table(video_ids()), V)
    assert pos is None and "no text" in why
    ids = joint_ids(5, "start")
    ids[:, 2] = 3.0  # a "text" row with a position: no clean zero-id block on either side
    pos, why = rope_text_position(rope_table(ids), V)
    assert pos is None and "does not show 5 text tokens" in why
    pos, why = rope_text_position(torch.zeros(V + 5, 8), V)
    assert pos is None and "(B, 1, L, D/2, 2, 2)" in why


def test_rope_is_read_once_per_run_and_only_when_needed():
    seen = []
    router, _ = make_router(record=seen)
    T = 4
    q, k, v = qkv(T, 7)
    with CountReads() as reads:
        # img_slice places this call; the RoPE table noted before it is not read
        router.note_block({"pe": rope_table(joint_ids(T, "start"))})
        route(router, q, k, v, block_index=0, block_type="single", img_slice=[T, T + V])
    assert reads == [] and seen[-1].grid.text_position == "start"

    router, _ = make_router(record=seen)
    with CountReads() as reads:
        for step in range(2):
            for layer in range(3):
                router.note_block({"pe": rope_table(joint_ids(T, "start"))})
                route(router, q, k, v, **{LAYER_KEY: layer})
            router.end_model_call()
            router.begin_model_call(0.5, None, 1, "cpu")
    assert reads == [(2,)]  # one read of two flags for the whole run
    assert router.routed == 6 and all(c.grid.text_position == "start" for c in seen[-6:])


def test_sources_that_disagree_run_dense_with_one_warning(caplog):
    router, _ = make_router()
    T = 4
    q, k, v = qkv(T, 8)
    router.note_block({"pe": rope_table(joint_ids(T, "start"))})
    with caplog.at_level(logging.WARNING, logger="calibatt"):
        route(router, q, k, v, block_index=0, block_type="double")  # RoPE: text first (read, routed)
        for _ in range(2):  # img_slice: text last -> disagrees with the RoPE table of this run
            out = route(router, q, k, v, block_index=0, block_type="single", img_slice=[0, V])
            assert torch.equal(out, comfy_attention(q, k, v, 2, skip_reshape=True, skip_output_reshape=True))
        # a mask whose padding sits after the video also disagrees
        route(router, q, k, v, mask=hunyuan_mask(T, 2, "end"), block_index=1, block_type="double")
    assert (router.routed, router.passed) == (1, 3)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1, msgs
    assert "ComfyUI's img_slice says text last" in msgs[0] and "the RoPE table says text first" in msgs[0]


def test_a_call_whose_layout_cannot_be_established_runs_dense_with_one_warning(caplog):
    """No img_slice, no mask, no RoPE table (or one it cannot read): the call runs dense, never routed with a
    guess, and one warning names the reason."""
    router, _ = make_router()
    T = 6
    q, k, v = qkv(T, 9)
    dense = comfy_attention(q, k, v, 2, skip_reshape=True, skip_output_reshape=True)
    with caplog.at_level(logging.WARNING, logger="calibatt"):
        for layer in range(3):
            assert torch.equal(route(router, q, k, v, **{LAYER_KEY: layer, CALLS_KEY: [0]}), dense)
    assert (router.routed, router.passed) == (0, 3)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "cannot tell where the 6 text tokens of a 38-token self-attention call sit" in msgs[0]
    assert "the blocks hand over no RoPE table" in msgs[0]

    router, _ = make_router()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="calibatt"):
        for _ in range(2):
            router.note_block({"pe": torch.zeros(1, V + T, 8)})  # not a rotation table
            assert torch.equal(route(router, q, k, v, **{LAYER_KEY: 0}), dense)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "is not the (B, 1, L, D/2, 2, 2) table" in msgs[0]


def test_a_mask_on_the_video_in_either_order_runs_dense():
    router, _ = make_router()
    T = 6
    q, k, v = qkv(T, 10)
    mask = hunyuan_mask(T, 2, "end")
    mask[0, 0, 3] = NEG  # a video key masked if the text is last; and the padding is on the video if it is first
    out = route(router, q, k, v, mask=mask, block_index=0, block_type="double")
    assert torch.equal(out, comfy_attention(q, k, v, 2, mask=mask, skip_reshape=True, skip_output_reshape=True))
    assert router.routed == 0


def test_mochi_text_position_comes_from_its_family_code():
    """Mochi hands its blocks no mask, img_slice or joint RoPE table; its code (the same in every ComfyUI with
    Mochi) puts the cropped text after the video."""
    cfg = {"image_model": "mochi_preview", "num_layers": 2, "num_heads": 2, "dim": 32, "depth": 2}
    layout = mi.family_layout(cfg)
    assert layout.text_position == "end" and mi.family_layout(HUNYUAN).text_position is None
    seen = []
    router = AttentionRouter(mi.signature_from_config(cfg), layout, cfg,
                             handler=lambda call: (seen.append(call), call.dense())[1])
    router.begin_sampling((1, 12, 2, 8, 8), SIGMAS)
    router.begin_model_call(1.0, None, 1, "cpu")
    q, k, v = qkv(3, 11)
    route(router, q, k, v, **{LAYER_KEY: 1})
    assert (seen[-1].grid.text_position, seen[-1].grid.text_tokens) == ("end", 3)


def test_slice_text_position():
    assert slice_text_position([5, 5 + V], V + 5, V) == ("start", "")
    assert slice_text_position((0, V), V + 5, V) == ("end", "")


# --------------------------------------------------------------------------------------------- the layer index
def test_host_block_index_is_used_and_checked_against_ours(caplog):
    seen = []
    router, _ = make_router(record=seen)
    q, k, v = qkv(0, 12)
    route(router, q, k, v, block_index=0, block_type="single")  # HunyuanVideo: single blocks after 2 doubles
    route(router, q, k, v, **{"block_index": 1, "block_type": "double", LAYER_KEY: 1})
    route(router, q, k, v, **{LAYER_KEY: 2})  # ComfyUI 0.3.x: ours only
    assert [c.layer for c in seen] == [2, 1, 2]
    with caplog.at_level(logging.WARNING, logger="calibatt"):
        out = route(router, q, k, v, **{"block_index": 0, "block_type": "double", LAYER_KEY: 2})
    assert torch.equal(out, comfy_attention(q, k, v, 2, skip_reshape=True, skip_output_reshape=True))
    assert "ComfyUI's block_index says layer 0, the block being run is layer 2" in caplog.text
