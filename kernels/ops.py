"""The sparse attention as one torch.library custom op (calibatt::sparse_attention), for torch.compile.

When a compiled model (ComfyUI's TorchCompileModel) is traced, dynamo runs the router's Python once and records
what it did; every Python value read on the way is either baked into the graph behind a guard (a change
recompiles) or, on ComfyUI 0.19+, baked with no guard at all (TorchCompileModel drops every guard under
transformer_options, where the router lives). So the traced call may read nothing that changes between steps.
It hands this op tensors the runner prepares outside the compiled region (SparseRunner.begin_step, run by the
APPLY_MODEL wrapper):
  - per layer, on the call's device, shapes fixed for the whole sampling run: the current bucket's skip-list
    table (kv_indices at the layer's width over every bucket, MaskBundle.layer_widths; kv_counts), the heads
    routed dense ([H] bool), and the repetition tables of the Triton kernel padded to the layer's most repetitive
    heads in any bucket;
  - `meta`, a small CPU int64 tensor [L, 6 + H] with the host-side facts of this step per layer: route (sparse,
    mixed, dense; every layer dense in a dense step), repetitive heads in use, block geometry, frame tokens, and
    which heads run dense. Reading a CPU tensor is no device sync.
Dynamo fetches these tensors from the runner at every call (they are graph inputs, found through the router's
attributes), so a new step or bucket is new data, not a new graph. The op itself is opaque to the compiler: at
run time it dispatches exactly as SparseRunner does in eager mode (Triton on CUDA, the reference elsewhere,
dense for dense routes), so compiled and eager results agree within rounding.

Eager calls do not go through the op (the runner calls the kernels directly, as before): a Python custom op adds
dispatcher overhead to every call.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from ..masks.skiplists import BlockGeometry, LayerRepetition, LayerSkipList, SkipLists
from ..masks.transfer import to_device_async
from .call import AttentionCall
from .dense import dense_attention
from .reference import sparse_attention_reference


def is_compiling() -> bool:
    """True while torch.compile traces the caller (torch.compiler.is_compiling needs torch >= 2.3)."""
    f = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(f()) if f is not None else False


ROUTE_SPARSE, ROUTE_MIXED, ROUTE_DENSE = 0, 1, 2
# meta columns before the per-head dense flags
_ROUTE, _REP, _TOKENS, _BLOCK_Q, _BLOCK_K, _FRAME = range(6)
META_FIXED = 6

OP_NAME = "calibatt::sparse_attention"

_RUNS = [0]


def op_runs() -> int:
    """How many times the op has run in this process. A compiled model's routed calls are counted here, at run
    time: the router cannot count them (its Python runs only while the model is traced)."""
    return _RUNS[0]


@dataclass
class OpLayer:
    """One layer's tensors for the current bucket (shapes fixed across buckets; see the module docstring)."""

    kv_indices: torch.Tensor  # [H, nq, W_layer]
    kv_counts: torch.Tensor  # [H, nq] int32
    dense_heads: torch.Tensor  # [H] bool: heads routed dense in a mixed layer
    rep_slot: torch.Tensor  # [H] int32: row of the rep tables, -1 = not repetitive (or routed dense)
    rep_heads: torch.Tensor  # [R*] int32: head of each rep row (first R valid, R in meta)
    rep_rows: torch.Tensor  # [R*, F*K] int32: anchor rows of each repetitive head
    rep_src: torch.Tensor  # [R*, F*T] int64: anchor output each video row of that head copies
    skip_rows: torch.Tensor  # [H] int32: video rows the anchor broadcast writes (F*T for repetitive heads, else 0)


@dataclass
class OpState:
    """What a traced attention call reads from the runner: per-layer device tensors and this step's CPU meta."""

    layers: list
    meta: torch.Tensor  # [L, 6 + H] int64, CPU
    meta_dense: torch.Tensor  # the same with every layer routed dense (dense steps)


