"""One denoising step of ComfyUI's own video model classes, dense vs patched through this package, beside
comfy-kitchen's Sol-Attn (ComfyUI core's "Model Sparse Attention") and its INT8 dense attention.

What runs: ComfyUI's WanModel (comfy.ldm.wan.model, via model_base.WAN21 and a ModelPatcher) built on the GPU in bf16
with random weights (Wan 2.1 T2V 1.3B / 14B configurations), sampled through ComfyUI's CFGGuider with random
T5-shaped conditioning (512 tokens x 4096), CFG batch 2, Euler steps. Each case is one sampling run of 1 + repeats
model evaluations: the first warms up (Triton compiles, cuDNN plans, the FP8 layer check of the run, the bucket's
tables), the others are timed. Cases:
  dense_cudnn  ComfyUI's model, self-attention through the package's dense attention (SDPA, cuDNN first): the baseline
               of the speedups and of the bound;
  dense_comfy  ComfyUI's model as it runs out of the box (its optimized_attention: SDPA's default dispatch on Linux);
  patched      the model patched as Patch Model Attention patches it (nodes/actions.patch_model_attention; a mirror of
               it that passes SparseRunner(precision=..., dense_cutoff=...) where the node has no such input), with a
               bundle of realistic structure (bench/_model_step_bundles.py) at a target density, precision bf16 or an
               8-bit one of kernels/support.py;
  ck_sol       comfy-kitchen's Sol-Attn, top-k at the bundle's density (the call core's node makes, see
               _model_step_comfy.py), token_aug --ck-extra-tokens (0: pure top-k); ck_sol256 the same plus the 256
               extra routed tokens per query block that core's node sets by default;
  ck_int8      comfy-kitchen's INT8 dense attention.
Per case: best timed step (CUDA events around the model evaluation, outermost APPLY_MODEL wrapper), the time of the
self-attention calls inside it (events around each call), peak allocation during the step and what it adds over
dense_cudnn (absolute and as a share of the weights), the relative L2 distance of the first evaluation's output from
dense_cudnn's (same inputs), speedups, and beside them the bound 1/((1-f)+f*d), f = dense_cudnn's self-attention share
of its step, d = the bundle's density.

GPU (repo root as cwd; no ComfyUI install needed, only a ComfyUI tree and its few extra wheels, see
bench/fetch_bench_wheels.sh):
  python3 -m pip install -q --no-index --no-deps --no-compile --target <site> .benchwheels/*.whl
  export PYTHONPATH=<site>; mkdir -p <dir>; tar xzf .benchcomfy/comfyui-0.19.3.tgz -C <dir>
  PYTHONUNBUFFERED=1 python3 bench/model_step.py --comfyui <dir>/comfyui-0.19.3 --quick
  PYTHONUNBUFFERED=1 python3 bench/model_step.py --comfyui <dir>/comfyui-0.19.3 --calibration-only
where <site> and <dir> are any empty folders.
CPU check (tiny WanModel, the package's reference path; tests/test_model_step_bench.py):
  python3 bench/model_step.py --comfyui PATH --tiny
Writes --json PATH, else model_step.json in the output folder the OUT environment variable names, else
bench/results/model_step.json, after every case, so a run cut short still leaves its results; progress on stderr.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

T_START = time.time()  # the time budget counts from here: imports and model builds included
HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1] / "scripts"))
sys.path.insert(0, str(HERE.parent))
from _pkg import git_commit, load_package  # noqa: E402

load_package()  # before ComfyUI is importable: the package root then registers no nodes
import _model_step_comfy as MC  # noqa: E402
from _data import find_sta_data, load_sta_strategy  # noqa: E402
from _model_step_bundles import realistic_bundle  # noqa: E402

# The cases in the order they run, most important first: a run cut by --budget-s keeps the head of the list. A case is
# (model, video, kind, precision, target density); cases of one model stay together (one model build each). Densities:
# 1.0 (the patch's overhead and memory), ~0.38 (the bundle density of the figures), ~0.25.
def _cases(model, video, spec):
    return [(model, video) + c for c in spec]


QUICK = (
    _cases("wan1.3b", "480p", [("dense_cudnn", None, None), ("patched", "bf16", 0.38), ("patched", "fp8", 0.38),
                               ("ck_sol", None, 0.38), ("patched", "int8", 0.38), ("ck_int8", None, None),
                               ("patched", "bf16", 1.0), ("patched", "bf16", 0.25), ("ck_sol", None, 0.25),
                               ("ck_sol256", None, 0.38), ("dense_comfy", None, None)])
    + _cases("wan14b", "720p", [("dense_cudnn", None, None), ("patched", "bf16", 0.38), ("patched", "fp8", 0.38),
                                ("ck_sol", None, 0.38), ("ck_int8", None, None), ("patched", "int8", 0.38),
                                ("patched", "bf16", 1.0)])
    + _cases("wan14b", "480p", [("dense_cudnn", None, None), ("patched", "bf16", 0.38), ("patched", "fp8", 0.38),
                                ("ck_sol", None, 0.38)])
    + _cases("wan14b", "720p", [("patched", "bf16", 0.25), ("ck_sol", None, 0.25), ("ck_sol256", None, 0.38),
                                ("dense_comfy", None, None)])
    + _cases("wan14b", "480p", [("ck_int8", None, None), ("dense_comfy", None, None)])
    # LTX-Video (head_dim 64; 6,144 tokens: little to gain, cheap to show)
    + _cases("ltxv", "512p121", [("dense_cudnn", None, None), ("patched", "bf16", 0.38), ("patched", "fp8", 0.38)]))
# Without --quick: every shape with every case, most telling first (a run cut by its budget keeps those); select
# shapes with --models, e.g. --models hunyuan (about 50 s a step: four or five cases fit one 10-minute command).
_FULL_SPEC = [("dense_cudnn", None, None), ("patched", "bf16", 0.38), ("patched", "fp8", 0.38), ("ck_sol", None, 0.38),
              ("ck_int8", None, None), ("patched", "int8", 0.38), ("patched", "bf16", 1.0), ("patched", "bf16", 0.25),
              ("patched", "fp8", 0.25), ("ck_sol", None, 0.25), ("ck_sol256", None, 0.38),
              ("patched", "fp8-qk", 0.38), ("patched", "int8-qk", 0.38), ("dense_comfy", None, None)]
FULL = [c for m, v in (("wan1.3b", "480p"), ("wan1.3b", "720p"), ("wan14b", "720p"), ("wan14b", "480p"),
                       ("hunyuan", "720p129"), ("mochi", "480p163"), ("ltxv", "512p121"))
        for c in _cases(m, v, _FULL_SPEC)]
# The CPU check: dense, the patch at density 1 with every head through the sparse path (dense cutoff 1: the
# reference must reproduce dense), a sparser bundle, and the GPU-only cases (recorded as skipped with the reason).
TINY = _cases("tiny", "tiny", [("dense_cudnn", None, None), ("dense_comfy", None, None), ("patched", "bf16", 1.0),
                               ("patched", "bf16", 0.5), ("patched", "fp8", 0.5), ("ck_sol", None, 0.5),
                               ("ck_int8", None, None)])
# The other families at tiny size (--tiny --models tiny-hunyuan,tiny-mochi,tiny-ltxv)
TINY_FAMILIES = [c for m, v in (("tiny-hunyuan", "tiny"), ("tiny-mochi", "tiny13"), ("tiny-ltxv", "tiny17"))
                 for c in _cases(m, v, [("dense_cudnn", None, None), ("dense_comfy", None, None),
                                        ("patched", "bf16", 1.0), ("patched", "bf16", 0.5)])]
# Rough step-time model for the budget check before a shape's first case: attention 4*B*H*N^2*D per layer plus
# 2*B*N*params for the projections, at an effective 550 TFLOP/s (the H200's bf16 dense rate seen at these shapes).
EFFECTIVE_FLOPS = 550e12
BLOCK = 128
TINY_BLOCK = 16
# Density-1 output of the tiny patched model vs dense: float32 on the CPU, so only summation order differs.
TINY_TOLERANCE = 1e-3


def log(msg):
    print(f"[model_step {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_json(res, path):
    """Atomic (temp file + rename): a run killed mid-write leaves the previous complete file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".model_step.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, path)


