"""ComfyUI side of the patch: read the model's facts, install the router on a clone, hook sampling start/steps.

Installed pieces (all on the clone; the input model is never touched):
- transformer_options["optimized_attention_override"]: the AttentionRouter, wrapped in a _RouterOverride whose
  dense fallback is the override that was already there (an attention-backend selector, another sparse
  attention), else ComfyUI's `func` (the global backend);
- one "dit" block patch per transformer block that puts our layer index and a per-block call counter into
  transformer_options (ComfyUI 0.3.x has no block_index; where the host sets one, the router uses the host's
  and checks ours against it) and shows the router the block's arguments (the RoPE table it reads the text
  position from when a call carries no other layout fact); on HunyuanVideo the last double block's result is
  let go when the first single block starts (_HandOff: the host would keep it alive through that block);
- an OUTER_SAMPLE wrapper: once per sampling run it reads the latent shape and the sigma schedule (one host
  copy), checks the bundle fits, and tears down afterwards;
- an APPLY_MODEL wrapper: once per model evaluation it reads the current sigma (transformer_options["sigmas"],
  which the sampler sets, else the timestep; the only host sync per step) and the CFG chunk layout, so attention
  calls themselves never sync; and it puts the router first again in that evaluation's transformer_options when
  a node applied later replaced or wrapped our override (see _front_override for why here and not in an
  ON_PREPARE_STATE callback).
"""

from __future__ import annotations

import logging
import weakref
from typing import Callable, Optional

import comfy.patcher_extension as pe
import torch

from ..kernels.ops import op_runs
from .model_info import FamilyLayout, extra_sequence_inputs
from .routing import CALLS_KEY, LAYER_KEY, AttentionRouter

log = logging.getLogger("calibatt")

WRAPPER_KEY = "calibatt"
OVERRIDE_KEY = "optimized_attention_override"


def describe_model(model) -> dict:
    """The detected unet_config of a ComfyUI MODEL with num_layers / num_heads / dim filled in from the loaded
    diffusion model (configs of some families leave them implicit)."""
    base = model.model
    cfg = dict(getattr(base.model_config, "unet_config", {}) or {})
    dm = base.diffusion_model
    kind = cfg.get("image_model")
    if kind == "wan2.1":
        cfg["num_layers"], cfg["num_heads"], cfg["dim"] = len(dm.blocks), dm.num_heads, dm.dim
    elif kind == "mochi_preview":
        cfg["num_layers"], cfg["num_heads"], cfg["dim"] = len(dm.blocks), dm.num_heads, dm.hidden_size_x
    elif kind == "hunyuan_video":
        cfg["depth"] = len(dm.double_blocks)
        cfg["num_layers"] = len(dm.double_blocks) + len(dm.single_blocks)
        cfg["num_heads"], cfg["dim"] = dm.num_heads, dm.hidden_size
    elif kind == "ltxv":
        attn = dm.transformer_blocks[0].attn1
        cfg["num_layers"], cfg["num_heads"], cfg["dim"] = len(dm.transformer_blocks), attn.heads, \
            attn.heads * attn.dim_head
    return cfg


def block_keys(layout: FamilyLayout, cfg: dict):
    """(block_name, index within its kind, our layer index) for every transformer block."""
    if layout.family == "hunyuan":
        double = int(cfg["depth"])
        return ([("double_block", i, i) for i in range(double)]
                + [("single_block", j, double + j) for j in range(int(cfg["num_layers"]) - double)])
    return [("double_block", i, i) for i in range(int(cfg["num_layers"]))]


class _BlockOut(dict):
    """The result dict our patch hands back for the last double block (a dict subclass so it can be weakly held)."""

    __slots__ = ("__weakref__",)


class _HandOff:
    """Releases the last double block's result once the first single block starts.

    HunyuanVideo's forward_orig keeps the dict a "double_block" patch returned in its loop variable `out` after the
    double blocks: it reads img and txt from it, concatenates them into a new sequence and runs the single blocks,
    and `out` still holds the old video-token activations until the first single-block patch returns (at 720p x 129
    with CFG batch 2: 1.46 GB alive at the step's memory peak). Without any block patch the host frees them at the
    concatenation. By the time the first single block starts the host has read both entries, so our dict is emptied
    then. It is held weakly: an evaluation that stops in between drops it with the host's frame."""

    __slots__ = ("pending",)

    def __init__(self):
        self.pending = None

    def keep(self, result):
        if not isinstance(result, dict):
            return result
        out = _BlockOut(result)  # a copy: a patch below ours that kept its own dict is not touched
        self.pending = weakref.ref(out)
        return out

    def release(self):
        ref, self.pending = self.pending, None
        out = ref() if ref is not None else None
        if out is not None:
            out.clear()


