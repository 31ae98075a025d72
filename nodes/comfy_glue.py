"""ComfyUI side of the patch: read the model's facts, install the router on a clone, hook sampling start/steps.

Installed pieces (all on the clone; the input model is never touched):
- transformer_options["optimized_attention_override"]: the AttentionRouter (chained after any override that was
  already there, so e.g. an attention-backend selector stays the dense fallback);
- one "dit" block patch per transformer block that puts our layer index into transformer_options (ComfyUI
  0.3.x has no block_index; newer versions have one and we read either);
- an OUTER_SAMPLE wrapper: once per sampling run it reads the latent shape and the sigma schedule (one host
  copy), checks the bundle fits, and tears down afterwards;
- an APPLY_MODEL wrapper: once per model evaluation it reads the current sigma (the only host sync per step) and
  the CFG chunk layout, so attention calls themselves never sync.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import comfy.patcher_extension as pe

from ..kernels.ops import op_runs
from .model_info import FamilyLayout, extra_sequence_inputs
from .routing import CALLS_KEY, LAYER_KEY, AttentionRouter

log = logging.getLogger("calibatt")

WRAPPER_KEY = "calibatt"


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


class _LayerTag:
    """dit block patch: hand the block a transformer_options copy that carries our layer index, then run the
    block (or the patch that was there before, so other block patches keep working)."""

    def __init__(self, layer: int, previous: Optional[Callable]):
        self.layer = layer
        self.previous = previous

    def __call__(self, args, extra):
        args = dict(args)
        to = dict(args.get("transformer_options") or {})
        to[LAYER_KEY] = self.layer
        to[CALLS_KEY] = [0]
        args["transformer_options"] = to
        if self.previous is not None:
            return self.previous(args, extra)
        return extra["original_block"](args)

    def __deepcopy__(self, memo):
        return self


class _ChainedOverride:
    """Our router first; its dense fallback is the override that was installed before ours."""

    def __init__(self, router: AttentionRouter, previous: Callable):
        self.router = router
        self.previous = previous

    def __call__(self, func, *args, **kwargs):
        prev = self.previous
        return self.router(lambda *a, **kw: prev(func, *a, **kw), *args, **kwargs)

    def __deepcopy__(self, memo):
        return self


def install(model, router: AttentionRouter, cfg: dict, *, on_begin: Callable = None, on_end: Callable = None):
    """Return a clone of `model` with the router installed. on_begin(grid) runs at the start of every sampling
    run (raise there to stop before the first step); on_end() after it, also on errors and interrupts."""
    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    previous = to.get("optimized_attention_override")
    to["optimized_attention_override"] = router if previous is None else _ChainedOverride(router, previous)

    existing = to.get("patches_replace", {}).get("dit", {})
    for block_name, index, layer in block_keys(router.layout, cfg):
        m.set_model_patch_replace(_LayerTag(layer, existing.get((block_name, index))), "dit", block_name, index)

    evaluations = [0]  # model evaluations of the current sampling run (for the summary line)
    warned = set()

    def outer_sample(executor, *args, **kwargs):
        noise, sigmas = args[0], args[3]
        routed, passed, compiled = router.routed, router.passed, op_runs()
        evaluations[0] = 0
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
        # The one host read of sigma per model evaluation; all rows of a batch share it.
        router.begin_model_call(float(t.reshape(-1)[0]), (to or {}).get("cond_or_uncond"), x.shape[0], x.device)
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            router.end_model_call()

    m.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, outer_sample)
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, WRAPPER_KEY, apply_model)
    return m
