"""The attention override: route ComfyUI's self-attention calls to the sparse runner (or the calibrator).

ComfyUI calls `override(func, *args, **kwargs)` for every attention of the patched model, with `func` the dense
backend that would have run. Self-attention over exactly this latent's tokens in a covered layer becomes an
AttentionCall for the handler; everything else (cross-attention, text refiners, calls before sampling started,
sequences with extra tokens) goes to `func` unchanged. A key-padding mask over the text keys of a joint-text model
(HunyuanVideo's padded prompt) becomes the call's text bias; any other mask runs dense.

Where the text tokens of a joint-text call sit (before or after the video) is read from what the host says, never
assumed: ComfyUI's `img_slice`, the padding mask's layout, the RoPE table the blocks share, or, for a family whose
code fixes the order and exposes nothing (Mochi), the family table. A call whose layout cannot be established, or
whose sources disagree, runs dense with one warning. No ComfyUI import here: the wrappers and block patches in
comfy_glue feed the per-sampling, per-step and per-block facts in, so the routing is testable with plain tensors.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..kernels.call import AttentionCall
from ..kernels.layouts import as_layout
from ..kernels.ops import is_compiling
from ..kernels.text_bias import as_text_bias
from ..masks.geometry import ModelSignature, TokenGrid
from ..masks.sigmas import SigmaSteps, schedule_fraction, schedule_steps
from .model_info import FamilyLayout, grid_from_latent, layer_offset

log = logging.getLogger("calibatt")

# transformer_options keys our per-block "dit" patches set: the layer index (ComfyUI versions without
# block_index), and a per-block call counter. In every supported block the self-attention is the block's first
# attention call (Wan and LTX-Video run cross-attention after it), which separates it from a cross-attention whose
# text happens to have as many tokens as the video.
LAYER_KEY = "calibatt_layer"
CALLS_KEY = "calibatt_calls"

TEXT_FIRST, TEXT_LAST = "start", "end"  # TokenGrid.text_position of a joint-text call
_SAYS = {TEXT_FIRST: "text first", TEXT_LAST: "text last"}


@dataclass
class StepState:
    sigma: float
    step_fraction: Optional[float]
    positive_rows: Optional[list]


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
        self._steps: Optional[SigmaSteps] = None  # the schedule's steps (sigma -> step index), per sampling run
        self.step: Optional[StepState] = None
        self._grids: dict = {}
        self._warned: set = set()
        # Per sampling run, each read at most once (one host read each): the text position the first key-padding
        # mask shows ("start", "end", "any" = zero everywhere, "bad" = not zero on the video in either order), and
        # the one the blocks' RoPE table shows ("start", "end" or "unknown", with the reason).
        self._mask_position: Optional[str] = None
        self._rope_position: Optional[str] = None
        self._rope_problem = ""
        self._block_pe: Optional[torch.Tensor] = None  # this evaluation's RoPE table, until it has been read
        self._run_said: dict = {}  # source -> text position, every fact a routed call of this run relied on
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
        _compile_helpers()
        self.grid = grid_from_latent(self.layout, latent_shape)
        self.sample_sigmas = [float(s) for s in sample_sigmas]
        self._steps = schedule_steps(self.sample_sigmas) if len(self.sample_sigmas) >= 2 else None
        self._grids = {}
        self.step = None
        self._reset_run_facts()
        return self.grid

    def _reset_run_facts(self):
        self._mask_position = None
        self._rope_position = None
        self._rope_problem = ""
        self._block_pe = None
        self._run_said = {}
        self._last_mask = None

    def begin_model_call(self, sigma: float, cond_or_uncond, batch: int, device) -> StepState:
        _compile_helpers()
        frac = None
        if self._steps is not None:
            frac = schedule_fraction(self._steps, sigma)
        self.step = StepState(float(sigma), frac, positive_rows(cond_or_uncond, batch))
        if self.step_hook is not None:
            self.step_hook(self.step.sigma, device, frac)
        return self.step

    def end_model_call(self):
        self.step = None
        self._last_mask = None
        self._block_pe = None

    def end_sampling(self):
        self.grid = None
        self.step = None
        self._reset_run_facts()
        self.sample_sigmas = []
        self._steps = None

    def note_block(self, args: dict):
        """Our per-block patch calls this before each block runs with the block's arguments. A joint-text model
        whose family does not fix the text position hands its blocks a RoPE table (`pe`; HunyuanVideo computes it
        once per evaluation from the token ids, in attention order, and shares it between double and single
        blocks): keep a reference, read only if a call carries no other layout fact (once per sampling run)."""
        if is_compiling():
            return  # a traced model: the table is a graph value, never read (see _traced_text_position)
        if (self.step is not None and self._rope_position is None and self.layout.joint_text
                and self.layout.text_position is None):
            pe = args.get("pe") if isinstance(args, dict) else None
            if isinstance(pe, torch.Tensor):
                self._block_pe = pe

    # ---- per attention call -------------------------------------------------------------------------------
    def layer_of(self, transformer_options: dict) -> Optional[int]:
        """Our layer index: ComfyUI's block_index (+ the double blocks before a single block) where the host sets
        it (newer ComfyUI), else the one our per-block patch put in (ComfyUI 0.3.x). None when neither is there,
        or when both are and disagree (a stale block_index would put masks on the wrong layer)."""
        ours = transformer_options.get(LAYER_KEY)
        if "block_index" not in transformer_options:
            return None if ours is None else int(ours)
        host = int(transformer_options["block_index"]) + layer_offset(
            self.layout, self.cfg, transformer_options.get("block_type"))
        if ours is not None and int(ours) != host:
            self._warn_once("layer_mismatch", f"ComfyUI's block_index says layer {host}, the block being run is "
                            f"layer {int(ours)}; these calls run dense")
            return None
        return host

    def _count_passed(self):
        # Counters are host state: a traced call (torch.compile) must not write them (dynamo would guard on the
        # value, or, under ComfyUI's guard filter, write back the value seen when tracing). The routed calls of a
        # compiled model are counted by the op when it runs (kernels/ops.py, op_runs).
        if not is_compiling():
            self.passed += 1

    def _call_grid(self, text_tokens: int, position: str) -> TokenGrid:
        # No cache while tracing (torch.compile): the write would be replayed every step, and begin_sampling's fresh
        # dict would fail a guard on its contents at the next sampling run.
        compiling = is_compiling()
        g = None if compiling else self._grids.get((text_tokens, position))
        if g is None:
            v = self.grid
            g = TokenGrid(v.frames, v.height, v.width, v.patch, v.order, text_tokens,
                          position if text_tokens else "none", v.vae_stride)
            if not compiling:
                self._grids[(text_tokens, position)] = g
        return g

    def _warn_once(self, key, msg):
        if is_compiling():
            if "warn" in _COMPILE_HELPERS:
                _COMPILE_HELPERS["warn"](self.name, key, msg)
            return
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s: %s", self.name, msg)

    def _key_bias(self, mask: torch.Tensor, L: int, batch: int) -> Optional[torch.Tensor]:
        """The (Bb, L) additive key bias of a call's mask, or None (dense, with a warning) when the model has no
        joint text or the mask is not a key-padding mask over exactly the call's L keys."""
        if not self.layout.joint_text:
            self._warn_once("mask", "attention calls with a mask run dense (this model has no joint text tokens)")
            return None
        if is_compiling():
            # Traced: no cache keyed on the mask object (a value read while tracing would be replayed every step).
            bias = key_padding_bias(mask, L, batch)
            if bias is None:
                self._warn_once("mask_shape", f"attention mask of shape {tuple(mask.shape)} is not a key-padding "
                                f"mask over the call's {L} keys; these calls run dense")
            return bias
        last = self._last_mask
        if last is not None and last[0] is mask and last[1:3] == (L, batch):
            # The model hands every block the same mask object within one evaluation (held here, so its id cannot
            # be recycled; no version check: inference tensors have no version counter).
            return last[3]
        bias = key_padding_bias(mask, L, batch)
        self._last_mask = (mask, L, batch, bias) if bias is not None else None
        if bias is None:
            self._warn_once("mask_shape", f"attention mask of shape {tuple(mask.shape)} is not a key-padding mask "
                            f"over the call's {L} keys; these calls run dense")
        return bias

    def _mask_says(self, bias: torch.Tensor, video: int) -> str:
        """Where the first key-padding mask of the sampling run puts the text: the video part must be zero (the
        sparse kernels bias text keys only). One host read per run: the model builds every evaluation's mask the
        same way (HunyuanVideo: zeros on the image tokens, the prompt's padding on the text), so the first stands
        for the run; reading every call would stall the GPU at every layer."""
        if self._mask_position is None:
            L = bias.shape[-1]
            # Is anything set on the last `video` keys (where the video sits if the text is first), on the first?
            tail, head = torch.stack([bias[:, L - video:].ne(0).any(), bias[:, :video].ne(0).any()]).tolist()
            self._mask_position = {(False, True): TEXT_FIRST, (True, False): TEXT_LAST,
                                   (False, False): "any", (True, True): "bad"}[(tail, head)]
        return self._mask_position

    def _rope_says(self, video: int) -> Optional[str]:
        """The text position the blocks' RoPE table shows (read once per sampling run, on first need), or None."""
        if self._rope_position is None:
            if self._block_pe is None:
                return None
            pos, why = rope_text_position(self._block_pe, video)
            self._rope_position, self._rope_problem = (pos or "unknown"), why
            self._block_pe = None
        return self._rope_position if self._rope_position in _SAYS else None

    def _call_facts(self, to: dict, L: int, video: int) -> Optional[dict]:
        """{source: "start" | "end"} from the facts that are plain Python values of the call: ComfyUI's img_slice
        and the family's model code. None (one warning; the call runs dense) when img_slice does not describe this
        call's video tokens."""
        said = {}
        if "img_slice" in to:
            pos, why = slice_text_position(to["img_slice"], L, video)
            if pos is None:
                self._warn_once("img_slice", f"{why}; these calls run dense")
                return None
            said["ComfyUI's img_slice"] = pos
        if self.layout.text_position is not None:
            said[f"the {self.layout.family} model code"] = self.layout.text_position
        return said

    def _traced_text_position(self, to: dict, L: int, video: int) -> Optional[str]:
        """_text_position inside a model torch.compile traces: only the facts that are Python values of the call
        (ComfyUI's img_slice, the family table). The mask and the RoPE table are graph values there: reading them is
        a host sync and a graph break, and a position learnt from them would be stored on the router, which the
        traced code must not read (a guard per step, or under ComfyUI 0.19's guard filter a stale value). A call with
        neither fact runs dense (HunyuanVideo's double blocks; its single blocks carry img_slice on ComfyUI 0.19+);
        the video part of a key-padding mask is not checked."""
        said = self._call_facts(to, L, video)
        if said is None:
            return None
        if len(set(said.values())) != 1:
            self._warn_once("traced_position", f"in a compiled model (torch.compile) the position of the {L - video} "
                            f"text tokens of a {L}-token self-attention call is only read from ComfyUI's img_slice "
                            "or the family's model code, and "
                            + ("neither is there" if not said else "they disagree") + "; these calls run dense")
            return None
        return next(iter(said.values()))

    def _text_position(self, to: dict, bias: Optional[torch.Tensor], L: int, video: int) -> Optional[str]:
        """"start" or "end" for a call with L - video > 0 text tokens, from every fact the host gives; None (the
        call runs dense, with one warning naming the reason) when no fact is there or two disagree."""
        if is_compiling():
            return self._traced_text_position(to, L, video)
        said = self._call_facts(to, L, video)
        if said is None:
            return None
        if bias is not None:
            pos = self._mask_says(bias, video)
            if pos == "bad":
                self._warn_once("mask_video", "the attention mask is not zero on the video tokens (with the text "
                                "before or after them); the sparse kernels only take a mask on text keys, so masked "
                                "calls run dense")
                return None
            if pos in _SAYS:
                said["the key-padding mask"] = pos
        if not said or self._rope_position is not None:  # read on first need; once known, a cross-check
            pos = self._rope_says(video)
            if pos is not None:
                said["the RoPE table"] = pos
        if not said:
            why = self._rope_problem or "the blocks hand over no RoPE table"
            self._warn_once("position", f"cannot tell where the {L - video} text tokens of a {L}-token "
                            f"self-attention call sit (no img_slice, no key-padding mask that marks them, and "
                            f"{why}); these calls run dense")
            return None
        # One model puts its text in one place for every block (HunyuanVideo shares one RoPE table between double
        # and single blocks), so every fact of the run must agree, not only those of this call.
        facts = {**self._run_said, **said}
        if len(set(facts.values())) > 1:
            self._warn_once("position_conflict", "the host's layout facts disagree ("
                            + ", ".join(f"{src} says {_SAYS[p]}" for src, p in facts.items())
                            + "); these calls run dense")
            return None
        self._run_said.update(said)
        return next(iter(said.values()))

    def __call__(self, func, *args, **kwargs):
        compiling = is_compiling()
        if compiling and not getattr(self.handler, "traceable", False):
            untraced = _COMPILE_HELPERS.get("untraced")
            # (missing only if this model is traced before any sampling run began: nothing is routed then anyway)
            return untraced(self, func, *args, **kwargs) if untraced is not None else func(*args, **kwargs)
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
        video = grid.video_tokens
        bias = None
        if mask is not None:
            bias = self._key_bias(mask, L, q.shape[0])
            if bias is None:
                self._count_passed()
                return func(*args, **kwargs)
        layer = self.layer_of(to)
        if layer is None or not (0 <= layer < self.signature.num_layers):
            self._warn_once("layer", f"attention call without a usable layer index ({layer}); it runs dense")
            self._count_passed()
            return func(*args, **kwargs)
        position, text_bias = "none", None
        if text:
            position = self._text_position(to, bias, L, video)
            if position is None:
                self._count_passed()
                return func(*args, **kwargs)
            if bias is not None:
                text_bias = bias[:, :text] if position == TEXT_FIRST else bias[:, video:]
        elif bias is not None and not compiling and self._mask_says(bias, video) == "bad":
            self._warn_once("mask_video", "the attention mask is not zero on the video tokens; the sparse kernels "
                            "only take a mask on text keys, so masked calls run dense")
            self._count_passed()
            return func(*args, **kwargs)
        H = q.shape[1] if skip_reshape else int(heads)
        # A traced call (torch.compile) reads no per-step value: the graph is recorded once and replayed every step;
        # the runner's op reads the step's state when it runs (kernels/ops.py).
        call = AttentionCall(q=q, k=k, v=v, layout=layout, heads=H, layer=layer,
                             sigma=float("nan") if compiling else step.sigma, grid=self._call_grid(text, position),
                             positive_rows=None if compiling else step.positive_rows,
                             dense=lambda: as_layout(func(*args, **kwargs), layout, H), text_bias=text_bias)
        out = self.handler(call)
        if not compiling:
            self.routed += 1
        return _to_output_layout(out, layout, bool(kwargs.get("skip_output_reshape", False)), H)


