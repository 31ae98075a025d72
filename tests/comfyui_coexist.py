"""Test-only ComfyUI nodes that stand in for attention patches users run next to ours (tests/test_nodes_comfyui_coexist.py).

`COEXIST_NODE_SOURCE` is written into the temporary custom_nodes by the test, never shipped. Each node reports what
it saw once per sampling run as one log line, `CALIBATT-TEST {json}`, which `reports()` reads back.
"""

from __future__ import annotations

import json
import re

COEXIST_NODE_SOURCE = r'''
"""Test-only stand-ins for attention patches that share a model with Patch Model Attention (written by
tests/test_nodes_comfyui_coexist.py into a temporary custom_nodes; never shipped). Each logs one line per sampling
run, "CALIBATT-TEST {json}", with what it saw.

CalibAttTestSparseStandIn reproduces, in its own words, the override chaining of ComfyUI core's "Model Sparse
Attention" node (comfy_extras/nodes_sparse_attention.py in Comfy-Org/ComfyUI, Sept 2026). The real node cannot run
here: it imports comfy_kitchen (its CUDA kernels) and comfy modules newer than the ComfyUI versions under test,
and its kernel needs a GPU. What it does, and what this stand-in does the same way:
- at patch time it puts its override on top of whatever override the model has (install_override);
- a call it declines (a mask, a sequence shorter than min_tokens, q/k/v of different shapes, i.e. cross-attention)
  goes to the override it wrapped, called as previous(func, ...), or to ComfyUI's func when there was none;
- every step it re-installs itself the same way, which does nothing while its own override is on top (it keeps a
  set of the overrides it made), and wraps again when something else is on top.
The upstream node re-installs from an ON_PREPARE_STATE callback, which newer ComfyUI calls with the sampling run's
model_options. ComfyUI 0.3.64 and 0.19.3 call ON_PREPARE_STATE callbacks with (patcher, timestep) only, so the
stand-in also runs the same re-install from a CALC_COND_BATCH wrapper, which those versions call once per step with
that run's model_options, right before ON_PREPARE_STATE. Its kernel is a recording stand-in: exact attention
(PyTorch SDPA), with a record of every call it served.

CalibAttTestBackendOverride stands in for an attention-backend selector such as KJNodes' Sage attention node: it
sets the override without chaining (whatever was there is dropped) and calls its backend for every call; the backend
here is ComfyUI's own func (Sage cannot run on the CPU), and the override records the name of the func it was handed
(the global backend ComfyUI selected, e.g. attention_split under --use-split-cross-attention).

CalibAttTestStepCache stands in for TeaCache / MagCache style model wrappers: a DIFFUSION_MODEL wrapper that skips
every other model evaluation by returning the previous evaluation's output.
"""
import json
import logging

import torch

import comfy.patcher_extension as pe

KEY = "optimized_attention_override"


def _report(kind, tag, **data):
    logging.info("CALIBATT-TEST %s", json.dumps(dict(kind=kind, tag=tag, **data), sort_keys=True))


def _sigma(transformer_options):
    s = (transformer_options or {}).get("sigmas")
    return None if s is None else round(float(s.reshape(-1)[0]), 6)


def _seq_len(x, skip_reshape):
    return x.shape[2] if skip_reshape else x.shape[1]


def _count(d, key):
    d[str(key)] = d.get(str(key), 0) + 1


class _SparsePatch:
    def __init__(self, tag, min_tokens):
        self.tag = tag
        self.min_tokens = min_tokens
        self.installed = set()  # the overrides this patch made (as upstream: "already on top" means one of these)
        self.reset()

    def reset(self):
        self.served = []  # [sigma, tokens] per call the kernel stand-in computed
        self.declined = {}  # reason -> calls handed to previous / func
        self.entries = {}  # sigma -> calls that entered any of this patch's overrides
        self.reinstalls = 0  # overrides made during this sampling run (the patch-time one is not counted)


def _make_override(patch, previous):
    def override(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                 skip_output_reshape=False, **kwargs):
        to = kwargs.get("transformer_options") or {}
        sigma = _sigma(to)
        _count(patch.entries, sigma)

        def decline(reason):
            _count(patch.declined, reason)
            kw = dict(mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                      skip_output_reshape=skip_output_reshape, **kwargs)
            if previous is None:
                return func(q, k, v, heads, **kw)
            return previous(func, q, k, v, heads, **kw)

        if mask is not None:
            return decline("mask")
        tokens = _seq_len(q, skip_reshape)
        if tokens < patch.min_tokens:
            return decline("short")
        if q.shape != k.shape or q.shape != v.shape:
            return decline("cross")
        if skip_reshape:
            qh, kh, vh = q, k, v
        else:
            b, n, c = q.shape
            qh, kh, vh = (t.view(b, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh)
        patch.served.append([sigma, tokens])
        if skip_output_reshape:
            return out
        return out.transpose(1, 2).reshape(out.shape[0], -1, out.shape[1] * out.shape[3])

    return override


def _install_override(patch, transformer_options):
    current = transformer_options.get(KEY)
    if current in patch.installed:
        return
    override = _make_override(patch, current)
    patch.installed.add(override)
    patch.reinstalls += 1
    transformer_options[KEY] = override


class CalibAttTestSparseStandIn:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "tag": ("STRING", {"default": "sparse"}),
                             "min_tokens": ("INT", {"default": 0, "min": 0, "max": 1 << 20})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "testing"

    def patch(self, model, tag, min_tokens):
        patch = _SparsePatch(tag, min_tokens)
        m = model.clone()
        _install_override(patch, m.model_options.setdefault("transformer_options", {}))

        def on_prepare_state(patcher, timestep, model_options=None):
            if model_options is not None:  # newer ComfyUI hands the run's model_options to this callback
                _install_override(patch, model_options.setdefault("transformer_options", {}))

        def calc_cond_batch(executor, *args, **kwargs):
            _install_override(patch, args[-1].setdefault("transformer_options", {}))
            return executor(*args, **kwargs)

        def outer_sample(executor, *args, **kwargs):
            patch.reset()
            try:
                return executor(*args, **kwargs)
            finally:
                _report("sparse", patch.tag, served=patch.served, declined=patch.declined, entries=patch.entries,
                        installed=len(patch.installed), reinstalls=patch.reinstalls)

        m.add_callback_with_key(pe.CallbacksMP.ON_PREPARE_STATE, "calibatt_test_sparse", on_prepare_state)
        m.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, "calibatt_test_sparse", calc_cond_batch)
        m.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, "calibatt_test_sparse", outer_sample)
        return (m,)


class CalibAttTestBackendOverride:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "tag": ("STRING", {"default": "backend"})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "testing"

    def patch(self, model, tag):
        rec = {}

        def reset():
            rec.update(funcs=[], self_calls={}, cross_calls=0)

        def override(func, *args, **kwargs):
            if func.__name__ not in rec["funcs"]:
                rec["funcs"].append(func.__name__)
            q, k = args[0], args[1]
            skip = kwargs.get("skip_reshape", False)
            if _seq_len(q, skip) == _seq_len(k, skip):
                _count(rec["self_calls"], _sigma(kwargs.get("transformer_options")))
            else:
                rec["cross_calls"] += 1
            return func(*args, **kwargs)

        def outer_sample(executor, *args, **kwargs):
            reset()
            try:
                return executor(*args, **kwargs)
            finally:
                _report("backend", tag, **rec)

        reset()
        m = model.clone()
        m.model_options.setdefault("transformer_options", {})[KEY] = override  # replaces, as KJNodes' does
        m.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, "calibatt_test_backend", outer_sample)
        return (m,)


class CalibAttTestStepCache:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "tag": ("STRING", {"default": "cache"})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "testing"

    def patch(self, model, tag):
        state = {}

        def diffusion_model(executor, *args, **kwargs):
            x, last = args[0], state["last"]
            i = state["calls"]
            state["calls"] += 1
            if i % 2 == 1 and last is not None and last.shape == x.shape:
                state["skipped"] += 1
                return last
            out = executor(*args, **kwargs)
            state["last"] = out
            return out

        def outer_sample(executor, *args, **kwargs):
            state.update(calls=0, skipped=0, last=None)
            try:
                return executor(*args, **kwargs)
            finally:
                _report("cache", tag, calls=state["calls"], skipped=state["skipped"])
                state["last"] = None

        m = model.clone()
        m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "calibatt_test_cache", diffusion_model)
        m.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, "calibatt_test_cache", outer_sample)
        return (m,)


NODE_CLASS_MAPPINGS = {"CalibAttTestSparseStandIn": CalibAttTestSparseStandIn,
                       "CalibAttTestBackendOverride": CalibAttTestBackendOverride,
                       "CalibAttTestStepCache": CalibAttTestStepCache}
'''

_REPORT = re.compile(r"CALIBATT-TEST (\{.*\})")
SUMMARY = re.compile(r"Patch Model Attention: (\d+) self-attention calls routed over (\d+) model evaluations "
                     r"\((\d+) layers\); (\d+) other attention calls ran unchanged")
EASYCACHE = re.compile(r"(EasyCache|LazyCache) - skipped (\d+)/(\d+) steps")


def reports(log_text: str) -> dict:
    """{tag: report} of the test nodes' lines in a prompt's log."""
    out = {}
    for m in _REPORT.finditer(log_text):
        rep = json.loads(m.group(1))
        assert rep["tag"] not in out, f"two reports for {rep['tag']}: run each tagged node once per prompt"
        out[rep["tag"]] = rep
    return out


def summaries(log_text: str) -> list:
    """[(routed, evaluations, layers, other)] of every Patch Model Attention summary line."""
    return [tuple(int(g) for g in m.groups()) for m in SUMMARY.finditer(log_text)]
