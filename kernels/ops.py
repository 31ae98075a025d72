"""The sparse attention as one torch.library custom op (calibatt::sparse_attention), for torch.compile.

When a compiled model (ComfyUI's TorchCompileModel) is traced, dynamo runs the router's Python once and records what
it did: every Python value read on the way is baked into the graph, behind a guard (a change recompiles) or, on
ComfyUI 0.19+, with no guard at all (TorchCompileModel drops every guard under transformer_options, where the router
lives). What changes from step to step (sigma, the bucket, the dense window, the bucket's tables, which layers run
dense) must therefore not be read while tracing. So a traced call hands this op only tensors:
  - q, k, v and the call's text bias (graph values);
  - the runner's handle, a CPU int64 tensor [1] that names the SparseRunner (dynamo fetches it from the router's
    attributes at every call, like any tensor input, so a re-patched model's new runner is found, never a stale one).
The op is opaque to the compiler (a fake implementation gives the output's shape and memory order). When it runs,
it looks the runner up and calls it like an eager call, which reads the state of the current step that the
APPLY_MODEL wrapper set outside the compiled model (SparseRunner.begin_step): the bucket's tables, built per call from
its packed masks (kernels/tables/__init__.py), the routes, the dense window. Compiled and eager calls therefore run
the same code and agree within rounding. Reading the handle is a host read of CPU memory, no device sync.

Why not the masks themselves as inputs: the runner builds each layer's table right before its call into one reused
buffer (a bucket's tables do not exist at once), so the op would have to repeat that machinery (builder, buffer,
repetition tables) and stay in step with it; the handle keeps one implementation. A CPU input also keeps the
"cudagraphs" backend from capturing the graph (it skips graphs with CPU inputs), so no capture can replay one
bucket's launches in another.

Eager calls do not go through the op (the runner is called directly, as before): a Python custom op adds dispatcher
overhead to every call.
"""

from __future__ import annotations

import dataclasses
import itertools
import weakref
from typing import Optional

import torch

from .call import AttentionCall

OP_NAME = "calibatt::sparse_attention"

_RUNS = [0]
_RUNNERS: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()
_IDS = itertools.count(1)


# True while torch.compile traces the caller; checked a few times per attention call, so the function itself (no
# wrapper: ~0.2 us). torch.compiler.is_compiling needs torch >= 2.3; before it, nothing here is traced.
is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (lambda: False)


def op_runs() -> int:
    """How many times the op has run in this process. A compiled model's routed calls are counted here, at run
    time: the router cannot count them (its Python runs only while the model is traced)."""
    return _RUNS[0]


def runner_handle(runner) -> torch.Tensor:
    """A CPU int64 tensor [1] naming `runner` for the op (held weakly: a dropped runner is not kept alive)."""
    key = next(_IDS)
    _RUNNERS[key] = runner
    return torch.tensor([key], dtype=torch.int64)


# ---------------------------------------------------------------------------------------------------------------
# the op
# ---------------------------------------------------------------------------------------------------------------
def _like_q(q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out` in the memory order of torch.empty_like(q), which the fake implementation promises the compiler
    (inductor lays out the readers of the result by it). The Triton path already writes in that order."""
    if out.stride() == q.stride():
        return out
    want = torch.empty_like(q)
    if want.stride() == out.stride():
        return out
    return want.copy_(out)


def _run(q, k, v, handle, layer, text_bias, scale, video_start):
    _RUNS[0] += 1
    runner = _RUNNERS.get(int(handle.reshape(-1)[0]))  # CPU tensor: a host read, no device sync
    if runner is None:
        raise RuntimeError("calibatt: the compiled model calls a sparse runner that no longer exists; patch and "
                           "compile the model again")
    if runner.held is None:
        raise RuntimeError("calibatt: a compiled model's attention ran before the sampling step began (the APPLY_MODEL "
                           "wrapper, nodes/comfy_glue.py, calls SparseRunner.begin_step outside the compiled model)")
    bundle_grid = runner.bundle.grid
    text = q.shape[2] - bundle_grid.video_tokens
    grid = dataclasses.replace(bundle_grid, text_tokens=text,
                               text_position=("start" if video_start else "end") if text else "none")
    call = AttentionCall(q=q, k=k, v=v, layout="bhld", heads=q.shape[1], layer=layer, sigma=float("nan"),
                         grid=grid, scale=scale, text_bias=text_bias)
    return _like_q(q, runner(call))


def _fake(q, k, v, handle, layer, text_bias, scale, video_start):
    return torch.empty_like(q)


def _free_name() -> str:
    # The package may be imported twice in one process under different module names (a test that imports it and
    # also loads it as a ComfyUI custom node); each copy registers its own op, bound to its own runner registry.
    ns, name = OP_NAME.split("::")
    for i in itertools.count():
        candidate = name if i == 0 else f"{name}_{i}"
        try:
            getattr(getattr(torch.ops, ns), candidate)
        except (AttributeError, RuntimeError):
            return f"{ns}::{candidate}"


def _register():
    if not hasattr(torch.library, "custom_op"):  # torch < 2.4: compiled models call the router untraced
        return None
    qualname = _free_name()

    @torch.library.custom_op(qualname, mutates_args=())
    def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, handle: torch.Tensor, layer: int,
                         text_bias: Optional[torch.Tensor], scale: Optional[float],
                         video_start: int) -> torch.Tensor:
        return _run(q, k, v, handle, layer, text_bias, scale, video_start)

    sparse_attention.register_fake(_fake)
    ns, name = qualname.split("::")
    return getattr(getattr(torch.ops, ns), name)


sparse_attention_op = _register()


def traced_sparse_attention(handle: torch.Tensor, call: AttentionCall) -> torch.Tensor:
    """The sparse attention of one call as a single op node in the graph being traced (shapes, the layer index and
    where the video starts are the only Python facts it reads; all three are fixed for a call site)."""
    q, k, v = call.bhld()
    out = sparse_attention_op(q, k, v, handle, call.layer, call.text_bias, call.scale, call.video_start)
    return call.to_host_layout(out)