def rel_err(a, b):
    if a is None or b is None or a.shape != b.shape:
        return None
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def bound(f, d):
    return 1.0 / ((1.0 - f) + f * d)


# ------------------------------------------------------------------------------------------------ the patch
def patch(model, bundle, precision, dense_cutoff):
    """The model patched as the Patch Model Attention node patches it: its own function where it takes these
    settings, else the same steps with SparseRunner's precision / dense cutoff set (the node's quality input caps
    the cutoff at the measured 0.93, and it has no precision input yet). -> (patched model, runner, router, path)."""
    from calibatt.kernels.runner import SparseRunner
    from calibatt.nodes import actions
    from calibatt.nodes.comfy_glue import OVERRIDE_KEY, describe_model, install
    from calibatt.nodes.model_info import family_layout, signature_from_config, video_grid_for_check
    from calibatt.nodes.routing import AttentionRouter

    params = inspect.signature(actions.patch_model_attention).parameters
    if dense_cutoff is None and (precision == "bf16" or "precision" in params):
        kw = {} if precision == "bf16" else {"precision": precision}
        m = actions.patch_model_attention(model, bundle, **kw)
        how = "nodes.actions.patch_model_attention"
    else:
        cfg = describe_model(model)
        layout, signature = family_layout(cfg), signature_from_config(cfg)
        bundle.check_compatible(signature, None)
        kw = {} if dense_cutoff is None else {"dense_cutoff": dense_cutoff}
        runner = SparseRunner(bundle, precision=precision, **kw)
        router = AttentionRouter(signature, layout, cfg, handler=runner, step_hook=runner.begin_step,
                                 name="Patch Model Attention")

        def on_begin(grid):
            bundle.check_compatible(signature, video_grid_for_check(grid, bundle.grid))
        m = install(model, router, cfg, on_begin=on_begin, on_end=runner.end)
        how = "mirror of nodes.actions.patch_model_attention with SparseRunner(" + ", ".join(
            [f"precision={precision!r}"] + [f"dense_cutoff={dense_cutoff}"] * (dense_cutoff is not None)) + ")"
    router = m.model_options["transformer_options"][OVERRIDE_KEY].router
    return m, router.handler, router, how