class _LayerTag:
    """dit block patch: show the router the block's arguments, hand the block a transformer_options copy that
    carries our layer index and call counter, then run the block (or the patch that was there before, so other
    block patches keep working). hand_off: "keep" on the last double block of a model with single blocks,
    "release" on its first single block (see _HandOff)."""

    def __init__(self, layer: int, previous: Optional[Callable], router: AttentionRouter,
                 hand_off: Optional[_HandOff] = None, role: Optional[str] = None):
        self.layer = layer
        self.previous = previous
        self.router = router
        self.hand_off = hand_off
        self.role = role

    def __call__(self, args, extra):
        if self.role == "release":
            self.hand_off.release()
        self.router.note_block(args)
        args = dict(args)
        to = dict(args.get("transformer_options") or {})
        to[LAYER_KEY] = self.layer
        to[CALLS_KEY] = [0]
        args["transformer_options"] = to
        if self.previous is not None:
            out = self.previous(args, extra)
        else:
            out = extra["original_block"](args)
        return self.hand_off.keep(out) if self.role == "keep" else out

    def __deepcopy__(self, memo):
        return self


class _Guard:
    """Set while one router handles an attention call; shared by every _RouterOverride made for that router."""

    __slots__ = ("active",)

    def __init__(self):
        self.active = False


class _RouterOverride:
    """The router as ComfyUI's `optimized_attention_override(func, *args, **kwargs)`. Its dense fallback is
    `below`, the override that was installed before it (called as below(func, ...)), or ComfyUI's `func` (the
    global attention backend) when there was none.

    One router can sit twice in a chain: install() put it on the clone, a node applied later wrapped it (an override
    that calls the one it replaced for the calls it declines), and the APPLY_MODEL wrapper put the router in front
    again. A call that comes back to the router through that other override's fallback has already been routed, so
    the shared guard sends it straight down instead of routing it a second time."""

    def __init__(self, router: AttentionRouter, below: Optional[Callable], guard: _Guard):
        self.router = router
        self.below = below
        self.guard = guard

    def __call__(self, func, *args, **kwargs):
        below = self.below
        if self.guard.active:
            return func(*args, **kwargs) if below is None else below(func, *args, **kwargs)
        self.guard.active = True
        try:
            if below is None:
                return self.router(func, *args, **kwargs)
            return self.router(lambda *a, **kw: below(func, *a, **kw), *args, **kwargs)
        finally:
            self.guard.active = False

    # model_options are deep-copied on every clone; the copies must stay this object (see AttentionRouter).
    def __deepcopy__(self, memo):
        return self


def _describe(override) -> str:
    name = getattr(override, "__qualname__", None) or type(override).__qualname__
    module = getattr(override, "__module__", None) or type(override).__module__
    return f"{module}.{name}" if module else name


