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

# Model configurations, in the constructor arguments of ComfyUI's classes at the values its model detection gives
# the released checkpoints (comfy/model_detection.py of 0.19.3): Wan 2.1 T2V 1.3B and 14B (num_heads = dim / 128),
# HunyuanVideo T2V (13B), Mochi 1 preview (10B, detection hard-codes it), LTX-Video 2B (0.9.x: 28 layers, 32 heads
# of 64, cross-attention 2048). "tiny*": the CPU checks (sizes as tests/comfyui_families.py uses).
WAN_COMMON = dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), in_dim=16, out_dim=16, freq_dim=256,
                  text_dim=4096, window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6)
HUNYUAN_COMMON = dict(image_model="hunyuan_video", in_channels=16, out_channels=16, patch_size=[1, 2, 2],
                      vec_in_dim=768, axes_dim=[16, 56, 56], meanflow=False, mlp_ratio=4.0, theta=256, qkv_bias=True,
                      byt5=False, guidance_embed=True, use_cond_type_embedding=False, vision_in_dim=None,
                      meanflow_sum=False)
MOCHI_COMMON = dict(image_model="mochi_preview", patch_size=2, learn_sigma=False, in_channels=12, qk_norm=True,
                    qkv_bias=False, out_bias=True, attn_drop=0.0, patch_embed_bias=True, posenc_preserve_area=True,
                    timestep_mlp_bias=True, attend_to_padding=False, timestep_scale=1000.0, use_t5=True,
                    t5_token_length=256, rope_theta=10000.0)
# name -> (ComfyUI supported_models class, unet_config, text tokens, text width, extra conditioning: a pooled output
# of that width, or "ones": the text encoder's padding mask with every token valid, which Mochi and LTX-Video require)
MODELS = {
    "wan1.3b": ("WAN21_T2V", dict(WAN_COMMON, dim=1536, ffn_dim=8960, num_heads=12, num_layers=30), 512, 4096, {}),
    "wan14b": ("WAN21_T2V", dict(WAN_COMMON, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40), 512, 4096, {}),
    "hunyuan": ("HunyuanVideo", dict(HUNYUAN_COMMON, context_in_dim=4096, hidden_size=3072, num_heads=24, depth=20,
                                     depth_single_blocks=40), 256, 4096, {"pooled_output": 768}),
    "mochi": ("GenmoMochi", dict(MOCHI_COMMON, depth=48, num_heads=24, hidden_size_x=3072, hidden_size_y=1536,
                                 mlp_ratio_x=4.0, mlp_ratio_y=4.0, t5_feat_dim=4096), 256, 4096,
              {"attention_mask": "ones"}),
    "ltxv": ("LTXV", dict(image_model="ltxv", num_layers=28, attention_head_dim=64, cross_attention_dim=2048),
             128, 4096, {"attention_mask": "ones"}),
    # the CPU checks: head_dim 32 (Wan), 128 (HunyuanVideo, fixed by its RoPE axes), 128 (Mochi), 8 (LTX-Video)
    "tiny": ("WAN21_T2V", dict(WAN_COMMON, dim=64, ffn_dim=128, num_heads=2, num_layers=2), 16, 4096, {}),
    "tiny-hunyuan": ("HunyuanVideo", dict(HUNYUAN_COMMON, context_in_dim=64, hidden_size=256, num_heads=2, depth=1,
                                          depth_single_blocks=1), 16, 64, {"pooled_output": 768}),
    "tiny-mochi": ("GenmoMochi", dict(MOCHI_COMMON, depth=2, num_heads=2, hidden_size_x=256, hidden_size_y=128,
                                      mlp_ratio_x=48.0, mlp_ratio_y=2.0, t5_feat_dim=64), 16, 64,
                   {"attention_mask": "ones"}),
    "tiny-ltxv": ("LTXV", dict(image_model="ltxv", num_layers=2, attention_head_dim=8, cross_attention_dim=256,
                               num_attention_heads=32), 16, 4096, {"attention_mask": "ones"}),
}
# width x height x frames in pixels; the latent is what ComfyUI's empty-latent node of the family makes
# (nodes/model_info.latent_shape_for): Wan 480p 21 x 60 x 104, 720p 21 x 90 x 160; HunyuanVideo 720p x 129 frames
# 33 x 90 x 160; Mochi 480p x 163 frames 28 x 60 x 106; LTX-Video 768 x 512 x 121 frames 16 x 16 x 24.
VIDEOS = {"480p": (832, 480, 81), "720p": (1280, 720, 81), "720p129": (1280, 720, 129), "480p163": (848, 480, 163),
          "512p121": (768, 512, 121), "tiny": (128, 64, 9), "tiny13": (128, 64, 13), "tiny17": (256, 128, 17)}
