"""ComfyUI side of bench/model_step.py: import a ComfyUI tree, build its own model classes with random weights on the
device, run denoising steps through its sampler (CFGGuider, so the patch's sampling and model wrappers run as in a
workflow), time each model evaluation and each attention call, and the attention overrides the baselines and the
peer need (cuDNN dense, comfy-kitchen's Sol-Attn and INT8 attention).

No code of ComfyUI or comfy-kitchen is copied here; the peer override reproduces the call that ComfyUI core's
"Model Sparse Attention" node (comfy_extras/nodes_sparse_attention.py, Comfy-Org/ComfyUI, September 2026; not in the
0.19.3 tree) makes for a generic model: q/k/v viewed as (B, T, H, 128), ck.sol_attn(tau, topk_ratio, token_aug),
for self-attention calls without a mask and of at least min_tokens tokens; every other call runs the dense backend.
"""

from __future__ import annotations

import gc
import sys
import time

import torch

# Model configurations, in the constructor arguments of ComfyUI's WanModel (what its model detection gives the
# released checkpoints: Wan 2.1 T2V 1.3B and 14B; num_heads = dim / 128).
WAN_COMMON = dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), in_dim=16, out_dim=16, freq_dim=256,
                  text_dim=4096, window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6)
WAN_SIZES = {
    "wan1.3b": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan14b": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # the CPU check: head_dim 32, two blocks
    "tiny": dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2),
}
# width x height x frames in pixels; ComfyUI's empty Wan latent is [1, 16, (f - 1) / 4 + 1, h / 8, w / 8]
VIDEOS = {"480p": (832, 480, 81), "720p": (1280, 720, 81), "tiny": (128, 64, 9)}


class Comfy:
    """The imported ComfyUI modules (a namespace, so the bench never imports ComfyUI at module import time)."""


def import_comfy(path: str, cpu: bool) -> Comfy:
    if path not in sys.path:
        sys.path.append(path)  # appended: ComfyUI's top-level names (utils, app, ...) shadow nothing of ours
    aliased = _tokenizer_aliases()
    import comfy.cli_args

    if cpu:
        comfy.cli_args.args.cpu = True  # read once by model_management at import, as `main.py --cpu` would set it
    else:
        # `--highvram`: the whole model stays resident and is always loaded whole (no partial, cast-per-layer loading
        # decided from a free-memory estimate): the bench times steps, not ComfyUI's memory manager. On a 141 GB GPU
        # ComfyUI's normal mode loads these models whole too.
        comfy.cli_args.args.highvram = True
    import comfy.ldm.wan.model
    import comfy.model_management
    import comfy.model_patcher
    import comfy.patcher_extension
    import comfy.samplers
    import comfy.supported_models
    import comfyui_version

    c = Comfy()
    c.mm, c.model_patcher, c.pe = comfy.model_management, comfy.model_patcher, comfy.patcher_extension
    c.samplers, c.supported_models, c.wan = comfy.samplers, comfy.supported_models, comfy.ldm.wan.model
    c.version = getattr(comfyui_version, "__version__", "unknown")
    c.aliased = aliased
    return c


def _tokenizer_aliases() -> list:
    """ComfyUI 0.19.3 imports tokenizer classes by name at module import (comfy.supported_models -> sd1_clip, text
    encoders), e.g. T5TokenizerFast, LlamaTokenizerFast; transformers 5 may spell some without "Fast". The bench
    builds no text encoder, so a missing "*Fast" name is pointed at its plain class rather than failing the import.
    Returns the names so aliased (recorded in the JSON)."""
    try:
        import transformers
    except Exception:  # noqa: BLE001 - ComfyUI's own import will report it
        return []
    done = []
    for name in ("T5TokenizerFast", "LlamaTokenizerFast", "CLIPTokenizerFast"):
        try:
            getattr(transformers, name)
        except Exception:  # noqa: BLE001 - absent (AttributeError) or failing lazy import
            plain = getattr(transformers, name[:-len("Fast")], None)
            if plain is not None:
                setattr(transformers, name, plain)
                done.append(name)
    return done


def randomize_(module: torch.nn.Module, seed: int):
    """Random weights in place on their device: matrices N(0, 1/fan_in), norm scales 1, other vectors N(0, 0.02^2),
    so activations stay O(1) through the blocks (finite in bf16; the JSON records whether outputs were finite)."""
    dev = next(module.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, (p[0].numel()) ** -0.5, generator=g)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)


def build_wan(c: Comfy, size: str, device, dtype, seed: int = 0):
    """A ModelPatcher around ComfyUI's WAN21 (model_base) / WanModel, built as its loader builds one but directly on
    `device` (ComfyUI's ops skip the weight init, so nothing is computed before the random fill) and never offloaded
    (offload device = load device: the bench measures steps, not ComfyUI's memory manager)."""
    cfg = dict(WAN_COMMON, **WAN_SIZES[size])
    mc = c.supported_models.WAN21_T2V(cfg)
    mc.set_inference_dtype(dtype, None)
    base = mc.get_model({}, "", device=device)
    randomize_(base.diffusion_model, seed)
    weights = sum(p.numel() * p.element_size() for p in base.diffusion_model.parameters())
    patcher = c.model_patcher.ModelPatcher(base, load_device=torch.device(device), offload_device=torch.device(device))
    return patcher, weights


