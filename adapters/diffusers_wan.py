"""diffusers host adapter: sparse attention or calibration on a `WanTransformer3DModel`, outside ComfyUI.

Installs a processor on every block's self-attention (`attn1`); cross-attention (`attn2`) is left as it is. The
processor repeats diffusers' WanAttnProcessor math (projections, RMS norm, 3D RoPE, output projection; written
against diffusers 0.42.1) and hands the attention itself to a handler through an AttentionCall. Three context
managers install it: `patch_dense(transformer)` (the unpatched math through the same hook, for timing),
`patch_sparse(transformer, bundle)` (SparseRunner on the bundle's skip lists) and
`patch_calibrate(transformer, calibrator)` (Calibrator.observe: dense output plus statistics).

Each context manager restores the exact original processor objects on exit, also after an exception.

Example: calibrate on one prompt, then sample sparse. It runs as written on the shipped tiny diffusers Wan
(tinywan/, imported as `calibatt` like the tests and the demo do; tests/test_adapter_diffusers_wan.py executes it):

    import torch
    from calibatt.adapters.diffusers_wan import patch_calibrate, patch_sparse, wan_grid, wan_signature
    from calibatt.calibration import CalibrationSettings, Calibrator, calibrate
    from calibatt.tinywan.model import load_tinywan

    model = load_tinywan()                      # a diffusers WanTransformer3DModel and its caption encoder
    transformer = model.transformer
    latent = torch.randn(1, 3, 4, 32, 32)       # (B, C, F, H, W); the tiny model works on RGB pixels
    sigmas = [1.0, 0.75, 0.5]                   # the sampler's schedule, noisiest first
    calibrator = Calibrator(wan_signature(transformer), wan_grid(transformer, latent.shape),
                            CalibrationSettings(block_q=64, block_k=64))

    def run_prompt(caption, calibrator):        # one whole denoising run of one prompt
        context = model.text([caption])
        calibrator.set_schedule(sigmas)
        for sigma in sigmas:
            hook.begin_step(sigma)              # a sampling loop says each step's sigma (see "Sigma" below)
            transformer(latent, torch.tensor([sigma * 1000.0]), context)

    with patch_calibrate(transformer, calibrator) as hook, torch.no_grad():
        # A MaskBundle (masks.save_bundle writes it for either host); stats_path= resumes an interrupted run.
        bundle = calibrate(run_prompt, ["a blue circle moving left over a purple checkerboard"], calibrator)
    calibrator.close()
    context = model.text(["a blue circle moving left over a purple checkerboard"])
    with patch_sparse(transformer, bundle), torch.no_grad():
        sparse = transformer(latent, torch.tensor([600.0]), context).sample

`wan_signature` comes from the same builder (masks/signatures.py) as the signature ComfyUI's nodes read off the
same checkpoint, so a bundle calibrated here patches that model in ComfyUI, and the reverse.

Sigma: the hook must know the current sigma once per step (a host float; never read per attention call). Either
the sampling loop says it (`hook.begin_step(sigma, step_fraction, positive_rows)` before the model call), or, for
pipelines that do not, a forward pre-hook reads the `timestep` argument once per transformer forward
(sigma = timestep / timestep_scale, Wan's flow-matching convention; one host read per forward); pass
`schedule=scheduler.sigmas` too when the patch has a dense window, so each step's place in the run is known.

Batched CFG: `positive_rows` names the batch rows of the conditional prompt (calibration observes only those;
the same masks serve every row). diffusers' own WanPipeline runs the two CFG branches as separate forwards; driven
through the timestep pre-hook alone, every row counts as positive, so its negative-prompt forwards are calibrated
too (pass positive_rows=[] via begin_step for those forwards to skip them).
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import torch

from ..kernels.call import AttentionCall
from ..masks.bundle import MaskBundle
from ..masks import signatures
from ..masks.geometry import ModelSignature, TokenGrid
from ..masks.sigmas import SigmaSteps, schedule_fraction, schedule_steps

DIFFUSERS_TESTED = "0.42.1"


def _diffusers_wan():
    try:
        from diffusers.models.transformers import transformer_wan
    except ImportError as e:  # optional dependency: only the demo, the benchmark and these adapters need it
        raise ImportError(f"the diffusers adapter needs diffusers (pip install diffusers=={DIFFUSERS_TESTED}): {e}") \
            from e
    return transformer_wan


def wan_signature(transformer) -> ModelSignature:
    """The bundle signature of a diffusers Wan transformer (the same one ComfyUI's nodes read off the same
    checkpoint: masks/signatures.py)."""
    return wan_signature_from_config(transformer.config)


def wan_signature_from_config(config) -> ModelSignature:
    """wan_signature from a WanTransformer3DModel config (the model's `.config`, or its config.json as a dict)."""
    c = config if isinstance(config, dict) else dict(config)
    missing = [k for k in ("num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "patch_size")
               if c.get(k) is None]
    if missing:
        raise ValueError(f"not a WanTransformer3DModel config: {', '.join(missing)} missing")
    return signatures.wan(num_layers=c["num_layers"], num_heads=c["num_attention_heads"],
                          head_dim=c["attention_head_dim"], in_channels=c["in_channels"],
                          # WanTransformer3DModel's own rule: no out_channels means the input's.
                          out_channels=c.get("out_channels") or c["in_channels"], patch=tuple(c["patch_size"]),
                          # image_dim builds the CLIP image projection (Wan 2.1 I2V / FLF2V).
                          image_embedding=c.get("image_dim") is not None)


def wan_grid(transformer, latent_shape: Sequence[int], vae_stride=(4, 8, 8)) -> TokenGrid:
    """Token grid of a latent (B, C, F, H, W) for this transformer (Wan: no text tokens in self-attention)."""
    pt, ph, pw = (int(p) for p in transformer.config.patch_size)
    _, _, F, H, W = latent_shape
    return TokenGrid(frames=F // pt, height=H // ph, width=W // pw, patch=(pt, ph, pw),
                     vae_stride=tuple(vae_stride))


class AttentionTimer:
    """Time spent in the attention handler. On CUDA: GPU time between CUDA events recorded around each call, with
    no sync per call. While the host runs ahead of the GPU this is the kernels' time; where the host falls behind
    (a small model, or a host stall), it also counts the GPU waiting for the call's launches, which is time the
    run really loses (bench/attention_profile.py separates the two). Reading `seconds` syncs once. On the CPU:
    wall time."""

    def __init__(self):
        self.reset()

    def reset(self):
        self._cpu_seconds = 0.0
        self._events: list = []
        self.calls = 0

    @property
    def seconds(self) -> float:
        if self._events:
            self._events[-1][1].synchronize()
            self._cpu_seconds += sum(a.elapsed_time(b) for a, b in self._events) / 1e3
            self._events = []
        return self._cpu_seconds

    def run(self, fn: Callable, device: torch.device):
        self.calls += 1
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            self._events.append((start, end))
            return out
        t0 = time.perf_counter()
        out = fn()
        self._cpu_seconds += time.perf_counter() - t0
        return out


class _SelfAttentionProcessor:
    """Stands in for WanAttnProcessor on one block's attn1; the attention goes to the hook's handler."""

    def __init__(self, original, layer: int, hook: "WanAttentionHook"):
        self.original = original
        self.layer = layer
        self.hook = hook
        self._tw = _diffusers_wan()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        if encoder_hidden_states is not None or getattr(attn, "add_k_proj", None) is not None or kwargs:
            # Not the self-attention this adapter was written for: the original processor, unchanged.
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        tw = self._tw
        query, key, value = tw._get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _apply_rotary_emb(query, *rotary_emb)
            key = _apply_rotary_emb(key, *rotary_emb)
        original = self.original

        def dense():
            out = tw.dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                           is_causal=False, backend=getattr(original, "_attention_backend", None),
                                           parallel_config=getattr(original, "_parallel_config", None))
            return out.flatten(2, 3)

        hook = self.hook
        if attention_mask is not None:
            out = dense()  # a masked self-attention is not what bundles describe
        else:
            call = AttentionCall(q=query.flatten(2), k=key.flatten(2), v=value.flatten(2), layout="bld",
                                 heads=attn.heads, layer=self.layer, sigma=hook.sigma, grid=hook.grid,
                                 positive_rows=hook.positive_rows, scale=None, dense=dense)
            fn = (lambda: hook.handler(call)) if hook.handler is not None else dense
            out = hook.timer.run(fn, query.device) if hook.timer is not None else fn()
        out = out.type_as(query)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        return out


def _apply_rotary_emb(x, freqs_cos, freqs_sin):
    # diffusers 0.42.1 WanAttnProcessor's rotary embedding, verbatim (the dense path must stay bit-identical).
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanAttentionHook:
    """Context manager that routes a WanTransformer3DModel's self-attention through `handler`.

    handler(call: AttentionCall) -> output in the call's layout; None runs the model's own dense attention
    through the same path (for timing and as the reference). If the handler has begin_step(sigma, device,
    step_fraction), it is called once per step, at the first forward of that step (when the device is known).
    check_grid(grid) is called whenever the latent's token grid changes (before any attention runs).
    schedule: the sampler's sigmas (n + 1, ending where the run ends, as `scheduler.sigmas`; set_schedule() sets
    it later): a step's place in the run is then found from its sigma by the rule every host uses
    (masks.sigmas.schedule_steps), when the loop does not pass it to begin_step. needs_fraction: raise at the first
    forward of a step whose place is unknown (a dense window cannot be honoured without it).
    """

    def __init__(self, transformer, handler: Optional[Callable] = None, *, signature: Optional[ModelSignature] = None,
                 vae_stride=(4, 8, 8), timestep_scale: float = 1000.0,
                 timer: Optional[AttentionTimer] = None, check_grid: Optional[Callable] = None, schedule=None,
                 needs_fraction: bool = False):
        self.transformer = transformer
        self.handler = handler
        self.signature = signature if signature is not None else wan_signature(transformer)
        self.vae_stride = tuple(vae_stride)
        self.timestep_scale = float(timestep_scale)
        self.timer = timer
        self._check_grid = check_grid
        self.sigma: float = 1.0
        self.step_fraction: Optional[float] = None
        self._steps: Optional[SigmaSteps] = None
        if schedule is not None:
            self.set_schedule(schedule)
        self._needs_fraction = bool(needs_fraction)
        self.positive_rows = None
        self.grid: Optional[TokenGrid] = None
        self._explicit = False
        self._begun = None  # (sigma, device) the handler's begin_step last saw
        self._saved = None
        self._pre_hook = None

    # ---- the sampling loop's side -----------------------------------------------------------------------------
    def begin_step(self, sigma: float, step_fraction: Optional[float] = None, positive_rows=None):
        """Tell the hook the sigma of the step about to run (host float), and where it sits in the schedule."""
        self.sigma = float(sigma)
        self.step_fraction = step_fraction
        self.positive_rows = None if positive_rows is None else [int(r) for r in positive_rows]
        self._explicit = True

    def set_schedule(self, sample_sigmas):
        """The sampler's sigmas for the coming run (n + 1 values, the last where the run ends)."""
        s = sample_sigmas.tolist() if torch.is_tensor(sample_sigmas) else list(sample_sigmas)
        if len(s) < 2:
            raise ValueError(f"schedule: expected the sampler's n + 1 sigmas (noisiest first, ending where the run "
                             f"ends, as scheduler.sigmas), got {len(s)} value(s)")
        self._steps = schedule_steps(s)

    # ---- install / restore ------------------------------------------------------------------------------------
    def __enter__(self):
        if self._saved is not None:
            raise RuntimeError("this attention hook is already installed")
        blocks = getattr(self.transformer, "blocks", None)
        if blocks is None:
            raise TypeError(f"expected a diffusers WanTransformer3DModel (with .blocks), got "
                            f"{type(self.transformer).__name__}")
        if len(blocks) != self.signature.num_layers:
            raise ValueError(f"the model has {len(blocks)} blocks; the signature says {self.signature.num_layers}")
        self._saved = [b.attn1.processor for b in blocks]
        try:
            for i, b in enumerate(blocks):
                b.attn1.processor = _SelfAttentionProcessor(self._saved[i], i, self)
            self._pre_hook = self.transformer.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc):
        self._restore()
        end = getattr(self.handler, "end", None)
        if callable(end):
            end()
        return False

    def _restore(self):
        if self._pre_hook is not None:
            self._pre_hook.remove()
            self._pre_hook = None
        if self._saved is not None:
            for b, p in zip(self.transformer.blocks, self._saved):
                b.attn1.processor = p
            self._saved = None
        self._begun = None

    # ---- once per forward -------------------------------------------------------------------------------------
    def _before_forward(self, module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if hidden is None or hidden.dim() != 5:
            raise ValueError("WanAttentionHook: the transformer was called without a 5-D hidden_states latent")
        grid = wan_grid(module, hidden.shape, self.vae_stride)
        if grid != self.grid:
            if self._check_grid is not None:
                self._check_grid(grid)
            self.grid = grid
        if not self._explicit:
            t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            if t is not None:
                # One host read per forward (not per attention call) for pipelines that do not call begin_step.
                self.sigma = float(torch.as_tensor(t).reshape(-1)[0]) / self.timestep_scale
        fraction = self.step_fraction
        if fraction is None and self._steps is not None:
            fraction = schedule_fraction(self._steps, self.sigma)
        if fraction is None and self._needs_fraction:
            raise ValueError("patch_sparse: dense_first / dense_last need each step's place in the run: pass "
                             "schedule=scheduler.sigmas to patch_sparse (or hook.set_schedule before sampling), or "
                             "call hook.begin_step(sigma, step_fraction) before each step")
        begin = getattr(self.handler, "begin_step", None)
        key = (self.sigma, str(hidden.device))
        if callable(begin) and key != self._begun:
            begin(self.sigma, hidden.device, fraction)
            self._begun = key
        return None


def patch_dense(transformer, **kw) -> WanAttentionHook:
    """The model's own attention through the hook (for timing against the sparse path)."""
    return WanAttentionHook(transformer, None, **kw)


def patch_sparse(transformer, bundle: MaskBundle, *, dense_first: float = 0.0, dense_last: float = 0.0,
                     precision: str = "bf16", runner=None, **kw) -> WanAttentionHook:
    """Block-sparse self-attention from `bundle`. Raises masks.BundleError now if the model does not fit the
    bundle, and at the first forward if the latent's token grid does not. `precision`: as Patch Model
    Attention's (kernels/support.py PRECISIONS; 8-bit only on a GPU that has the format). dense_first / dense_last
    need each step's place in the run: pass schedule=scheduler.sigmas (or call the hook's begin_step with it)."""
    from ..kernels.runner import SparseRunner
    hook_probe = WanAttentionHook(transformer, None, **kw)
    bundle.check_compatible(hook_probe.signature, None)
    runner = runner if runner is not None else SparseRunner(bundle, dense_first=dense_first, dense_last=dense_last,
                                                             precision=precision)
    return WanAttentionHook(transformer, runner, check_grid=lambda g: bundle.check_compatible(None, g),
                            needs_fraction=bool(getattr(runner, "dense_first", 0) or getattr(runner, "dense_last", 0)),
                            **kw)


def patch_calibrate(transformer, calibrator, **kw) -> WanAttentionHook:
    """Dense attention plus calibration statistics (Calibrator.observe); drive it with calibration.calibrate, whose
    run_prompt does one denoising run (and calibrator.set_schedule(sample_sigmas))."""
    hook = WanAttentionHook(transformer, calibrator.observe, **kw)
    problems = calibrator.signature.mismatches(hook.signature)
    if problems:
        raise ValueError("the calibrator was made for another model: " + "; ".join(problems))
    return hook
