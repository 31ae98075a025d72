"""SparseRunner: given a bundle and an AttentionCall, run the right attention.

Per step (not per call) it picks the sigma bucket, puts that bucket's packed masks on the call's device
(kernels/tables/__init__.py: each layer's skip-list table is built right before its call, into one reused buffer) and
decides, per layer, which heads run block-sparse and which run dense; per call it dispatches:
  - dense (kernels/dense.py, cuDNN first) where the step is in a dense window, or for a layer whose heads are all
    denser than the cutoff;
  - the Triton kernel on CUDA (float16/bfloat16, head_dim 16..128), the plain-PyTorch reference elsewhere;
  - a layer with some heads above the cutoff: on the Triton path those heads list every key block (exact dense in
    the same launch); on the reference path they are skipped and dense SDPA fills them in.
No per-call host sync: the routing is computed from the bundle's host-side densities when the step begins. Every
call is checked against the bundle first (check_call: layer range, heads, head_dim, video grid, token count), so
masks never run on a call they were not made for.
A call's text bias (a key-padding mask on the text keys, AttentionCall.text_bias) is applied on every path, and
every path takes the call's token order from its grid (text after or before the video: AttentionCall.video_start,
passed to the kernels as an offset; q, k, v are never reordered).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from ..masks.bundle import MaskBundle
from ..masks.errors import BundleError
from ..masks.sigmas import in_dense_window
from ..masks.transfer import canonical_device, to_device_async
from .tables import BucketTables
from .call import AttentionCall
from .dense import dense_attention
from .support import FP8_ERROR_BOUND, PRECISIONS, QK_ONLY, KernelHealth, KernelUnsupported, triton_unsupported
from .ops import is_compiling, runner_handle, sparse_attention_op, traced_sparse_attention
from .attention.naive import sparse_attention_reference

# Key-block density above which the dense path (cuDNN) is at least as fast as our Triton kernel for that head.
# Measured on an H100 by bench/bench_kernels.py (docs/BENCHMARKS.md, "## Kernels", 2026-11-22): our time
# crosses cuDNN's dense time at density 0.93-0.94 (three runs; 480p 32,760 and 720p 75,600 tokens, 3-D local-window
# masks, bf16, H=40, D=128); the lower end is kept, since dense is also the more exact path.
DENSE_CUTOFF = 0.93


def quality_cutoff(quality: float) -> float:
    """Dense cutoff for a user-facing quality in [0, 1]: heads whose masks compute more than (1 - quality) of their
    key blocks run dense (0 = the bundle as calibrated, 1 = fully dense); never above the measured cutoff, beyond
    which dense is faster anyway."""
    q = float(quality)
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quality must be in [0, 1], got {quality}")
    return min(DENSE_CUTOFF, 1.0 - q)


# The 8-bit check compares a layer with bf16 this many bytes of output at a time (a few heads): at Wan 14B 720p one
# head of a CFG batch is 39 MB, so the check holds about that on top of the layer's own output.
CHECK_BYTES = 64 << 20


class SparseRunner:
    def __init__(self, bundle: MaskBundle, *, dense_first: float = 0.0, dense_last: float = 0.0,
                 dense_cutoff: float = DENSE_CUTOFF, precision: str = "bf16", table_builder: Optional[str] = None):
        """table_builder: who builds the per-step skip-list tables, "triton" or "torch"; None picks Triton on CUDA and
        torch elsewhere (tests pass "triton" to run the Triton builder under the interpreter on the CPU)."""
        if not (0.0 <= dense_first <= 1.0 and 0.0 <= dense_last <= 1.0):
            raise ValueError("dense_first and dense_last are fractions of the steps in [0, 1]")
        if not (0.0 <= dense_cutoff <= 1.0 + 1e-9):
            raise ValueError("dense_cutoff is a key-block density in [0, 1]; heads denser than it run dense "
                             "(1.0 keeps every head sparse, 0.0 runs everything dense)")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.bundle = bundle
        self.precision = precision
        self._fp8 = {}  # layer -> its relative error in FP8 against bf16, measured on its first call of the run
        self._layer_precision = {}  # layer -> the precision it runs in this run, decided on its first call
        self._fallbacks_said = set()  # (requested, used) precisions already warned about this run
        self.check_bytes = CHECK_BYTES  # bf16 output per chunk of heads in the 8-bit check (_error_vs_bf16)
        self.dense_first = dense_first
        self.dense_last = dense_last
        self.dense_cutoff = dense_cutoff
        self.table_builder = table_builder
        self._step_key = None
        self._tables: Optional[BucketTables] = None
        self._routes = None
        self._dense_step = False
        self._densities = bundle.entry_densities()  # [buckets, L, H] host-side, computed once
        self._handle = runner_handle(self)  # what a compiled model's op finds this runner by (kernels/ops.py)
        self._checked = None  # the call shape last found to fit the bundle
        self._health = KernelHealth()  # Triton paths that failed on this run's GPU

    def begin_step(self, sigma: float, device, step_fraction: Optional[float] = None):
        """Call once per denoising step with the host-side sigma and, when known, the position in the schedule
        (0 = first step, 1 = last). Cheap when the bucket did not change."""
        self._dense_step = in_dense_window(step_fraction, self.dense_first, self.dense_last)
        bucket = self.bundle.bucket_for_sigma(float(sigma))
        self._hold(bucket, device)
        return bucket

    def _hold(self, bucket: int, device):
        """Make `bucket`'s tables and layer routes on `device` the current ones. The last bucket's (or the last
        device's) device state is dropped before the next is made: one bucket is held at a time."""
        device = canonical_device(device)  # "cuda" and the calls' "cuda:0" must not look like two devices
        key = (bucket, str(device))
        if key == self._step_key:
            return
        self._tables = None
        self._routes = self._layer_routes(bucket, device)
        above = self._densities[bucket] > self.dense_cutoff
        mixed = above.any(-1) & ~above.all(-1)
        self._tables = BucketTables(self.bundle, bucket, device, full_heads=above & mixed[:, None], health=self._health,
                                    layers=[l for l, r in enumerate(self._routes) if r[0] != "dense"],
                                    builder=self.table_builder)
        self._step_key = key

    def _layer_routes(self, bucket: int, device) -> list:
        """Per layer: ("sparse", None), ("dense", None) or ("mixed", (dense-head bool [H], dense-head index))."""
        routes = []
        above = self._densities[bucket] > self.dense_cutoff  # [L, H] host
        for l in range(above.shape[0]):
            row = above[l]
            if bool(row.all()):
                routes.append(("dense", None))
            elif bool(row.any()):
                routes.append(("mixed", (to_device_async(row, device),
                                         to_device_async(row.nonzero().flatten(), device))))
            else:
                routes.append(("sparse", None))
        return routes

    def route(self, layer: int) -> str:
        """"sparse", "dense" or "mixed" for a layer of the current step (dense steps aside)."""
        if self._routes is None:
            raise RuntimeError("call begin_step before asking for a route")
        return self._routes[layer][0]

    @property
    def held(self):
        """(bucket, device) whose tables this runner holds, or None between sampling runs."""
        return self._step_key

    def held_bytes(self) -> int:
        """Bytes of the device tensors the runner keeps for the current bucket: its packed masks, the table buffer
        (or tables), per-layer repetition and routing tables. 0 before begin_step and after end()."""
        if self._tables is None:
            return 0
        return self._tables.held_bytes([t for _, heads in self._routes if heads is not None for t in heads])

    def end(self):
        self._fp8.clear()  # a new run (other prompts, other sizes) checks its layers again
        self._layer_precision.clear()
        self._fallbacks_said.clear()
        self._tables = None
        self._routes = None
        self._step_key = None
        self.bundle.release()

    @property
    def traceable(self) -> bool:
        """Whether a compiled model can trace calls into this runner (AttentionRouter asks): the custom op exists."""
        return sparse_attention_op is not None

    def check_call(self, call: AttentionCall):
        """Raise (BundleError naming the mismatch and the fix) unless the call fits the bundle: layer in range,
        heads, head_dim, the video grid the masks were made for (frames, height, width, patch) and a sequence of
        exactly its video + text tokens, the text after or before the video. The shape checks run once per call
        shape (a step's calls share it), the layer check every call (host ints, no sync)."""
        b = self.bundle
        if isinstance(call.layer, bool) or not isinstance(call.layer, int) or not 0 <= call.layer < b.num_layers:
            raise BundleError(f"attention call for layer {call.layer!r}, but the bundle covers layers 0-"
                              f"{b.num_layers - 1} ({b.signature.family}, {b.num_layers} layers); the host's layer "
                              "index is wrong, or the bundle was made for another model", path=b.path, field="layer")
        key = (call.grid, call.layout, call.heads, call.q.shape, call.k.shape, call.v.shape)
        if key == self._checked:
            return
        try:
            _, H, _, D = call.check()
        except ValueError as e:
            raise ValueError(f"SparseRunner: {e}") from None
        problems = []
        if H != b.num_heads:
            problems.append(f"the call has {H} heads; the bundle was made for {b.num_heads}")
        if D != b.signature.head_dim:
            problems.append(f"the call has head_dim {D}; the bundle was made for {b.signature.head_dim}")
        problems += b.grid.mismatches(call.grid, text=False)
        if problems:
            raise BundleError("this mask bundle does not fit the attention call: " + "; ".join(problems)
                              + f". The bundle was made for {b.signature.family}, {b.grid.describe()}; calibrate a "
                              "bundle for this model and video size, or load one made for it.", path=b.path,
                              field="grid" if not (H != b.num_heads or D != b.signature.head_dim) else "model")
        self._checked = key

    def __call__(self, call: AttentionCall) -> torch.Tensor:
        if is_compiling():
            # Traced once, replayed every step: one op node, which calls this runner when it runs (kernels/ops.py).
            return traced_sparse_attention(self._handle, call)
        self.check_call(call)
        if self._tables is None:
            self.begin_step(call.sigma, call.q.device)
        elif self._step_key[1] != str(call.q.device):
            # The model's calls moved to another device (weights offloaded and streamed, a model split over GPUs):
            # the same bucket's tables on that device; this step's dense-window decision stands.
            self._hold(self._step_key[0], call.q.device)
        if self._dense_step:
            return self._dense(call)
        kind, dense_heads = self._routes[call.layer]
        q, k, v = call.bhld()
        bias = call.text_bias
        vs = call.video_start
        if kind == "dense":
            return call.to_host_layout(dense_attention(q, k, v, scale=call.scale, text_bias=bias, video_start=vs))
        if not self._health.ok(self._triton_key(q)):
            # The kernel failed on this shape earlier in the run: dense, as the warning said (on a GPU the
            # PyTorch reference would give the sparse result, but slower than dense attention and with more memory).
            return call.to_host_layout(dense_attention(q, k, v, scale=call.scale, text_bias=bias, video_start=vs))
        out = None
        if self._triton_ok(q):
            # A mixed layer: its dense heads list every key block, so one launch computes them exactly. Our kernel is
            # within a few % of cuDNN on full rows, and this saves gathering those heads' q/k/v, a second launch and
            # the scatter back (which cost more than the attention at small sizes).
            layer = self._tables.layer(call.layer, full=dense_heads is not None)
            dense_heads = None
            try:
                out = self._sparse_triton(q, k, v, layer, call)
            except Exception as e:  # noqa: BLE001 - see below
                if isinstance(e, ValueError) and not isinstance(e, KernelUnsupported):
                    raise  # bad input: the caller must see it
                # A compile or launch failure on an untested GPU, or a shape the kernel does not take, must not
                # stop the sampler: dense attention is the exact fallback.
                self._health.mark_failed(self._triton_key(q))
                warnings.warn(f"calibatt: Triton sparse attention failed on {q.device} ({e}); using dense attention "
                              "for this shape from now on", RuntimeWarning)
                return call.to_host_layout(dense_attention(q, k, v, scale=call.scale, text_bias=bias,
                                                           video_start=vs))
        if out is None:
            layer = self._tables.layer(call.layer)
            out = sparse_attention_reference(q, k, v, layer, scale=call.scale, text_bias=bias, video_start=vs)
        if dense_heads is not None:
            idx = dense_heads[1]
            out[:, idx] = dense_attention(q[:, idx], k[:, idx], v[:, idx], scale=call.scale,
                                          text_bias=bias, video_start=vs).to(out.dtype)
        return call.to_host_layout(out)

    def _sparse_triton(self, q, k, v, layer, call: AttentionCall) -> torch.Tensor:
        """The Triton kernel at the runner's precision. An 8-bit layer is checked once per run against the same
        layer in bf16 (one extra call and one host sync, on the layer's first call). A layer over FP8_ERROR_BOUND
        whose P·V is 8-bit tries the Q·K-only variant next (QK_ONLY: on real activations the e4m3 rounding of P·V
        is most of the error, docs/BENCHMARKS.md "Model-scale step"), and runs bf16 only if that fails too; one
        warning per layer and run. Where 8 bits cannot run (no such tensor cores, head_dim under 32, a compile
        failure) the runner warns once and runs bf16."""
        from .attention.triton_fwd import sparse_attention_triton
        kw = dict(scale=call.scale, text_bias=call.text_bias, video_start=call.video_start)
        key = ("fp8", str(q.device), q.shape[-1])
        precision = self._layer_precision.get(call.layer, self.precision)
        if precision == "bf16" or not self._health.ok(key):
            return sparse_attention_triton(q, k, v, layer, **kw)
        try:
            # The kernel asks support.precision_unsupported and raises KernelUnsupported with its reason.
            out = sparse_attention_triton(q, k, v, layer, precision=precision, **kw)
        except Exception as e:  # noqa: BLE001 - 8 bits are an option: bf16 is the exact fallback
            if isinstance(e, ValueError) and not isinstance(e, KernelUnsupported):
                raise
            self._health.mark_failed(key)
            warnings.warn(f"calibatt: precision {precision} is not available ({e}); running bf16",
                          RuntimeWarning)
            return sparse_attention_triton(q, k, v, layer, **kw)
        if call.layer in self._layer_precision:
            return out
        err = _error_vs_bf16(out, q, k, v, layer, kw, self.check_bytes)
        tried = [(precision, err)]
        if not err <= FP8_ERROR_BOUND and precision in QK_ONLY:  # NaN included
            precision = QK_ONLY[precision]
            del out  # one whole-layer output at a time
            out = sparse_attention_triton(q, k, v, layer, precision=precision, **kw)
            err = _error_vs_bf16(out, q, k, v, layer, kw, self.check_bytes)
            tried.append((precision, err))
        ok = err <= FP8_ERROR_BOUND
        self._fp8[call.layer] = err
        self._layer_precision[call.layer] = precision if ok else "bf16"
        used = self._layer_precision[call.layer]
        if (len(tried) > 1 or not ok) and (self.precision, used) not in self._fallbacks_said:
            # Once per run and kind of fallback: at Wan scale every layer falls back the same way, and 40 warnings
            # per sampling run would bury the one that matters. layer_precisions lists every layer.
            self._fallbacks_said.add((self.precision, used))
            steps = ", ".join(f"{p} {e:.3f}" for p, e in tried)
            warnings.warn(f"calibatt: layer {call.layer} is {steps} (relative) from bf16, bound {FP8_ERROR_BOUND}; "
                          f"it runs {used} from now on (other layers that do the same are not reported again "
                          f"this run)", RuntimeWarning)
        if ok:
            return out
        del out
        return sparse_attention_triton(q, k, v, layer, **kw)

    @property
    def fp8_errors(self) -> dict:
        """layer -> relative error against bf16 of the 8-bit precision it was checked in last (checked layers)."""
        return dict(self._fp8)

    @property
    def layer_precisions(self) -> dict:
        """layer -> the precision it runs in for the rest of this run (checked layers): the runner's, its Q·K-only
        variant, or bf16."""
        return dict(self._layer_precision)

    @property
    def triton_failures(self) -> list:
        """Triton paths (attention, table builder) that failed on this runner's GPU and now run their fallback."""
        return self._health.failures

    @staticmethod
    def _triton_key(q: torch.Tensor):
        return ("attention", str(q.device), q.dtype, q.shape[-1])

    def _triton_ok(self, q: torch.Tensor) -> bool:
        return triton_unsupported(q) is None and self._health.ok(self._triton_key(q))

    @staticmethod
    def _dense(call: AttentionCall) -> torch.Tensor:
        if call.dense is not None:
            return call.dense()
        q, k, v = call.bhld()
        return call.to_host_layout(dense_attention(q, k, v, scale=call.scale, text_bias=call.text_bias,
                                                   video_start=call.video_start))


def _error_vs_bf16(out: torch.Tensor, q, k, v, layer, kw: dict, chunk_bytes: int) -> float:
    """Relative L2 error of an 8-bit layer output (B, H, N, D) against the same layer in bf16, computed a few heads
    at a time: a whole second output plus float32 copies of both was 8.7 GB at Wan 14B 720p (30 % of the weights,
    the first step of an fp8 run; docs/BENCHMARKS.md "Model-scale step"). A chunk of heads is at most chunk_bytes
    of bf16 output (one head if a head is more) and the check holds three times that at its peak: the chunk's bf16
    output and its float32 copy. One host read at the end."""
    from .attention.triton_fwd import sparse_attention_triton
    B, H, N, D = out.shape
    per_head = B * N * D * out.element_size()
    step = max(1, min(H, chunk_bytes // max(1, per_head)))
    num = den = None
    for h0 in range(0, H, step):
        h1 = min(H, h0 + step)
        exact = sparse_attention_triton(q[:, h0:h1], k[:, h0:h1], v[:, h0:h1], layer.head_range(h0, h1), **kw)
        e = exact.float()
        del exact
        n = torch.linalg.vector_norm(e).square()
        d = torch.linalg.vector_norm(e.sub_(out[:, h0:h1])).square()  # in place: no third chunk-sized buffer
        del e
        num = d if num is None else num + d
        den = n if den is None else den + n
    return float(num.sqrt() / den.sqrt().clamp_min(1e-30))
