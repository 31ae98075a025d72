"""torch.compile of a model whose attention goes through the router: no graph break at our attention, one compile
for a whole sampling run (every step, sigma bucket, dense step and route), outputs equal to eager.

The model is a small transformer whose attention calls ComfyUI's override the way comfy/ldm/modules/attention.py's
`wrap_attn` does (transformer_options["optimized_attention_override"](func, *args, **kwargs)) and whose blocks tag
their transformer_options like our per-block patch. The per-step facts are set outside the compiled model, as
ComfyUI's APPLY_MODEL wrapper does. Each test runs twice: with dynamo's guards as they are (ComfyUI 0.3.x), and
with every guard under transformer_options dropped, which is what TorchCompileModel does since ComfyUI 0.4
(`guard_filter_fn=skip_torch_compile_dict`): stale state then runs silently instead of recompiling, so equality
with eager at every step is the check that nothing per-step was baked in.
"""

import dataclasses
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.backends.registry import lookup_backend
from torch._dynamo.utils import counters

from calibatt.kernels import ops
from calibatt.kernels.call import AttentionCall
from calibatt.kernels.runner import SparseRunner
from calibatt.masks import BlockGeometry, MaskBundle, RepetitionPlan
from calibatt.nodes import model_info as mi
from calibatt.nodes.routing import CALLS_KEY, LAYER_KEY, AttentionRouter
from helpers_core import comfy_attention, rel

pytestmark = pytest.mark.usefixtures("one_thread")

H, D = 3, 16
WAN = {"image_model": "wan2.1", "model_type": "t2v", "dim": H * D, "num_heads": H, "num_layers": 3, "in_dim": 16}
MOCHI = {"image_model": "mochi_preview", "num_layers": 3, "num_heads": H, "dim": H * D, "depth": 3}
# HunyuanVideo as ComfyUI 0.19 runs it: text before the video; which side the text is on is read from img_slice
HUNYUAN = {"image_model": "hunyuan_video", "num_layers": 3, "num_heads": H, "dim": H * D, "depth": 2,
           "patch_size": (1, 2, 2)}
# Wan: patch (1, 2, 2) -> 3 x 6 x 8 = 144 video tokens; Mochi: patch (1, 2, 2) as well
LATENT = (2, 16, 3, 12, 16)
SIGMAS = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]  # 5 steps
TEXT = 7  # joint-text tokens (Mochi-like model)
CUTOFF = 0.7  # the runner's dense cutoff in these tests (see make_bundle)
ROUTES = [["sparse", "mixed", "dense"], ["sparse", "sparse", "dense"], ["sparse", "mixed", "mixed"]]  # buckets 0-2


def comfyui_guard_filter(entries):
    """ComfyUI 0.19's TorchCompileModel (comfy_extras/nodes_torch_compile.py, skip_torch_compile_dict)."""
    return [("transformer_options" not in e.name) for e in entries]