def install(model, router: AttentionRouter, cfg: dict, *, on_begin: Callable = None, on_end: Callable = None):
    """Return a clone of `model` with the router installed. on_begin(grid) runs at the start of every sampling
    run (raise there to stop before the first step); on_end() after it, also on errors and interrupts."""
    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    guard = _Guard()
    to[OVERRIDE_KEY] = _RouterOverride(router, to.get(OVERRIDE_KEY), guard)

    existing = to.get("patches_replace", {}).get("dit", {})
    keys = block_keys(router.layout, cfg)
    # The first single block (HunyuanVideo's): the double block before it keeps the hand-off, it releases it.
    first_single = next((n for n, (name, _, _) in enumerate(keys) if n and name == "single_block"), None)
    hand_off = _HandOff()
    for n, (block_name, index, layer) in enumerate(keys):
        role = None if first_single is None else {first_single - 1: "keep", first_single: "release"}.get(n)
        m.set_model_patch_replace(_LayerTag(layer, existing.get((block_name, index)), router, hand_off, role), "dit",
                                  block_name, index)

    evaluations = [0]  # model evaluations of the current sampling run (for the summary line)
    warned = set()
    front = [None]  # (override we were put in front of, our front object), reused while that override is the same
    announced = [False]  # the "another override is installed" line, once per sampling run

    def _front_override(to: dict):
        """-> (transformer_options with our router first, the override below it or None).

        A node applied after ours may replace the override (attention-backend selectors such as KJNodes' set theirs
        without chaining) or wrap it (ComfyUI's Model Sparse Attention calls the one it wrapped for the calls it
        declines, and re-installs itself on top every step). Here, once per model evaluation, the router is put
        first again in this evaluation's own transformer_options, with whatever was on top as its fallback; the
        override that node installed is kept, below ours. Why here and not in an ON_PREPARE_STATE callback:
        - ComfyUI 0.3.64 and 0.19.3 call ON_PREPARE_STATE callbacks as (patcher, timestep), without the sampling
          run's model_options; the transformer_options the attention calls read are a per-run copy made before
          the first step, which such a callback cannot reach (the patcher's own model_options only affect the
          next run).
        - Newer ComfyUI passes the run's model_options, but two overrides that each re-install themselves on top
          of that per-run dict every step wrap each other once per step: the chain grows without bound. This
          evaluation's dict is built afresh by ComfyUI for every evaluation and dropped after it, so putting ours
          first here never grows anything, and it runs after every ON_PREPARE_STATE callback of the step.
        The dict is copied, not changed in place: callers of apply_model that pass none share a default dict."""
        top = to.get(OVERRIDE_KEY)
        if isinstance(top, _RouterOverride) and top.router is router:
            return to, top.below
        if front[0] is None or front[0][0] is not top:
            front[0] = (top, _RouterOverride(router, top, guard))
        to = dict(to)
        to[OVERRIDE_KEY] = front[0][1]
        return to, top

    def outer_sample(executor, *args, **kwargs):
        noise, sigmas = args[0], args[3]
        routed, passed, compiled = router.routed, router.passed, op_runs()
        evaluations[0] = 0
        announced[0] = False
        try:
            # One host copy of the schedule per sampling run.
            grid = router.begin_sampling(tuple(noise.shape), sigmas.detach().float().cpu().tolist())
            if on_begin is not None:
                on_begin(grid)
            return executor(*args, **kwargs)
        finally:
            router.end_sampling()
            # What the patch did, once per run: a model whose self-attention never reaches the router (a new
            # attention path, a mask the kernels do not take) shows up here as 0 routed calls.
            compiled = op_runs() - compiled
            log.info("%s: %d self-attention calls routed over %d model evaluations (%d layers); %d other attention "
                     "calls ran unchanged", router.name, router.routed - routed + compiled, evaluations[0],
                     router.signature.num_layers, router.passed - passed)
            if compiled:
                log.info("%s: %d of the routed calls ran inside a compiled model (torch.compile); other attention "
                         "calls there are not counted", router.name, compiled)
            if on_end is not None:
                on_end()

    def apply_model(executor, x, t, *args, **kwargs):
        to = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})
        if router.grid is None:
            return executor(x, t, *args, **kwargs)
        evaluations[0] += 1
        extra = extra_sequence_inputs(router.layout, kwargs)
        if extra:
            # Without begin_model_call every attention call of this evaluation runs unchanged (dense).
            if "extra" not in warned:
                warned.add("extra")
                log.warning("%s: the conditioning carries %s, which adds tokens to the video sequence; these model "
                            "evaluations run dense", router.name, ", ".join(extra))
            return executor(x, t, *args, **kwargs)
        if isinstance(to, dict):
            ours, other = _front_override(to)
            if ours is not to:
                if len(args) > 3:
                    args = args[:3] + (ours,) + args[4:]
                else:
                    kwargs["transformer_options"] = ours
                to = ours
            if other is not None and not announced[0]:
                announced[0] = True
                # Not silent: both patches stay active, and this says which one decides first.
                log.info("%s: another attention override is installed (%s); this patch answers each attention call "
                         "first, and the calls it does not route, and its dense steps, go to that override",
                         router.name, _describe(other))
        # The one host read of sigma per model evaluation; all rows of a batch share it. The sampler's own
        # transformer_options["sigmas"] (set in both ComfyUI generations) where present, else the timestep.
        to = to or {}
        sigma = to.get("sigmas")
        sigma = sigma if isinstance(sigma, torch.Tensor) and sigma.numel() else t
        router.begin_model_call(float(sigma.reshape(-1)[0]), to.get("cond_or_uncond"), x.shape[0], x.device)
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            router.end_model_call()

    m.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, outer_sample)
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, WRAPPER_KEY, apply_model)
    return m