_TRACED_WARNINGS: set = set()
# The two functions a traced call needs, made once torch.compile is loaded (by whoever compiles the model, before
# sampling starts; see _compile_helpers): importing dynamo costs seconds, which importing the package must not.
_COMPILE_HELPERS: dict = {}


def _warn_at_trace(name: str, key: str, msg: str) -> bool:
    # Run while torch.compile traces (assume_constant_result: its result is baked in), never when the graph
    # replays: a compiled model warns when it is compiled. Logging from traced code would be a graph break.
    if (name, key) not in _TRACED_WARNINGS:
        _TRACED_WARNINGS.add((name, key))
        log.warning("%s: %s", name, msg)
    return True


def _route_eagerly(router: AttentionRouter, func, *args, **kwargs):
    # A handler that torch.compile cannot trace (the calibrator: host-side statistics and vote counters) runs
    # eagerly (torch.compiler.disable): a graph break at each attention call, but every step sees its own sigma.
    return router(func, *args, **kwargs)


def _compile_helpers():
    """Make the traced-call helpers if torch.compile has been loaded; cheap when done or when it has not (then no
    model of this process can be compiled yet: torch.compile loads it)."""
    if not _COMPILE_HELPERS and "torch._dynamo" in sys.modules:
        import torch._dynamo
        _COMPILE_HELPERS["warn"] = torch._dynamo.assume_constant_result(_warn_at_trace)
        _COMPILE_HELPERS["untraced"] = torch.compiler.disable(_route_eagerly)


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