# ------------------------------------------------------------------------------------------------ one shape
class Shape:
    def __init__(self, ctx, model_name, video):
        from calibatt.nodes.comfy_glue import describe_model
        from calibatt.nodes.model_info import family_layout, grid_from_latent, latent_shape_for, signature_from_config
        self.model_name, self.video = model_name, video
        self.patcher, self.weights = ctx.model(model_name)
        cfg = describe_model(self.patcher)
        self.layout, self.signature = family_layout(cfg), signature_from_config(cfg)
        w, h, f = MC.VIDEOS[video]
        self.latent_shape = latent_shape_for(self.layout, w, h, f)
        self.grid = grid_from_latent(self.layout, self.latent_shape)
        self.text_tokens = MC.MODELS[model_name][2]
        self.pos, self.neg = MC.conditioning(model_name, seed=1)
        self.bundles = {}
        self.dense = None  # the dense_cudnn case's row
        self.dense_output = None
        s = self.signature
        n, L, H, D = self.grid.video_tokens, s.num_layers, s.num_heads, s.head_dim
        flops = L * (4 * 2 * H * n * n * D) + 2 * 2 * n * (self.weights / 2)
        self.estimate_s = flops / EFFECTIVE_FLOPS

    def bundle(self, ctx, target):
        if target not in self.bundles:
            self.bundles[target] = realistic_bundle(
                self.signature, self.grid, ctx.block, target, ctx.strategy, seed=ctx.args.seed,
                source_label=("STA HunyuanVideo windows mapped to the Wan grid" if ctx.strategy is not None
                              else "synthetic STA-like windows (no data file)"))
        return self.bundles[target]

    def describe(self):
        s = self.signature
        return {"model": self.model_name, "video": self.video, "latent": list(self.latent_shape),
                "grid": [self.grid.frames, self.grid.height, self.grid.width], "tokens": self.grid.video_tokens,
                "layers": s.num_layers, "heads": s.num_heads, "head_dim": s.head_dim, "weights_bytes": self.weights,
                "text_tokens": self.text_tokens, "estimated_dense_step_s": round(self.estimate_s, 2)}