def wrap_attn(func):
    """What ComfyUI's attention functions are wrapped in: the override gets the call when one is installed."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        to = kwargs.get("transformer_options", None)
        if to is not None and "optimized_attention_override" in to:
            return to["optimized_attention_override"](func, *args, **kwargs)
        return func(*args, **kwargs)
    return wrapper


attention = wrap_attn(comfy_attention)


class Block(torch.nn.Module):
    def __init__(self, index: int, dim: int, skip_reshape: bool, img_slice):
        super().__init__()
        self.index = index
        self.skip_reshape = skip_reshape
        self.img_slice = img_slice
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.ctx = torch.nn.Linear(dim, 2 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x, context, mask, transformer_options):
        to = dict(transformer_options)  # our per-block "dit" patch does this (nodes/comfy_glue.py _LayerTag)
        to[LAYER_KEY] = self.index
        to[CALLS_KEY] = [0]
        if self.img_slice is not None:  # what ComfyUI 0.19's HunyuanVideo single blocks put there
            to["img_slice"] = list(self.img_slice)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.skip_reshape:  # (B, H, L, D), as Wan/Hunyuan in newer ComfyUI pass it
            B, L, _ = q.shape
            q, k, v = (t.reshape(B, L, H, D).transpose(1, 2) for t in (q, k, v))
            a = attention(q, k, v, heads=H, mask=mask, skip_reshape=True, transformer_options=to)
        else:
            a = attention(q, k, v, heads=H, mask=mask, transformer_options=to)
        x = x + self.out(a)
        # cross-attention to a context of another length: passes through the router unchanged
        kc, vc = self.ctx(context).chunk(2, dim=-1)
        return x + attention(x, kc, vc, heads=H, transformer_options=to)


class TinyModel(torch.nn.Module):
    def __init__(self, layers=3, skip_reshape=False, img_slice=None):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block(i, H * D, skip_reshape, img_slice) for i in range(layers))

    def forward(self, x, context, mask=None, transformer_options={}):  # noqa: B006 - ComfyUI's signature
        for b in self.blocks:
            x = b(x, context, mask, transformer_options)
        return x


def _band(g, width, gen, extra=0.0):
    """[nq, nk] bool: a band of `width` key blocks around the diagonal plus random blocks (density `extra`)."""
    qi = torch.arange(g.nq)[:, None] * g.block_q / g.block_k
    ki = torch.arange(g.nk)[None, :]
    return ((ki - qi).abs() <= width) | (torch.rand(g.nq, g.nk, generator=gen) < extra)


def make_bundle(cfg, seed=0):
    """3 buckets (5 steps) whose per-layer row widths differ between buckets. Key-block densities: layer 0 below 0.6;
    layer 1 below 0.6 but head 2 at 0.75 in buckets 0 and 2; layer 2 at 0.85, head 0 at 0.31 in bucket 2. With the
    cutoff CUTOFF, layer 0 is sparse, layer 1 mixed, sparse, mixed and layer 2 dense, dense, mixed in buckets 0, 1, 2
    (none of the dense heads keeps every block, so running one sparse instead of dense changes the result).
    Repetitive heads in layers 0 and 1 of buckets 0 and 2 (a different count per bucket)."""
    layout, sig = mi.family_layout(cfg), mi.signature_from_config(cfg)
    grid = mi.grid_from_latent(layout, LATENT)
    g = BlockGeometry(grid.video_tokens, 16, 16)
    gen = torch.Generator().manual_seed(seed)
    buckets, plans = [], []
    for b in range(3):
        m = torch.zeros(sig.num_layers, sig.num_heads, g.nq, g.nk, dtype=torch.bool)
        for h in range(sig.num_heads):
            m[0, h] = _band(g, 1 + b % 2, gen, 0.1)
            m[1, h] = _band(g, 2 - b % 2, gen, 0.1)
            m[2, h] = _band(g, 5, gen)
        m[1, 2] = _band(g, 4 if b != 1 else 1, gen)
        if b == 2:
            m[2, 0] = _band(g, 1, gen)
        slot = torch.full((sig.num_layers, sig.num_heads), -1, dtype=torch.int32)
        if b != 1:
            slot[0, 0] = 0
            if b == 2:
                slot[0, 1] = 1
                slot[1, 0] = 1
        T = grid.frame_tokens
        anchors = torch.stack([torch.randperm(T, generator=gen)[:2] for _ in range(2)])
        row_anchor = torch.randint(0, 2, (2, T), generator=gen)
        buckets.append(m)
        plans.append(RepetitionPlan(T, slot, anchors, row_anchor))
    return MaskBundle.from_block_masks(sig, grid, g, buckets, SIGMAS[:-1], [0, 0, 1, 2, 2], repetition=plans)


def make_router(cfg, bundle, **runner_kw):
    runner = SparseRunner(bundle, **runner_kw)
    return AttentionRouter(mi.signature_from_config(cfg), mi.family_layout(cfg), cfg, handler=runner,
                           step_hook=runner.begin_step)


class CountingBackend:
    """A dynamo backend that records every graph it is handed (one per compile of a frame), then runs `inner`."""

    def __init__(self, inner="aot_eager"):
        self.inner = lookup_backend(inner)
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return self.inner(gm, example_inputs)

    def op_nodes(self):
        return [n for gm in self.graphs for n in gm.graph.nodes
                if n.op == "call_function" and "calibatt.sparse_attention" in str(n.target)]


def inputs(cfg, batch, device="cpu", dtype=torch.float32, seed=0):
    """(x, context, key-padding mask or None); text tokens after the video, or before it for HUNYUAN."""
    grid = mi.grid_from_latent(mi.family_layout(cfg), LATENT)
    joint = mi.family_layout(cfg).joint_text
    L = grid.video_tokens + (TEXT if joint else 0)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, L, H * D, generator=gen).to(device, dtype)
    context = torch.randn(batch, 11, H * D, generator=gen).to(device, dtype)
    mask = None
    if joint:
        # a key-padding mask over the joint sequence, zero on the video keys, the last two text keys padded
        mask = torch.zeros(batch, 1, 1, L)
        if text_first(cfg):
            mask[..., TEXT - 2:TEXT] = -torch.finfo(torch.bfloat16).max
        else:
            mask[..., -2:] = -torch.finfo(torch.bfloat16).max
        mask = mask.to(device, dtype)
    return x, context, mask


def text_first(cfg):
    return cfg is HUNYUAN


def img_slice(cfg):
    """[text, L) for the text-first model: the video part of its joint sequence."""
    if not text_first(cfg):
        return None
    video = mi.grid_from_latent(mi.family_layout(cfg), LATENT).video_tokens
    return (TEXT, TEXT + video)


def sample(router, model, compiled, x, context, mask, runs=2, device="cpu"):
    """Sampling runs as ComfyUI drives them: OUTER_SAMPLE (begin_sampling / runner.end) around APPLY_MODEL
    (begin_model_call / end_model_call) around the (compiled) diffusion model; -> the worst relative difference
    between compiled and eager over every step."""
    worst = 0.0
    to = {"optimized_attention_override": router}
    for run in range(runs):
        router.begin_sampling(LATENT, SIGMAS)
        for s in SIGMAS[:-1]:
            router.begin_model_call(s, [0, 1] if x.shape[0] == 2 else [0], x.shape[0], device)
            with torch.inference_mode():
                got = compiled(x, context, mask, transformer_options=to)  # compiled first: it traces fresh state
                want = model(x, context, mask, transformer_options=to)
            router.end_model_call()
            worst = max(worst, rel(got, want))
        router.end_sampling()
        router.handler.end()
    return worst


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("guard_filter", [False, True], ids=["comfyui-0.3", "comfyui-0.19-guard-filter"])
@pytest.mark.parametrize("cfg,skip_reshape", [(WAN, False), (WAN, True), (MOCHI, False), (HUNYUAN, True)],
                         ids=["wan-bld", "wan-bhld", "mochi-text-last-mask", "hunyuan-text-first-mask-img_slice"])
def test_compiled_model_matches_eager_with_one_graph_for_every_step_and_bucket(cfg, skip_reshape, guard_filter):
    bundle = make_bundle(cfg)
    # layer 0 sparse, layer 1 mixed (head 2 dense), layer 2 dense; the first step is a dense step
    router = make_router(cfg, bundle, dense_first=0.2, dense_cutoff=CUTOFF)
    torch.manual_seed(0)
    model = TinyModel(skip_reshape=skip_reshape, img_slice=img_slice(cfg)).eval()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True,
                             options={"guard_filter_fn": comfyui_guard_filter} if guard_filter else None)
    x, context, mask = inputs(cfg, 2)
    runs0 = ops.op_runs()
    worst = sample(router, model, compiled, x, context, mask)

    # the routes this bundle gives really occur, and change between buckets (else the test would not cover them)
    runner = router.handler
    assert [bundle.bucket_for_sigma(s) for s in SIGMAS[:-1]] == [0, 0, 1, 2, 2]
    assert [[runner.begin_step(s, "cpu") is not None and runner.route(l) for l in range(3)]
            for s in (SIGMAS[0], SIGMAS[2], SIGMAS[3])] == ROUTES
    runner.end()

    assert worst < 1e-5, worst
    assert len(backend.graphs) == 1  # one compile: 2 runs x 5 steps, 3 buckets, a dense step
    assert counters["graph_break"] == {}
    assert len(backend.op_nodes()) == 3  # one op per layer; cross-attention stays ordinary graph code
    assert ops.op_runs() - runs0 == 2 * 5 * 3  # every compiled step ran the op in every layer (counted there)
    assert router.routed == 2 * 5 * 3  # the eager model's calls; traced calls do not write the counter


def test_explain_reports_no_graph_break_and_the_op_in_the_graph():
    bundle = make_bundle(WAN)
    router = make_router(WAN, bundle)
    model = TinyModel().eval()
    x, context, _ = inputs(WAN, 1)
    router.begin_sampling(LATENT, SIGMAS)
    router.begin_model_call(SIGMAS[0], [0], 1, "cpu")
    with torch.inference_mode():
        ex = torch._dynamo.explain(model)(x, context, None, transformer_options={"optimized_attention_override":
                                                                                  router})
    router.end_model_call()
    router.end_sampling()
    router.handler.end()
    assert ex.graph_break_count == 0 and ex.graph_count == 1, ex.break_reasons
    assert str(ex.graphs[0].graph).count("calibatt.sparse_attention") == 3


def test_op_passes_opcheck():
    """torch.library.opcheck: schema, the fake (meta) implementation against the real one (shape, dtype, memory
    order), and the op under aot_autograd's dispatch with dynamic shapes."""
    bundle = make_bundle(MOCHI)
    runner = SparseRunner(bundle, dense_cutoff=CUTOFF)
    runner.begin_step(SIGMAS[3], "cpu")  # bucket 2: repetitive heads in layers 0 and 1, layer 1 and 2 mixed
    x, _, mask = inputs(MOCHI, 2)
    gen = torch.Generator().manual_seed(3)
    N = x.shape[1]
    q, k, v = (torch.randn(2, N, H, D, generator=gen).transpose(1, 2) for _ in range(3))  # a (B, L, H*D) call
    bias = mask[:, 0, 0, -TEXT:].float()
    for layer in range(3):
        args = (q, k, v, runner._handle, layer, bias, None, 0)
        torch.library.opcheck(ops.sparse_attention_op, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
        out = ops.sparse_attention_op(*args)
        assert out.stride() == torch.empty_like(q).stride()
        grid = dataclasses.replace(bundle.grid, text_tokens=TEXT, text_position="end")
        want = runner(AttentionCall(q=q, k=k, v=v, layout="bhld", heads=H, layer=layer, sigma=SIGMAS[3], grid=grid,
                                    text_bias=bias))
        torch.testing.assert_close(out, want, rtol=0, atol=0)
    runner.end()


def test_a_repatched_model_finds_its_new_runner_under_the_guard_filter():
    """ComfyUI 0.19 drops the guards on transformer_options, so a model compiled with one patch and then run with
    another (Patch Model Attention with another bundle or quality, same shapes) reuses the graph: the op must reach
    the new runner (its handle is a tensor input, fetched from the router at every call), not the first one."""
    model = TinyModel().eval()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, options={"guard_filter_fn": comfyui_guard_filter})
    x, context, mask = inputs(WAN, 2)
    first = make_router(WAN, make_bundle(WAN, seed=0), dense_cutoff=CUTOFF)
    sample(first, model, compiled, x, context, mask, runs=1)
    second = make_router(WAN, make_bundle(WAN, seed=1), dense_cutoff=1.0)  # other masks, every head sparse
    worst = sample(second, model, compiled, x, context, mask, runs=1)
    assert worst < 1e-5, worst
    assert len(backend.graphs) == 1  # the same graph served both patches