def build_op_state(bundle, bucket: int, skip: SkipLists, above: torch.Tensor, mixed_heads: dict, device,
                   shared: dict) -> OpState:
    """The op's inputs for one bucket, built when the bucket begins (SparseRunner.begin_step).

    above [L, H] host bool: heads denser than the runner's cutoff; mixed_heads: layer -> [H] bool on `device`, the
    runner's own copy for its mixed layers; shared: a dict the runner keeps, holding the tensors that never change
    (reused across buckets, so a bundle without repetitive heads costs no copy here at all; tensors shared between
    layers only where they stay shared in every bucket). The skip-list tables are
    the skip lists' own tensors; the repetition tables of the layers that have repetitive heads in some bucket are
    built on the host and copied without blocking (masks/transfer.py): the same work the eager Triton path does
    once per bucket."""
    device = torch.device(device)
    g = bundle.geometry
    L, H = above.shape
    T = bundle.grid.frame_tokens
    frames = g.num_tokens // T if T else 0
    K = bundle.rep_anchors.shape[1]
    entry_rep = bundle.entry_rep  # [B, L, H] host
    key = str(device)
    fixed = shared.get(key)
    if fixed is None:
        fixed = shared[key] = {
            "r_max": (entry_rep >= 0).sum(-1).amax(0).tolist(),  # per layer, over every bucket: fixed table height
            # one per layer: a tensor shared by two layers that are not mixed would be one graph input if traced
            # then, and under ComfyUI's guard filter stay one when one of them turns mixed in a later bucket
            "no_heads": [torch.zeros(H, dtype=torch.bool, device=device) for _ in range(L)],
            "slot": torch.full((H,), -1, dtype=torch.int32, device=device),
            "heads": torch.zeros(0, dtype=torch.int32, device=device),
            "rows": torch.zeros(0, frames * K, dtype=torch.int32, device=device),
            "src": torch.zeros(0, frames * T, dtype=torch.int64, device=device),
            "skip_rows": torch.zeros(H, dtype=torch.int32, device=device),
        }
    route = torch.where(above.all(1), ROUTE_DENSE, torch.where(above.any(1), ROUTE_MIXED, ROUTE_SPARSE))
    rep = (entry_rep[bucket] >= 0) & ~above & (route != ROUTE_DENSE)[:, None]  # [L, H]: repetitive, not dense
    meta = torch.zeros(L, META_FIXED + H, dtype=torch.int64)
    meta[:, _ROUTE] = route
    meta[:, _REP] = rep.sum(1)
    meta[:, _TOKENS], meta[:, _BLOCK_Q], meta[:, _BLOCK_K], meta[:, _FRAME] = g.num_tokens, g.block_q, g.block_k, T
    meta[:, META_FIXED:] = above.to(torch.int64)
    layers = []
    for l in range(L):
        lay = skip.layer(l)
        t = dict(fixed)
        Rm = int(fixed["r_max"][l])
        if Rm:
            heads = rep[l].nonzero().flatten().tolist()
            R = len(heads)
            slot = torch.full((H,), -1, dtype=torch.int32)
            rep_heads = torch.zeros(Rm, dtype=torch.int32)
            rows = torch.zeros(Rm, frames * K, dtype=torch.int32)
            src = torch.zeros(Rm, frames * T, dtype=torch.int64)
            skip_rows = torch.zeros(H, dtype=torch.int32)
            if R:
                ids = entry_rep[bucket, l, heads].long()
                base = torch.arange(frames)[:, None] * T
                rows[:R] = (base[None] + bundle.rep_anchors[ids][:, None, :]).reshape(R, frames * K)
                src[:R] = ((torch.arange(frames)[:, None] * K)[None]
                           + bundle.rep_row_anchor[ids][:, None, :]).reshape(R, frames * T)
                rep_heads[:R] = torch.tensor(heads, dtype=torch.int32)
                slot[heads] = torch.arange(R, dtype=torch.int32)
                skip_rows[heads] = frames * T
            t.update(slot=to_device_async(slot, device), heads=to_device_async(rep_heads, device),
                     rows=to_device_async(rows, device), src=to_device_async(src, device),
                     skip_rows=to_device_async(skip_rows, device))
        layers.append(OpLayer(kv_indices=lay.kv_indices, kv_counts=lay.kv_counts,
                              dense_heads=mixed_heads.get(l, fixed["no_heads"][l]), rep_slot=t["slot"],
                              rep_heads=t["heads"], rep_rows=t["rows"], rep_src=t["src"], skip_rows=t["skip_rows"]))
    meta_dense = meta.clone()
    meta_dense[:, _ROUTE] = ROUTE_DENSE
    return OpState(layers, meta, meta_dense)


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