class Context:
    def __init__(self, args):
        self.args = args
        self.tiny = args.tiny
        self.cuda = not args.tiny
        if self.cuda and not torch.cuda.is_available():
            raise SystemExit("model_step: no CUDA device; use --tiny for the CPU check")
        self.comfy = MC.import_comfy(args.comfyui, cpu=not self.cuda)
        self.device = self.comfy.mm.get_torch_device() if self.cuda else torch.device("cpu")
        # bf16 as the models ship; float32 on the CPU check, so the density-1 comparison is tight
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.block = TINY_BLOCK if self.tiny else BLOCK
        self.data = find_sta_data(args.data)
        self.strategy = load_sta_strategy(self.data)
        self.ck, self.ck_info = MC.comfy_kitchen_status()
        self._model = (None, None, None, None)
        self.timer = None
        self.t0 = T_START

    def model(self, name):
        if self._model[0] != name:
            if self._model[1] is not None:
                self._model = (None, None, None, None)
                MC.release(self.comfy)  # the caller dropped its shapes of that model first
            log(f"building ComfyUI's {MC.MODELS[name][0]} '{name}' on {self.device} ({self.dtype}), random weights")
            t = time.time()
            patcher, weights = MC.build(self.comfy, name, self.device, self.dtype, seed=self.args.seed)
            self.timer = MC.install_timers(self.comfy, patcher, self.cuda)
            self._model = (name, patcher, weights, round(time.time() - t, 1))
            log(f"  built in {self._model[3]} s, {weights / 1e9:.2f} GB of weights")
        return self._model[1], self._model[2]

    def elapsed(self):
        return time.time() - self.t0

    def model_name(self):
        return self._model[0]


