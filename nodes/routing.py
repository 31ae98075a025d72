"""The attention override: route ComfyUI's self-attention calls to the sparse runner (or the calibrator).

ComfyUI calls `override(func, *args, **kwargs)` for every attention of the patched model, with `func` the dense
backend that would have run. Self-attention over exactly this latent's tokens in a covered layer becomes an
AttentionCall for the handler; everything else (cross-attention, text refiners, calls before sampling started,
sequences with extra tokens) goes to `func` unchanged. A key-padding mask over the text keys of a joint-text model
(HunyuanVideo's padded prompt) becomes the call's text bias; any other mask runs dense. No ComfyUI import here: the
wrappers in comfy_glue feed the per-sampling and per-step facts in, so the routing is testable with plain tensors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..kernels.call import AttentionCall
from ..kernels.ops import is_compiling
from ..kernels.text_bias import as_text_bias
from ..masks.geometry import ModelSignature, TokenGrid
from .model_info import FamilyLayout, grid_from_latent, layer_offset

log = logging.getLogger("calibatt")

# transformer_options keys our per-block "dit" patches set: the layer index (ComfyUI versions without
# block_index), and a per-block call counter. In every supported block the self-attention is the block's first
# attention call (Wan and LTX-Video run cross-attention after it), which separates it from a cross-attention whose
# text happens to have as many tokens as the video.
LAYER_KEY = "calibatt_layer"
CALLS_KEY = "calibatt_calls"


@dataclass
class StepState:
    sigma: float
    step_fraction: Optional[float]
    positive_rows: Optional[list]


def step_index(sample_sigmas: Sequence[float], sigma: float) -> int:
    """Index of the schedule entry nearest to sigma (the last entry, usually 0, is not a step)."""
    steps = max(1, len(sample_sigmas) - 1)
    return min(range(steps), key=lambda i: abs(sample_sigmas[i] - sigma))


def positive_rows(cond_or_uncond: Optional[Sequence[int]], batch: int) -> Optional[list]:
    """Batch rows of the positive prompt: ComfyUI concatenates equal chunks, one per entry (0 = positive)."""
    if not cond_or_uncond:
        return None
    chunks = len(cond_or_uncond)
    if batch % chunks:
        return None
    per = batch // chunks
    rows = [c * per + r for c, kind in enumerate(cond_or_uncond) if kind == 0 for r in range(per)]
    return rows if len(rows) < batch else None


def _unwrap(x):
    # Newer ComfyUI passes q/k/v in containers that wrap_attn normally unwraps first; accept either.
    if not isinstance(x, torch.Tensor) and hasattr(x, "take"):
        return x.take()
    return x


class AttentionRouter:
    """One per patched model. `handler(call) -> output in the call's layout`; `step_hook(sigma, device,
    step_fraction)` (optional) runs once per model evaluation, before its attention calls."""

    def __init__(self, signature: ModelSignature, layout: FamilyLayout, cfg: dict,
                 handler: Callable[[AttentionCall], torch.Tensor],
                 step_hook: Optional[Callable] = None, name: str = "calibatt"):
        self.signature = signature
        self.layout = layout
        self.cfg = dict(cfg)
        self.handler = handler
        self.step_hook = step_hook
        self.name = name
        self.grid: Optional[TokenGrid] = None
        self.sample_sigmas: list = []
        self.step: Optional[StepState] = None
        self._grids: dict = {}
        self._warned: set = set()
        self._mask_video_zero: Optional[bool] = None  # checked on the first mask of a sampling run
        self._last_mask: Optional[tuple] = None  # (mask, L, batch, bias): one conversion per model evaluation
        self.routed = 0  # calls handed to the handler (tests and logs read it)
        self.passed = 0

    # model_options are deep-copied whenever a later node clones the model; the wrappers hold this same object,
    # so copies must share it rather than fork its state.
    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self

    # ---- lifecycle (driven by the sampling wrappers) ----------------------------------------------------------
    def begin_sampling(self, latent_shape, sample_sigmas: Sequence[float]) -> TokenGrid:
        self.grid = grid_from_latent(self.layout, latent_shape)
        self.sample_sigmas = [float(s) for s in sample_sigmas]
        self._grids = {}
        self.step = None
        self._mask_video_zero = None
        self._last_mask = None
        return self.grid

    def begin_model_call(self, sigma: float, cond_or_uncond, batch: int, device) -> StepState:
        frac = None
        if len(self.sample_sigmas) >= 2:
            frac = step_index(self.sample_sigmas, sigma) / (len(self.sample_sigmas) - 1)
        self.step = StepState(float(sigma), frac, positive_rows(cond_or_uncond, batch))
        if self.step_hook is not None:
            self.step_hook(self.step.sigma, device, frac)
        return self.step

    def end_model_call(self):
        self.step = None
        self._last_mask = None

    def end_sampling(self):
        self.grid = None
        self.step = None
        self._mask_video_zero = None
        self._last_mask = None
        self.sample_sigmas = []

    # ---- per attention call -------------------------------------------------------------------------------
    def layer_of(self, transformer_options: dict) -> Optional[int]:
        if LAYER_KEY in transformer_options:
            return int(transformer_options[LAYER_KEY])
        if "block_index" in transformer_options:
            return int(transformer_options["block_index"]) + layer_offset(
                self.layout, self.cfg, transformer_options.get("block_type"))
        return None

    def _count_passed(self):
        # Counters are host state: a traced call (torch.compile) must not write them (dynamo would guard on the
        # value, or, under ComfyUI's guard filter, write back the value seen when tracing). The routed calls of a
        # compiled model are counted by the op when it runs (kernels/ops.py, op_runs).
        if not is_compiling():
            self.passed += 1

    def _call_grid(self, text_tokens: int) -> TokenGrid:
        # No cache while tracing (torch.compile): the write would be replayed every step, and begin_sampling's fresh
        # dict would fail a guard on its contents at the next sampling run.
        compiling = is_compiling()
        g = None if compiling else self._grids.get(text_tokens)
        if g is None:
            v = self.grid
            g = TokenGrid(v.frames, v.height, v.width, v.patch, v.order, text_tokens,
                          "end" if text_tokens else "none", v.vae_stride)
            if not compiling:
                self._grids[text_tokens] = g
        return g

    def _warn_once(self, key, msg):
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s: %s", self.name, msg)

    def _text_bias(self, mask: torch.Tensor, L: int, batch: int, video: int):
        """(usable, text bias or None) for a call with an attention mask. Usable: a joint-text model, a key-padding
        mask over exactly the call's L keys, zero on the video keys; its text part becomes the text bias."""
        if not self.layout.joint_text:
            self._warn_once("mask", "attention calls with a mask run dense (this model has no joint text tokens)")
            return False, None
        if is_compiling():
            return self._traced_text_bias(mask, L, batch, video)
        last = self._last_mask
        if last is not None and last[0] is mask and last[1:3] == (L, batch):
            # The model hands every block the same mask object within one evaluation (held here, so its id cannot
            # be recycled; no version check: inference tensors have no version counter).
            bias = last[3]
        else:
            bias = key_padding_bias(mask, L, batch)
            self._last_mask = (mask, L, batch, bias) if bias is not None else None
        if bias is None:
            self._warn_once("mask_shape", f"attention mask of shape {tuple(mask.shape)} is not a key-padding mask "
                            f"over the call's {L} keys; these calls run dense")
            return False, None
        if self._mask_video_zero is None:
            # One host sync per sampling run, on the first masked call: the sparse kernels bias text keys only, so
            # the video part must be zero. The model builds every step's mask the same way (HunyuanVideo: zeros on
            # the image tokens, the prompt's padding on the text), so the first one stands for the run; checking
            # every call would stall the GPU at every layer.
            self._mask_video_zero = not bool(bias[:, :video].any())
        if not self._mask_video_zero:
            self._warn_once("mask_video", "the attention mask is not zero on the video tokens; the sparse kernels "
                            "only take a mask on text keys, so masked calls run dense")
            return False, None
        return True, (bias[:, video:] if L > video else None)

    def _traced_text_bias(self, mask: torch.Tensor, L: int, batch: int, video: int):
        """_text_bias inside a model that torch.compile traces: the conversion only. The per-call cache keyed on the
        mask object and the one-time check that the video part is zero are host-side (the check reads the tensor:
        a sync and a graph break), so they are left out; the models that pass such masks (HunyuanVideo) build them
        zero on the video tokens."""
        bias = key_padding_bias(mask, L, batch)
        if bias is None:
            self._warn_once("mask_shape", f"attention mask of shape {tuple(mask.shape)} is not a key-padding mask "
                            f"over the call's {L} keys; these calls run dense")
            return False, None
        return True, (bias[:, video:] if L > video else None)

    def __call__(self, func, *args, **kwargs):
        compiling = is_compiling()
        if compiling and not getattr(self.handler, "traceable", False):
            return _route_untraced(self, func, *args, **kwargs)
        step, grid = self.step, self.grid
        if step is None or grid is None or len(args) < 3:
            self._count_passed()
            return func(*args, **kwargs)
        q, k, v = (_unwrap(a) for a in args[:3])
        args = (q, k, v) + tuple(args[3:])
        heads = kwargs["heads"] if "heads" in kwargs else (args[3] if len(args) > 3 else None)
        mask = kwargs["mask"] if "mask" in kwargs else (args[4] if len(args) > 4 else None)
        skip_reshape = bool(kwargs.get("skip_reshape", False))
        layout = "bhld" if skip_reshape else "bld"
        seq_axis = 2 if skip_reshape else 1
        to = kwargs.get("transformer_options") or {}
        calls = to.get(CALLS_KEY)
        if calls is not None:
            calls[0] += 1
            if calls[0] > 1:  # not the block's self-attention
                self._count_passed()
                return func(*args, **kwargs)
        L = q.shape[seq_axis]
        if k.shape[seq_axis] != L or L < grid.video_tokens or (heads is None and not skip_reshape):
            # cross-attention, a shorter sequence, or a call shape ComfyUI does not use
            self._count_passed()
            return func(*args, **kwargs)
        text = L - grid.video_tokens
        if text and not self.layout.joint_text:
            self._warn_once("extra", f"self-attention over {L} tokens, but the latent has {grid.video_tokens}; "
                            "these calls run dense (does the workflow add reference tokens?)")
            self._count_passed()
            return func(*args, **kwargs)
        text_bias = None
        if mask is not None:
            usable, text_bias = self._text_bias(mask, L, q.shape[0], grid.video_tokens)
            if not usable:
                self._count_passed()
                return func(*args, **kwargs)
        layer = self.layer_of(to)
        if layer is None or not (0 <= layer < self.signature.num_layers):
            self._warn_once("layer", f"attention call without a usable layer index ({layer}); it runs dense")
            self._count_passed()
            return func(*args, **kwargs)
        H = q.shape[1] if skip_reshape else int(heads)
        # A traced call (torch.compile) reads no per-step value: the graph is recorded once and replayed every step
        # (kernels/ops.py); the runner takes its per-step facts from tensors prepared outside the compiled model.
        call = AttentionCall(q=q, k=k, v=v, layout=layout, heads=H, layer=layer,
                             sigma=float("nan") if compiling else step.sigma, grid=self._call_grid(text),
                             positive_rows=None if compiling else step.positive_rows,
                             dense=lambda: _as_layout(func(*args, **kwargs), layout, H), text_bias=text_bias)
        out = self.handler(call)
        if not compiling:
            self.routed += 1
        return _to_output_layout(out, layout, bool(kwargs.get("skip_output_reshape", False)), H)