def release(c: Comfy):
    """After the caller dropped its references to a model: ComfyUI's loaded-model list holds the patchers too, so
    unload them there, then return the memory before the next model is built."""
    try:
        c.mm.unload_all_models()
    except Exception:  # noqa: BLE001 - best effort between models; the next build reports a real failure
        pass
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------- timing
class StepTimer:
    """APPLY_MODEL wrapper, added to the base model before any patch so it is the outermost one (ComfyUI runs the
    wrappers in the order their keys were added): per model evaluation its GPU time (CUDA events, after a sync, so
    the window holds this evaluation only and the host's launch gaps count), wall time, batch, peak allocation and
    the attention calls' times from AttentionTimer. Keeps the first evaluation's output (same inputs in every case)
    for the comparison with dense."""

    KEY = "calibatt_model_step_timer"

    def __init__(self, cuda: bool, attention):
        self.cuda, self.attention = cuda, attention
        self.records, self.first_output = [], None

    def reset(self):
        self.records, self.first_output = [], None

    def __call__(self, executor, x, t, *args, **kwargs):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
        self.attention.begin()
        w0 = time.perf_counter()
        out = executor(x, t, *args, **kwargs)
        if self.cuda:
            e1.record()
            e1.synchronize()
            ms = e0.elapsed_time(e1)
        wall = (time.perf_counter() - w0) * 1e3
        attn = self.attention.end()
        rec = {"ms": round(ms if self.cuda else wall, 3), "wall_ms": round(wall, 3), "batch": int(x.shape[0]),
               "sigma": round(float(t.reshape(-1)[0]), 5), **attn}
        if self.cuda:
            rec["peak_bytes"] = torch.cuda.max_memory_allocated()
            rec["start_bytes"] = base
        rec["finite"] = bool(torch.isfinite(out).all())
        if self.first_output is None:
            self.first_output = out.detach().float().cpu()
        self.records.append(rec)
        return out


class AttentionTimer:
    """Stands in for the `optimized_attention` that ComfyUI's Wan blocks call (a module global of
    comfy.ldm.wan.model) and times every call around it: whatever answers (ComfyUI's backend, an override, this
    package's router) is inside the window. Self-attention = as many keys as queries."""

    def __init__(self, inner, cuda: bool):
        self.inner, self.cuda = inner, cuda
        self._events = None

    def begin(self):
        self._events = []

    def end(self) -> dict:
        ev, self._events = self._events or [], None
        out = {"self_attn_ms": 0.0, "cross_attn_ms": 0.0, "self_attn_calls": 0, "cross_attn_calls": 0}
        for kind, a, b in ev:
            ms = a.elapsed_time(b) if self.cuda else (b - a) * 1e3
            out[f"{kind}_ms"] += ms
            out[f"{kind}_calls"] += 1
        out["self_attn_ms"] = round(out["self_attn_ms"], 3)
        out["cross_attn_ms"] = round(out["cross_attn_ms"], 3)
        return out

    def __call__(self, q, k, v, *args, **kwargs):
        if self._events is None:
            return self.inner(q, k, v, *args, **kwargs)
        kind = "self_attn" if q.shape[-2 if kwargs.get("skip_reshape") else 1] == \
            k.shape[-2 if kwargs.get("skip_reshape") else 1] else "cross_attn"
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = self.inner(q, k, v, *args, **kwargs)
            b.record()
        else:
            a = time.perf_counter()
            out = self.inner(q, k, v, *args, **kwargs)
            b = time.perf_counter()
        self._events.append((kind, a, b))
        return out


def install_timers(c: Comfy, patcher, cuda: bool) -> StepTimer:
    attention = c.wan.optimized_attention
    if not isinstance(attention, AttentionTimer):  # once per process: later models share it
        attention = AttentionTimer(attention, cuda)
        c.wan.optimized_attention = attention  # the Wan blocks look the name up at each call
    timer = StepTimer(cuda, attention)
    patcher.add_wrapper_with_key(c.pe.WrappersMP.APPLY_MODEL, StepTimer.KEY, timer)
    return timer


def run_steps(c: Comfy, model, latent_shape, evaluations: int, pos, neg, seed: int, cfg: float = 5.0):
    """One sampling run of `evaluations` Euler steps (each one model evaluation of the CFG batch) through ComfyUI's
    CFGGuider, under inference mode as ComfyUI's executor runs nodes. Sigmas 0.9 -> 0.6: inside one bundle bucket,
    and the same first evaluation input in every case."""
    guider = c.samplers.CFGGuider(model)
    guider.set_conds(pos, neg)
    guider.set_cfg(cfg)
    sampler = c.samplers.sampler_object("euler")
    sig = torch.linspace(0.9, 0.6, evaluations).tolist() + [0.0]
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(latent_shape, generator=gen)
    latent = torch.zeros(latent_shape)
    with torch.inference_mode():
        return guider.sample(noise, latent, sampler, torch.tensor(sig), disable_pbar=True, seed=seed)