def run_case(ctx, shape, kind, precision, target):
    """-> the case's row (with 'skipped' and the reason where it cannot run here)."""
    a = ctx.args
    row = {"model": shape.model_name, "video": shape.video, "kind": kind, "precision": precision,
           "target_density": target}
    dense_cutoff = None
    model = None
    runner = router = None
    if kind in ("patched", "ck_sol", "ck_sol256"):
        bundle, facts = shape.bundle(ctx, target)
        row["bundle"] = facts
        row["density"] = facts["density"]
    if kind == "dense_cudnn":
        model = MC.with_override(shape.patcher, MC.SelfAttentionOverride(MC.cudnn_dense_kernel()))
    elif kind == "dense_comfy":
        model = shape.patcher
    elif kind == "patched":
        if precision != "bf16" and not ctx.cuda:
            row["skipped"] = f"precision {precision} needs a GPU with 8-bit tensor cores"
            return row
        # The CPU check at density 1: every head through the sparse path (cutoff 1), which must reproduce dense.
        dense_cutoff = 1.0 if (ctx.tiny and target >= 0.999) else None
        model, runner, router, how = patch(shape.patcher, bundle, precision, dense_cutoff)
        row["path"] = how
    elif kind in ("ck_sol", "ck_sol256", "ck_int8"):
        need = "int8_attention" if kind == "ck_int8" else "sol_attn"
        if ctx.ck is None or not ctx.ck_info.get(need):
            row["skipped"] = ctx.ck_info.get("reason") or f"comfy_kitchen {need} unavailable"
            return row
        if kind != "ck_int8":
            if shape.signature.head_dim != 128:
                row["skipped"] = f"Sol-Attn takes head_dim 128 only, the model has {shape.signature.head_dim}"
                return row
            row["topk_ratio"] = row["density"]
            # ck_sol256: plus the 256 extra routed tokens per query block of core's node default (extra_tokens)
            row["token_aug"] = 256 if kind == "ck_sol256" else a.ck_extra_tokens
            kernel = MC.sol_attn_kernel(ctx.ck, row["density"], row["token_aug"])
            # core's node keeps calls under min_tokens (default 12288) dense; every shape here is above it
            model = MC.with_override(shape.patcher, MC.SelfAttentionOverride(kernel, min_tokens=12288))
        else:
            model = MC.with_override(shape.patcher, MC.SelfAttentionOverride(MC.int8_kernel(ctx.ck)))
    repeats = a.repeats
    ctx.timer.reset()
    ctx.timer.attention.shared["video"] = shape.grid.video_tokens
    warnings_seen = []
    import warnings
    trace = a.memory_trace and ctx.cuda
    if trace:
        import _memory_trace
        _memory_trace.record()
    # SparseRunner.end() (run when sampling ends) forgets the run's per-layer FP8 errors and precisions: read them
    # after each model evaluation, so the JSON gets the last evaluation's.
    checked = {}
    if runner is not None:
        ctx.timer.on_record = lambda rec: checked.update(errors=runner.fp8_errors, used=runner.layer_precisions)
    t = time.time()
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            MC.run_steps(ctx.comfy, model, shape.latent_shape, 1 + repeats, shape.pos, shape.neg, seed=a.seed)
        warnings_seen = sorted({str(x.message)[:300] for x in w})
    except Exception as e:  # noqa: BLE001 - one failing case (an OOM, a kernel error) must not lose the others
        row["error"] = f"{type(e).__name__}: {str(e)[:1000]}"
        log(f"  FAILED: {row['error']}")
    finally:
        ctx.timer.on_record = None
        if trace:
            row["memory_at_peak"] = _memory_trace.peak_live(_memory_trace.stop_and_snapshot(),
                                                            device=torch.cuda.current_device())
    row["wall_s"] = round(time.time() - t, 2)
    recs = ctx.timer.records
    row["evaluations"] = recs
    if warnings_seen:
        row["warnings"] = warnings_seen
    if runner is not None:
        row["routed_calls"] = router.routed
        errs, used = checked.get("errors", {}), checked.get("used", {})
        row["fp8_errors"] = {str(k): round(v, 5) for k, v in sorted(errs.items())}
        row["layer_precisions"] = {p: sum(1 for x in used.values() if x == p) for p in sorted(set(used.values()))}
        row["triton_failures"] = [str(x) for x in runner.triton_failures]
    out = ctx.timer.first_output
    if len(recs) >= 2:
        timed = recs[1:]
        best = min(timed, key=lambda r: r["ms"])
        row["step_ms"] = best["ms"]
        row["self_attn_ms"] = best["self_attn_ms"]
        row["cfg_batch"] = best["batch"]
        row["finite"] = all(r["finite"] for r in recs)
        if ctx.cuda:
            row["peak_bytes"] = max(r["peak_bytes"] for r in timed)
    if kind == "dense_cudnn":
        shape.dense = row
        shape.dense_output = out
    d = shape.dense
    row["rel_err_vs_dense_cudnn"] = None if kind == "dense_cudnn" else rel_err(out, shape.dense_output)
    if d is not None and "step_ms" in row and "step_ms" in d:
        f = d["self_attn_ms"] / d["step_ms"]
        row["speedup_vs_dense_cudnn"] = round(d["step_ms"] / row["step_ms"], 4)
        row["self_attn_speedup"] = round(d["self_attn_ms"] / max(1e-9, row["self_attn_ms"]), 4)
        if "density" in row:
            row["bound"] = round(bound(f, row["density"]), 4)
            row["share_of_bound"] = round(row["speedup_vs_dense_cudnn"] / row["bound"], 4)
        if ctx.cuda and "peak_bytes" in row:
            added = row["peak_bytes"] - d["peak_bytes"]
            row["added_peak_bytes"] = added
            row["added_peak_share_of_weights"] = round(added / shape.weights, 5)
    del model
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()
    return row


def summary_line(row):
    if "skipped" in row:
        return f"skipped: {row['skipped']}"
    if "step_ms" not in row:
        return row.get("error", "no timed step")
    s = f"step {row['step_ms'] / 1e3:.3f} s, self-attn {row['self_attn_ms'] / 1e3:.3f} s"
    if "speedup_vs_dense_cudnn" in row:
        s += f", {row['speedup_vs_dense_cudnn']:.3f}x vs cuDNN dense"
    if "bound" in row:
        s += f" (bound {row['bound']:.3f}x at d={row['density']:.3f})"
    if "added_peak_bytes" in row:
        share = 100 * row["added_peak_share_of_weights"]
        s += f", +{row['added_peak_bytes'] / 1e9:.2f} GB peak ({share:.2f}% of weights)"
    if row.get("rel_err_vs_dense_cudnn") is not None:
        s += f", rel err {row['rel_err_vs_dense_cudnn']:.2e}"
    return s


def shape_summary(shape):
    d = shape.dense
    out = shape.describe()
    if d is not None and "step_ms" in d:
        out["dense_cudnn_step_ms"] = d["step_ms"]
        out["self_attn_share"] = round(d["self_attn_ms"] / d["step_ms"], 4)
        out["cfg_batch"] = d.get("cfg_batch")
        if "peak_bytes" in d:
            out["dense_peak_bytes"] = d["peak_bytes"]
    out["bundles"] = {str(k): v[1] for k, v in shape.bundles.items()}
    return out