def test_eager_calls_do_not_go_through_the_op():
    bundle = make_bundle(WAN)
    router = make_router(WAN, bundle)
    model = TinyModel().eval()
    x, context, _ = inputs(WAN, 1)
    runs0 = ops.op_runs()
    router.begin_sampling(LATENT, SIGMAS)
    router.begin_model_call(SIGMAS[1], [0], 1, "cpu")
    with torch.inference_mode():
        model(x, context, None, transformer_options={"optimized_attention_override": router})
    router.end_model_call()
    router.end_sampling()
    router.handler.end()
    assert ops.op_runs() == runs0 and router.routed == 3


def test_a_handler_that_cannot_be_traced_runs_eagerly_at_every_step():
    """The calibrator (host-side statistics) is not traced: its calls break the graph and run eagerly, so each
    step still hands it the step's own sigma."""
    seen = []

    def handler(call):
        seen.append(call.sigma)
        q, k, v = call.bhld()
        return call.to_host_layout(F.scaled_dot_product_attention(q, k, v))

    router = AttentionRouter(mi.signature_from_config(WAN), mi.family_layout(WAN), WAN, handler=handler)
    model = TinyModel().eval()
    compiled = torch.compile(model, backend=CountingBackend(),
                             options={"guard_filter_fn": comfyui_guard_filter})
    x, context, _ = inputs(WAN, 1)
    to = {"optimized_attention_override": router}
    router.begin_sampling(LATENT, SIGMAS)
    for s in SIGMAS[:-1]:
        router.begin_model_call(s, [0], 1, "cpu")
        with torch.inference_mode():
            got = compiled(x, context, None, transformer_options=to)
            want = model(x, context, None, transformer_options=to)
        router.end_model_call()
        assert rel(got, want) < 1e-6
    router.end_sampling()
    assert seen == [s for s in SIGMAS[:-1] for _ in range(2 * 3)]  # compiled, then eager; 3 layers each
    assert counters["graph_break"]  # the calibrator's calls are outside the graph, by design


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: Triton runs compiled there, and "
                    "test_compiled_model_on_cuda_runs_the_triton_kernels checks the op on it")