def conditioning(text_tokens: int, seed: int):
    """Random T5-shaped (umt5-xxl, 4096 wide) positive and negative CONDITIONING, as the text encoder hands them."""
    g = torch.Generator().manual_seed(seed)
    return ([[torch.randn(1, text_tokens, 4096, generator=g), {}]],
            [[torch.randn(1, text_tokens, 4096, generator=g), {}]])


# ---------------------------------------------------------------------------------------------------- overrides
def _bthd(q, k, v, heads, skip_reshape):
    if skip_reshape:
        return tuple(t.transpose(1, 2) for t in (q, k, v)), q.shape[-1]
    b, n, hd = q.shape
    return tuple(t.view(b, -1, heads, hd // heads) for t in (q, k, v)), hd // heads


def _out(out_bthd, skip_output_reshape):
    if skip_output_reshape:
        return out_bthd.transpose(1, 2)
    b, n, h, d = out_bthd.shape
    return out_bthd.reshape(b, n, h * d)


class SelfAttentionOverride:
    """ComfyUI optimized_attention_override that sends self-attention calls without a mask (as many keys as queries,
    at least min_tokens) to `kernel(q, k, v)` on (B, T, H, D) views and everything else to the dense backend."""

    def __init__(self, kernel, min_tokens: int = 0):
        self.kernel, self.min_tokens = kernel, min_tokens

    def __call__(self, func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                 skip_output_reshape=False, **kwargs):
        seq = 2 if skip_reshape else 1
        if mask is not None or q.shape[seq] != k.shape[seq] or q.shape[seq] < self.min_tokens:
            return func(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                        skip_output_reshape=skip_output_reshape, **kwargs)
        (qs, ks, vs), _ = _bthd(q, k, v, heads, skip_reshape)
        return _out(self.kernel(qs, ks, vs).to(q.dtype), skip_output_reshape)

    def __deepcopy__(self, memo):  # model_options are deep-copied on clone
        return self


def cudnn_dense_kernel():
    """The package's dense attention (kernels/dense.py: SDPA with cuDNN first): the baseline the patch's own dense
    routes use and the bound is stated against."""
    from calibatt.kernels.dense import dense_attention

    def run(q, k, v):
        return dense_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return run


def comfy_kitchen_status():
    """(module or None, {available, sol_attn, int8_attention, reason, version})."""
    info = {"sol_attn": False, "int8_attention": False, "reason": None, "version": None}
    try:
        import comfy_kitchen as ck
    except Exception as e:  # noqa: BLE001 - any import failure is a reason to record, not to stop the bench
        info["reason"] = f"import comfy_kitchen failed: {type(e).__name__}: {e}"
        return None, info
    try:
        from importlib.metadata import version
        info["version"] = version("comfy-kitchen")
    except Exception:  # noqa: BLE001
        pass
    try:
        from comfy_kitchen.backends import cuda as ckcuda
        info["cuda_extension"] = bool(getattr(ckcuda, "_EXT_AVAILABLE", False))
        if not info["cuda_extension"]:
            info["reason"] = f"comfy_kitchen CUDA backend did not load: {getattr(ckcuda, '_EXT_ERROR', None)}"
    except Exception as e:  # noqa: BLE001
        info["reason"] = f"comfy_kitchen.backends.cuda: {type(e).__name__}: {e}"
    if not torch.cuda.is_available():
        info["reason"] = info["reason"] or "no CUDA device (the Sol-Attn and INT8 kernels are CUDA-only)"
        return ck, info
    dev = torch.device("cuda")
    info["sol_attn"] = bool(ck.sol_attn_is_available(dev))
    info["int8_attention"] = bool(ck.int8_attention_is_available(dev))
    if not (info["sol_attn"] and info["int8_attention"]) and info["reason"] is None:
        info["reason"] = "comfy_kitchen reports its kernels unavailable on this GPU"
    return ck, info


def sol_attn_kernel(ck, topk_ratio: float, token_aug: int, tau: float = 1.3):
    """Core's call: ck.sol_attn on (B, T, H, 128), SLA-style top-k keeping `topk_ratio` of the key blocks (tau is
    then ignored), no sinks (a plain video model has no conditioning rows in self-attention)."""
    def run(q, k, v):
        return ck.sol_attn(q, k, v, tau=tau, scale=None, sink_blocks=[0, 0], sink_q=[0, 0], topk_ratio=float(topk_ratio),
                           token_aug=int(token_aug))
    return run


def int8_kernel(ck):
    """comfy-kitchen's INT8 dense attention (SageAttention-style) on (B, H, T, D)."""
    def run(q, k, v):
        return ck.int8_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return run


def with_override(patcher, override):
    """A clone with `override` as its attention override (as an attention node would install it)."""
    m = patcher.clone()
    m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
    return m