@torch.compiler.disable
def _route_untraced(router: AttentionRouter, func, *args, **kwargs):
    # A handler that torch.compile cannot trace (the calibrator: host-side statistics and vote counters) runs
    # eagerly: a graph break at each attention call, but every step sees its own sigma and state.
    return router(func, *args, **kwargs)


def key_padding_bias(mask: torch.Tensor, L: int, batch: int) -> Optional[torch.Tensor]:
    """A float32 (Bb, L) additive key bias (Bb = 1 or batch) if `mask` is a key-padding mask over L keys in one of
    the shapes ComfyUI's attention backends broadcast that way: (L,), (1, L), (Bb, 1, L), (Bb, 1, 1, L); else None.
    A boolean mask (True = attend) becomes 0 / -inf. Shape logic and an elementwise cast only: no host sync."""
    if not isinstance(mask, torch.Tensor):
        return None
    shape = tuple(mask.shape)
    if shape in ((L,), (1, L)):
        rows = 1
    elif len(shape) in (3, 4) and shape[1:] == (1,) * (len(shape) - 2) + (L,) and shape[0] in (1, batch):
        rows = shape[0]
    else:
        return None
    if not (mask.dtype == torch.bool or mask.is_floating_point()):
        return None
    return as_text_bias(mask.reshape(rows, L), batch, L)


def _as_layout(out: torch.Tensor, layout: str, heads: int) -> torch.Tensor:
    """A backend's output in the call's input layout (what AttentionCall.dense promises). Backends differ in
    whether they honour skip_output_reshape (batch-split paths ignore it), so go by the tensor's rank."""
    if layout == "bhld" and out.dim() == 3:
        B, L, C = out.shape
        return out.view(B, L, heads, C // heads).transpose(1, 2)
    if layout == "bld" and out.dim() == 4:
        B, H, L, D = out.shape
        return out.transpose(1, 2).reshape(B, L, H * D)
    return out


def _to_output_layout(out: torch.Tensor, layout: str, skip_output_reshape: bool, heads: int) -> torch.Tensor:
    """ComfyUI backends return (B, H, L, D) with skip_output_reshape, else (B, L, H*D)."""
    return _as_layout(out, "bhld" if skip_output_reshape else "bld", heads)