def meta(ctx):
    import triton
    m = {"device": torch.cuda.get_device_name() if ctx.cuda else "cpu (--tiny: the package's reference path)",
         "torch": torch.__version__, "triton": triton.__version__, "python": sys.version.split()[0],
         "comfyui": ctx.comfy.version, "transformers_aliases": ctx.comfy.aliased, "commit": git_commit(),
         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
         "argv": sys.argv[1:], "dtype": str(ctx.dtype), "block": ctx.block, "cfg": 5.0, "sampler": "euler",
         "repeats": ctx.args.repeats, "warmup": 1, "structure_data": str(ctx.data) if ctx.data else None,
         "comfy_kitchen": ctx.ck_info,
         "timing": "CUDA events around each model evaluation (outermost APPLY_MODEL wrapper, synced before) and "
                   "around each attention call; best of the timed evaluations; the first evaluation of each run is "
                   "the warm-up",
         "bound": "1/((1-f)+f*d): f = dense_cudnn's self-attention time / its step time, d = bundle density"}
    if ctx.cuda:
        props = torch.cuda.get_device_properties(0)
        m.update(cuda=torch.version.cuda, gpu_memory_bytes=props.total_memory,
                 capability=list(torch.cuda.get_device_capability()))
    if ctx.tiny:
        m["tiny_tolerance"] = TINY_TOLERANCE
    return m


def out_path(args):
    if args.json:
        return Path(args.json)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / ("model_step_calibration.json" if args.calibration_only else "model_step.json")
    return HERE.parent / "results" / ("model_step_calibration.json" if args.calibration_only else "model_step.json")


def run_bench(ctx):
    a = ctx.args
    plan = TINY if a.tiny else QUICK if a.quick else FULL
    if a.models:
        keep = set(a.models.split(","))
        plan = [c for c in (TINY + TINY_FAMILIES if a.tiny else plan) if f"{c[0]}:{c[1]}" in keep or c[0] in keep]
    if a.densities:
        # A density sweep per selected shape: dense once, then ours (bf16) and Sol-Attn at each density.
        ds = [float(x) for x in a.densities.split(",")]
        shapes_in = list(dict.fromkeys((c[0], c[1]) for c in plan))
        plan = [c for m, v in shapes_in for c in _cases(m, v, [("dense_cudnn", None, None)] + [
            k for d in ds for k in (("patched", "bf16", d), ("ck_sol", None, d))])]
    if a.kinds:
        keep = set(a.kinds.split(","))
        plan = [c for c in plan if c[2] in keep or f"{c[2]}:{c[3]}" in keep]
    path = out_path(a)
    res = {"meta": meta(ctx), "shapes": [], "cases": [], "skipped": []}
    shapes, failed, shape = {}, {}, None
    log(f"writing {path}; comfy_kitchen: {ctx.ck_info}")
    for model_name, video, kind, precision, target in plan:
        key = (model_name, video)
        if key in failed:
            continue
        if key not in shapes:
            if ctx.model_name() not in (None, model_name):
                shapes.clear()  # the shapes of the previous model hold its weights: drop them before the next build
                shape = None
            try:
                shapes[key] = Shape(ctx, model_name, video)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory building a model: record, go on
                failed[key] = f"{type(e).__name__}: {e}"
                res["skipped"].append({"model": model_name, "video": video, "reason": failed[key]})
                log(f"{model_name} {video}: cannot build ({failed[key]})")
                write_json(res, path)
                continue
            res["shapes"].append(shape_summary(shapes[key]))
            log(f"{model_name} {video}: {shapes[key].grid.video_tokens} tokens, estimated dense step "
                f"{shapes[key].estimate_s:.1f} s")
        shape = shapes[key]
        step_s = (shape.dense["step_ms"] / 1e3) if shape.dense and "step_ms" in shape.dense else shape.estimate_s
        est = (1 + a.repeats) * step_s * 1.2 + 5
        label = f"{model_name} {video} {kind} {precision or ''} {'' if target is None else f'd~{target}'}"
        if ctx.cuda and ctx.elapsed() + est > a.budget_s:
            res["skipped"].append({"model": model_name, "video": video, "kind": kind, "precision": precision,
                                   "target_density": target, "reason": f"time budget: {ctx.elapsed():.0f} s spent, "
                                   f"~{est:.0f} s more needed, --budget-s {a.budget_s:.0f}"})
            log(f"  {label}: skipped (time budget)")
            write_json(res, path)
            continue
        log(f"  {label} ...")
        row = run_case(ctx, shape, kind, precision, target)
        res["cases"].append(row)
        for i, s in enumerate(res["shapes"]):
            if (s["model"], s["video"]) == key:
                res["shapes"][i] = shape_summary(shape)
        res["meta"]["wall_s"] = round(ctx.elapsed(), 1)
        write_json(res, path)
        log(f"  {label}: {summary_line(row)}")
    log(f"done in {ctx.elapsed():.0f} s")
    return res