# The modules whose attention call sites the timer wraps (the name each family's blocks look up at call time).
ATTENTION_SITES = (("comfy.ldm.wan.model", "optimized_attention"), ("comfy.ldm.flux.math", "optimized_attention"),
                   ("comfy.ldm.genmo.joint_model.asymm_models_joint", "optimized_attention"),
                   ("comfy.ldm.modules.attention", "optimized_attention"))


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
    import importlib

    import comfy.ldm.wan.model
    import comfy.model_management
    import comfy.model_patcher
    import comfy.patcher_extension
    import comfy.samplers
    import comfy.supported_models
    import comfyui_version

    c = Comfy()
    c.mm, c.model_patcher, c.pe = comfy.model_management, comfy.model_patcher, comfy.patcher_extension
    c.samplers, c.supported_models = comfy.samplers, comfy.supported_models
    c.sites = [importlib.import_module(mod) for mod, _ in ATTENTION_SITES]
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


def unet_config(c: Comfy, name: str) -> dict:
    cls, cfg, *_ = MODELS[name]
    cfg = dict(cfg)
    if cls == "HunyuanVideo":  # only the fields this ComfyUI's HunyuanVideoParams declares (0.3.64 has fewer)
        import dataclasses

        from comfy.ldm.hunyuan_video.model import HunyuanVideoParams
        names = {f.name for f in dataclasses.fields(HunyuanVideoParams)}
        cfg = {k: v for k, v in cfg.items() if k in names or k == "image_model"}
    return cfg


def build(c: Comfy, name: str, device, dtype, seed: int = 0):
    """A ModelPatcher around the family's ComfyUI model (model_base class and its diffusion model), built as its
    loader builds one but directly on `device` (ComfyUI's ops skip the weight init, so nothing is computed before the
    random fill) and never offloaded (offload device = load device: the bench measures steps, not ComfyUI's memory
    manager). -> (patcher, weight bytes)."""
    mc = getattr(c.supported_models, MODELS[name][0])(unet_config(c, name))
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
        self.on_record = None  # called after each evaluation (the calibration run writes its JSON there)

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
        if self.on_record is not None:
            self.on_record(rec)
        return out


class AttentionTimer:
    """Stands in for the `optimized_attention` that a family's blocks call (a module global, ATTENTION_SITES) and
    times every call around it: whatever answers (ComfyUI's backend, an override, this package's router) is inside
    the window. "self_attn": as many keys as queries and at least the latent's video tokens; "cross_attn": the rest
    (cross-attention, text refiners)."""

    def __init__(self, inner, cuda: bool, shared):
        self.inner, self.cuda, self.shared = inner, cuda, shared  # shared: {"events": list or None, "video": int}

    def begin(self):
        self.shared["events"] = []

    def end(self) -> dict:
        ev, self.shared["events"] = self.shared["events"] or [], None
        out = {"self_attn_ms": 0.0, "cross_attn_ms": 0.0, "self_attn_calls": 0, "cross_attn_calls": 0}
        for kind, a, b in ev:
            ms = a.elapsed_time(b) if self.cuda else (b - a) * 1e3
            out[f"{kind}_ms"] += ms
            out[f"{kind}_calls"] += 1
        out["self_attn_ms"] = round(out["self_attn_ms"], 3)
        out["cross_attn_ms"] = round(out["cross_attn_ms"], 3)
        return out

    def __call__(self, q, k, v, *args, **kwargs):
        events = self.shared["events"]
        if events is None:
            return self.inner(q, k, v, *args, **kwargs)
        seq = 2 if kwargs.get("skip_reshape") else 1
        # self-attention over the video (and joint text); a text refiner's self-attention counts as "other"
        kind = "self_attn" if q.shape[seq] == k.shape[seq] >= self.shared["video"] else "cross_attn"
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = self.inner(q, k, v, *args, **kwargs)
            b.record()
        else:
            a = time.perf_counter()
            out = self.inner(q, k, v, *args, **kwargs)
            b = time.perf_counter()
        events.append((kind, a, b))
        return out


def install_timers(c: Comfy, patcher, cuda: bool) -> StepTimer:
    first = getattr(c.sites[0], ATTENTION_SITES[0][1])
    if isinstance(first, AttentionTimer):  # once per process: later models share the wrapped sites
        attention = first
    else:
        shared = {"events": None, "video": 0}
        for mod, (_, attr) in zip(c.sites, ATTENTION_SITES):
            setattr(mod, attr, AttentionTimer(getattr(mod, attr), cuda, shared))
        attention = getattr(c.sites[0], ATTENTION_SITES[0][1])
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


def conditioning(name: str, seed: int):
    """Random positive and negative CONDITIONING shaped as the family's text encoder hands them (umt5-xxl / T5 /
    llava-llama3 hidden states, HunyuanVideo's CLIP-L pooled output); no padded tokens, so every text key counts."""
    _, _, tokens, width, extra = MODELS[name]
    g = torch.Generator().manual_seed(seed)

    def one():
        d = {k: torch.ones(1, tokens, dtype=torch.long) if n == "ones" else torch.randn(1, n, generator=g)
             for k, n in extra.items()}
        return [[torch.randn(1, tokens, width, generator=g), d]]
    return one(), one()


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
        return ck.sol_attn(q, k, v, tau=tau, scale=None, sink_blocks=[0, 0], sink_q=[0, 0],
                           topk_ratio=float(topk_ratio), token_aug=int(token_aug))
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