def test_op_on_the_triton_path_matches_the_eager_runner(monkeypatch):
    """The op's run on the Triton path (CUDA only in production), here by Triton's interpreter in float16: the
    mixed layer of bucket 2 (a dense head listing every key block, a repetitive head, a padded text bias), through
    the op and straight through the runner, bit-identical, and the result in the memory order the fake promises."""
    from triton_interp import interpreted_kernels

    from calibatt.kernels import runner as runner_module

    interpreted_kernels()
    monkeypatch.setattr(runner_module.SparseRunner, "_triton_ok",
                        staticmethod(lambda q: q.dtype == torch.float16 and q.shape[-1] in (16, 32, 64, 128)))
    bundle = make_bundle(MOCHI)
    runner = SparseRunner(bundle, dense_cutoff=CUTOFF)
    runner.begin_step(SIGMAS[3], "cpu")
    assert runner.route(1) == "mixed"
    grid = dataclasses.replace(bundle.grid, text_tokens=TEXT, text_position="end")
    gen = torch.Generator().manual_seed(4)
    bias = torch.zeros(2, TEXT)
    bias[1, -3:] = -1e4  # padded keys of the second prompt
    x = torch.randn(2, grid.video_tokens + TEXT, 3 * H * D, generator=gen).to(torch.float16)
    q, k, v = x.chunk(3, dim=-1)  # (B, L, H*D) views with a row stride of 3*H*D, as a fused qkv gives
    call = AttentionCall(q=q, k=k, v=v, layout="bld", heads=H, layer=1, sigma=SIGMAS[3], grid=grid, text_bias=bias)
    want = runner(call)
    qh, kh, vh = call.bhld()
    out = ops.sparse_attention_op(qh, kh, vh, runner._handle, 1, bias, None, 0)
    assert out.stride() == torch.empty_like(qh).stride()
    torch.testing.assert_close(call.to_host_layout(out), want, rtol=0, atol=0)
    assert not runner.triton_failures
    runner.end()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["inductor", "cudagraphs"])