def _run(q, k, v, kv_indices, kv_counts, dense_heads, rep_slot, rep_heads, rep_rows, rep_src, skip_rows, meta,
         layer, text_bias, scale, video_start):
    from . import runner as _runner  # the runner imports this module; its Triton bookkeeping is shared

    _RUNS[0] += 1
    m = meta[layer].tolist()  # CPU tensor: host facts, no device sync
    route, R, T, vs = m[_ROUTE], m[_REP], m[_FRAME], video_start
    if route == ROUTE_DENSE:
        return _like_q(q, dense_attention(q, k, v, scale=scale, text_bias=text_bias, video_start=vs))
    if kv_indices.device != q.device:
        # The model's calls moved to another device than the step began on (weights streamed, a model split over
        # GPUs): the eager runner rebuilds its tables there; the traced call can only copy them, per call.
        kv_indices, kv_counts, dense_heads, rep_slot, rep_heads, rep_rows, rep_src, skip_rows = (
            t.to(q.device) for t in (kv_indices, kv_counts, dense_heads, rep_slot, rep_heads, rep_rows, rep_src,
                                     skip_rows))
    g = BlockGeometry(m[_TOKENS], m[_BLOCK_Q], m[_BLOCK_K])
    rep = None
    if R:
        frames = g.num_tokens // T
        K = rep_rows.shape[1] // frames
        # Frame 0 of the Triton tables holds the anchors themselves and the row -> anchor map.
        rep = LayerRepetition(T, rep_slot, rep_rows[:R, :K].long(), rep_src[:R, :T])
    lay = LayerSkipList(g, kv_indices, kv_counts, rep)
    if _runner.SparseRunner._triton_ok(q):
        from . import triton_attention as ta
        if route == ROUTE_MIXED:
            lay = lay.with_full_heads(dense_heads)  # the dense heads list every key block (as the runner does)
        # The tables were built for this bucket already; seed the kernel module's per-skip-list caches with them so
        # it neither reads the plan on the host (a sync) nor rebuilds it per call.
        dev = str(q.device)
        lay._triton_rep = (dev, ta._RepPrep(rep_heads[:R], rep_rows[:R], rep_src[:R], g.num_tokens // T * T)
                           if R else None)
        lay._triton_skip_rows = (dev, skip_rows)
        try:
            return _like_q(q, ta.sparse_attention_triton(q, k, v, lay, scale=scale, text_bias=text_bias,
                                                         video_start=vs))
        except Exception as e:  # noqa: BLE001 - same policy as SparseRunner.__call__
            if isinstance(e, ValueError) and not type(e).__name__ == "TritonUnsupported":
                raise
            _runner._TRITON_BROKEN[(str(q.device), q.dtype, q.shape[-1])] = True
            warnings.warn(f"calibatt: Triton sparse attention failed on {q.device} ({e}); using dense attention "
                          "for this shape from now on", RuntimeWarning)
            return _like_q(q, dense_attention(q, k, v, scale=scale, text_bias=text_bias, video_start=vs))
    out = sparse_attention_reference(q, k, v, lay, scale=scale, text_bias=text_bias, video_start=vs)
    if route == ROUTE_MIXED:
        idx = torch.tensor([h for h, f in enumerate(m[META_FIXED:]) if f], dtype=torch.long, device=q.device)
        out[:, idx] = dense_attention(q[:, idx], k[:, idx], v[:, idx], scale=scale, text_bias=text_bias,
                                      video_start=vs).to(out.dtype)
    return _like_q(q, out)


def _fake(q, k, v, kv_indices, kv_counts, dense_heads, rep_slot, rep_heads, rep_rows, rep_src, skip_rows, meta,
          layer, text_bias, scale, video_start):
    return torch.empty_like(q)


def _register():
    if not hasattr(torch.library, "custom_op"):  # torch < 2.4: compiled models call the router untraced
        return None
    ns, name = OP_NAME.split("::")
    try:
        # The package may be imported twice in one process under different module names (a test that imports it
        # and also loads it as a ComfyUI custom node); the first registration serves both.
        return getattr(getattr(torch.ops, ns), name)
    except (AttributeError, RuntimeError):
        pass

    @torch.library.custom_op(OP_NAME, mutates_args=())
    def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_indices: torch.Tensor,
                         kv_counts: torch.Tensor, dense_heads: torch.Tensor, rep_slot: torch.Tensor,
                         rep_heads: torch.Tensor, rep_rows: torch.Tensor, rep_src: torch.Tensor,
                         skip_rows: torch.Tensor, meta: torch.Tensor, layer: int,
                         text_bias: Optional[torch.Tensor], scale: Optional[float],
                         video_start: int) -> torch.Tensor:
        return _run(q, k, v, kv_indices, kv_counts, dense_heads, rep_slot, rep_heads, rep_rows, rep_src, skip_rows,
                    meta, layer, text_bias, scale, video_start)

    sparse_attention.register_fake(_fake)
    return getattr(getattr(torch.ops, ns), name)


sparse_attention_op = _register()


def traced_sparse_attention(state: OpState, meta: torch.Tensor, call: AttentionCall) -> torch.Tensor:
    """The sparse attention of one call as a single op node in the graph being traced (shapes, the layer index and
    where the video starts are the only Python facts it reads)."""
    q, k, v = call.bhld()
    t = state.layers[call.layer]
    out = sparse_attention_op(q, k, v, t.kv_indices, t.kv_counts, t.dense_heads, t.rep_slot, t.rep_heads,
                              t.rep_rows, t.rep_src, t.skip_rows, meta, call.layer, call.text_bias, call.scale,
                              call.video_start)
    return call.to_host_layout(out)