# ------------------------------------------------------------------------------------------------ calibration
def run_calibration(ctx):
    """Calibration cost at Wan 14B 720p (or the tiny model): Calibrate Sparse Attention's own function
    (nodes/calibrate_run.calibrate_sparse_attention: the router with the Calibrator as handler, ComfyUI's sampler,
    calibrate(), the bundle written) over a few prompts x steps; per-step time from the timer, extrapolated only in
    the number of steps and prompts."""
    import folder_paths
    from calibatt.nodes import calibrate_run
    from calibatt.nodes.paths import FOLDER

    a = ctx.args
    model_name, video = ("tiny", "tiny") if ctx.tiny else ("wan14b", "720p")
    shape = Shape(ctx, model_name, video)
    w, h, f = MC.VIDEOS[video]
    path = out_path(a)
    folder = tempfile.mkdtemp(prefix="calibatt-bench-calib-")
    folder_paths.add_model_folder_path(FOLDER, folder, is_default=True)
    g = torch.Generator().manual_seed(3)
    positive = [[torch.randn(1, shape.text_tokens, 4096, generator=g), {}] for _ in range(a.calib_prompts)]
    res = {"meta": meta(ctx), "shape": shape.describe(), "prompts": a.calib_prompts, "steps": a.calib_steps,
           "cfg": a.calib_cfg}
    write_json(res, path)
    ctx.timer.reset()

    def progress(rec):  # a run cut short still leaves every finished step in the JSON
        res["evaluations"] = ctx.timer.records
        res["meta"]["wall_s"] = round(ctx.elapsed(), 1)
        write_json(res, path)
        log(f"  step {len(ctx.timer.records)}: {rec['ms'] / 1e3:.2f} s (self-attention with statistics "
            f"{rec['self_attn_ms'] / 1e3:.2f} s), batch {rec['batch']}")
    ctx.timer.on_record = progress
    log(f"calibrating {model_name} {video}: {a.calib_prompts} prompts x {a.calib_steps} steps")
    t = time.time()
    try:
        with torch.inference_mode():
            bundle, _, summary = calibrate_run.calibrate_sparse_attention(
                shape.patcher, prompts="", width=w, height=h, length=f, steps=a.calib_steps, cfg=a.calib_cfg,
                sampler_name="euler", scheduler="simple", seed=a.seed, preset="balanced", eps_A=0.0, eps_C=0.0,
                eps_k=0.0, rho=0.5, filename="model_step_calibration", block_size=ctx.block, positive=positive,
                negative=None)
        res["bundle_summary"] = summary
        res["bundle_density"] = round(float(bundle.entry_densities().mean()), 4)
    except Exception as e:  # noqa: BLE001
        res["error"] = f"{type(e).__name__}: {str(e)[:1000]}"
        log(f"FAILED: {res['error']}")
    total = time.time() - t
    ctx.timer.on_record = None
    recs = ctx.timer.records
    res["evaluations"] = recs
    res["wall_s"] = round(total, 1)
    # Steady-state step: every evaluation but each prompt's first (compiles and first-use costs land there).
    per_prompt = max(1, a.calib_steps)
    steady = [r["ms"] for i, r in enumerate(recs) if i % per_prompt != 0] or [r["ms"] for r in recs]
    if recs:
        step_s = sorted(steady)[len(steady) // 2] / 1e3
        steps_total = sum(r["ms"] for r in recs) / 1e3
        other = max(0.0, total - steps_total)  # sampler setup, the last prompt's commit, the vote, the bundle write
        target_prompts, target_steps = 16, 20
        steps_part = step_s * target_prompts * target_steps
        # Earlier prompts commit on the calibrator's worker thread while the next prompt samples (the step log shows
        # no gap between prompts), so what is left after the last step (its commit, the vote, the write) grows with
        # the steps: scaled by steps. The upper estimate scales it by prompts too.
        other_part = other * (target_steps / max(1, a.calib_steps))
        upper = steps_part + other_part * (target_prompts / a.calib_prompts)
        est = steps_part + other_part
        res["step_s_median"] = round(step_s, 3)
        res["non_step_s"] = round(other, 1)
        res["extrapolated"] = {"prompts": target_prompts, "steps": target_steps, "seconds": round(est, 1),
                               "gpu_hours": round(est / 3600, 3), "steps_only_gpu_hours": round(steps_part / 3600, 3),
                               "upper_gpu_hours": round(upper / 3600, 3),
                               "goal_gpu_hours": 2.0, "within_goal": est / 3600 <= 2.0,
                               "how": "median steady step x 16 x 20, plus the measured non-step wall time x "
                                      "(20 / steps); upper: that time x (16 / prompts) too"}
        log(f"calibration: step {step_s:.2f} s (CFG batch {recs[-1]['batch']}), extrapolated "
            f"{est / 3600:.2f} GPU-hours for 16 prompts x 20 steps (goal <= 2)")
    res["meta"]["wall_s"] = round(ctx.elapsed(), 1)
    write_json(res, path)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="a ComfyUI source tree (default "
                    "$COMFYUI_PATH)")
    ap.add_argument("--quick", action="store_true", help="the cases of QUICK, cut at --budget-s (under 9 minutes)")
    ap.add_argument("--tiny", action="store_true", help="CPU check: tiny WanModel, the package's reference path")
    ap.add_argument("--calibration-only", action="store_true", help="calibration cost at Wan 14B 720p instead")
    ap.add_argument("--models", default="", help="comma list of model or model:video to keep, e.g. wan14b:720p or "
                    "hunyuan (models: " + ", ".join(MC.MODELS) + ")")
    ap.add_argument("--kinds", default="", help="comma list of case kinds or kind:precision to keep, e.g. "
                    "dense_cudnn,patched:bf16,patched:fp8-qk,ck_sol")
    ap.add_argument("--memory-trace", action="store_true", help="record the allocator's history per case and list "
                    "what is alive at the peak, by where it was allocated (bench/_memory_trace.py; GPU only; "
                    "recording slows the run, so its times are not comparable)")
    ap.add_argument("--densities", default="", help="comma list of target densities: per selected shape, dense "
                    "once and then ours (bf16) and Sol-Attn at each (e.g. 0.3,0.5,0.7,0.8)")
    ap.add_argument("--calib-cfg", type=float, default=5.0, help="CFG of the calibration run (1.0: ComfyUI runs no "
                    "negative branch; calibration reads only the positive one)")
    ap.add_argument("--repeats", type=int, default=None, help="timed evaluations per case (default 1 quick, 3 full)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip cases whose estimated end is past this wall "
                    "time from the start (default 450: with the case in flight and first-use Triton compiles the run "
                    "ends within 9 minutes; one device command may run 10)")
    ap.add_argument("--data", default=None, help="sta_mask_strategy_hunyuan.json[.gz] (default: .benchdata/, then "
                    "../shared/data)")
    ap.add_argument("--ck-extra-tokens", type=int, default=0, help="Sol-Attn token_aug (core node default 256; 0 = "
                    "pure top-k at the bundle's density)")
    ap.add_argument("--calib-prompts", type=int, default=2)
    ap.add_argument("--calib-steps", type=int, default=3)
    ap.add_argument("--json", default=None,
                    help="output file (default: model_step.json in the folder OUT names, else in bench/results)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if not a.comfyui or not Path(a.comfyui, "comfy").is_dir():
        ap.error("--comfyui (or COMFYUI_PATH) must name a ComfyUI source tree")
    if a.repeats is None:
        a.repeats = 1 if (a.quick or a.tiny) else 3
    if a.tiny:
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    ctx = Context(a)
    res = run_calibration(ctx) if a.calibration_only else run_bench(ctx)
    return res


if __name__ == "__main__":
    main()