def test_compiled_model_on_cuda_runs_the_triton_kernels(backend):
    """bf16 on a GPU: the op runs the Triton kernels inside inductor's code (or the cudagraphs backend, which must
    not replay a capture across buckets: the op's CPU handle input keeps it from capturing); one graph, equal to
    eager at every step within bf16 rounding of the surrounding layers."""
    from calibatt.kernels import runner as runner_module

    bundle = make_bundle(MOCHI)
    router = make_router(MOCHI, bundle, dense_first=0.2, dense_cutoff=CUTOFF)
    torch.manual_seed(0)
    model = TinyModel().eval().to("cuda", torch.bfloat16)
    counting = CountingBackend(backend)
    compiled = torch.compile(model, backend=counting, options={"guard_filter_fn": comfyui_guard_filter})
    x, context, mask = inputs(MOCHI, 2, "cuda", torch.bfloat16)
    worst = sample(router, model, compiled, x, context, mask, device="cuda")
    assert worst < 2e-2, worst
    assert len(counting.graphs) == 1 and counters["graph_break"] == {}
    assert not router.handler.triton_failures


def test_text_position_without_a_traceable_fact_runs_dense_in_a_compiled_model(caplog):
    """HunyuanVideo's double blocks carry no img_slice: eager routing reads the text position off the padding mask
    (or the RoPE table), data a traced call cannot read without a graph break. Compiled, those calls run dense
    (ComfyUI's own attention, traced as usual), with one warning; no graph break, no recompile."""
    bundle = make_bundle(HUNYUAN)
    router = make_router(HUNYUAN, bundle, dense_cutoff=CUTOFF)
    torch.manual_seed(0)
    model = TinyModel(skip_reshape=True).eval()  # no img_slice
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True,
                             options={"guard_filter_fn": comfyui_guard_filter})
    x, context, mask = inputs(HUNYUAN, 2)
    to = {"optimized_attention_override": router}
    runs0 = ops.op_runs()
    router.begin_sampling(LATENT, SIGMAS)
    with caplog.at_level("WARNING", logger="calibatt"):
        for s in SIGMAS[:-1]:
            router.begin_model_call(s, [0, 1], 2, "cpu")
            with torch.inference_mode():
                got = compiled(x, context, mask, transformer_options=to)
            router.end_model_call()
            with torch.inference_mode():  # the unpatched model: ComfyUI's attention everywhere
                want = model(x, context, mask, transformer_options={})
            assert rel(got, want) < 1e-6
    router.end_sampling()
    router.handler.end()
    assert ops.op_runs() == runs0
    assert len(backend.graphs) == 1 and counters["graph_break"] == {}
    assert sum("only read from ComfyUI's img_slice" in r.getMessage() for r in caplog.records) == 1