def slice_text_position(img_slice, L: int, video: int):
    """(position, "") when ComfyUI's img_slice [a, b) (the image part of a joint sequence, newer ComfyUI's single
    blocks) is exactly this latent's video tokens with all the text on one side of it; (None, why) otherwise."""
    try:
        a, b = (int(x) for x in img_slice)
    except (TypeError, ValueError):
        return None, f"img_slice {img_slice!r} is not a pair of token indices"
    if not (0 <= a <= b <= L) or b - a != video:
        return None, (f"img_slice [{a}, {b}) of a {L}-token self-attention call is not this latent's {video} video "
                      f"tokens (does the workflow add reference tokens?)")
    if b == L:
        return TEXT_FIRST, ""
    if a == 0:
        return TEXT_LAST, ""
    return None, f"img_slice [{a}, {b}) of a {L}-token self-attention call has text on both sides of the video"


def rope_text_position(pe, video: int):
    """(position, "") from a Flux-style RoPE table (B, 1, L, D/2, 2, 2) of a joint sequence of `video` video
    tokens plus text, or (None, why). The table holds one 2x2 rotation per token and frequency, built from the
    token ids in attention order; text ids are zero, so text rows are identity rotations (sin 0), and so is the
    one video token at position (0, 0, 0); every other video token has a nonzero id and so a nonzero sine at
    that axis' lowest frequency (omega 1, integer positions). Text first: the first T rows are identity and no row
    after the first video token is; text last: the last T rows are identity and no video row after the first is.
    One reduction on the device and one host read of two booleans."""
    if not (isinstance(pe, torch.Tensor) and pe.dim() == 6 and tuple(pe.shape[-2:]) == (2, 2)):
        shape = tuple(pe.shape) if isinstance(pe, torch.Tensor) else type(pe).__name__
        return None, f"the blocks' RoPE table ({shape}) is not the (B, 1, L, D/2, 2, 2) table it can be read from"
    L = pe.shape[2]
    text = L - video
    if text <= 0:
        return None, f"the blocks' RoPE table covers {L} tokens, no text beside this latent's {video} video tokens"
    still = pe[0, 0, :, :, 1, 0].abs().amax(-1) == 0  # (L,): rows whose every rotation is the identity
    first = still[:text].all() & ~still[text + 1:].any()
    last = still[video:].all() & ~still[1:video].any()
    first, last = torch.stack([first, last]).tolist()
    if first != last:
        return (TEXT_FIRST if first else TEXT_LAST), ""
    return None, (f"the blocks' RoPE table does not show {text} text tokens (zero ids) on one side of "
                  f"{video} video tokens")


def _to_output_layout(out: torch.Tensor, layout: str, skip_output_reshape: bool, heads: int) -> torch.Tensor:
    """ComfyUI backends return (B, H, L, D) with skip_output_reshape, else (B, L, H*D)."""
    return as_layout(out, "bhld" if skip_output_reshape else "bld", heads)
