"""Calibration overhead per denoising step (statistics on vs off) and the GPU-hours it implies for Wan 14B 720p.

Runs `layers` self-attention calls per step with random bf16 q/k/v in Wan's layout (B, L, H*D), CFG batch 2 with
the positive chunk first, through (a) dense attention only and (b) Calibrator.observe (dense output + block energy
of the positive rows + selection + repetition check) driven by calibration.calibrate() as every host runs it, and
times whole steps (synchronised at step ends; each step after the first also moves the previous step's keep bits to
the host). The work after the last step (its host copy, the prompt's commit, the vote into a bundle) is timed
separately: in real use the commit runs on a worker thread during the next prompt.

GPU:                        python3 bench/bench_calibration.py --json bench/bench_calibration.json [--row-stride 4]
CPU smoke run (tiny):       .venv/bin/python bench/bench_calibration.py --tiny
Selection quality vs stats_row_stride (CPU, planted structure, tests/synthetic.py):
                            .venv/bin/python bench/bench_calibration.py --quality [--json q.json]

The 720p estimate scales the measured per-step statistics overhead by (tokens_720 / tokens)^2 (block energy and the
dense attention are quadratic in tokens) and adds Wan 14B 720p's measured step time (METHOD.md section 3,
baselines/comfy_wan_step.py: 24.39 s for a CFG batch of 2 on the H100; half of that without the negative branch).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))
sys.path.insert(1, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))  # the synthetic fixture (--quality)
from _pkg import git_commit, load_package  # noqa: E402

load_package()  # makes `calibatt` importable
import torch  # noqa: E402

from calibatt.calibration import CalibrationSettings, Calibrator, calibrate  # noqa: E402
from calibatt.kernels.call import AttentionCall  # noqa: E402
from calibatt.kernels.dense import dense_attention  # noqa: E402
from calibatt.kernels.block_energy import block_energy  # noqa: E402
from calibatt.masks import ModelSignature, TokenGrid  # noqa: E402

WAN14B_720P_STEP_S = 24.39  # CFG batch 2, ComfyUI Wan classes, H100 (METHOD.md section 3)
WAN720P_TOKENS = 75_600


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def make_calls(grid, heads, head_dim, layers, batch, dev, dtype, gen):
    """One step's calls; q/k/v are drawn once per step and reused by every layer (the cost does not depend on
    the values, and drawing 40 layers' worth would measure the random generator)."""
    N = grid.total_tokens
    qkv = [torch.randn(batch, N, heads * head_dim, device=dev, dtype=dtype, generator=gen) for _ in range(3)]
    return [AttentionCall(*qkv, "bld", heads, layer, 0.0, grid, positive_rows=[0] if batch > 1 else None)
            for layer in range(layers)]


def run(args):
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    F, Hh, Ww = args.grid
    grid = TokenGrid(F, Hh, Ww)
    sig = ModelSignature("wan21", args.layers, args.heads, args.head_dim, args.heads * args.head_dim)
    settings = CalibrationSettings(block_q=args.block, block_k=args.block, steps=args.steps,
                                   stats_row_stride=args.row_stride)
    gen = torch.Generator(device=dev).manual_seed(0)
    sigmas = [float(s) for s in torch.linspace(1.0, 0.05, args.steps).tolist()]
    batch = 2 if args.cfg else 1

    def dense_step(calls):
        for c in calls:
            q, k, v = c.bhld()
            c.to_host_layout(dense_attention(q, k, v, c.scale))

    # (a) statistics off
    off = []
    for i, s in enumerate(sigmas):
        calls = make_calls(grid, args.heads, args.head_dim, args.layers, batch, dev, dtype, gen)
        sync(dev)
        t0 = time.perf_counter()
        dense_step(calls)
        sync(dev)
        off.append(time.perf_counter() - t0)
    # (b) statistics on, through calibrate() as every host runs it: one prompt of `steps` steps. A step's keep bits
    # move to the host when the next step's first call arrives (one sync), so every timed step after the first
    # carries one such copy, as in real use; the last step's copy, the prompt's commit and the vote into a bundle
    # come after the run and are timed as after-run work.
    cal = Calibrator(sig, grid, settings, background=False)
    on, kernel_ms, in_run = [], {}, [0.0]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    base_mem = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0

    def run_prompt(prompt, cal):
        t_run = time.perf_counter()
        cal.set_schedule(sigmas)
        for s in sigmas:
            calls = make_calls(grid, args.heads, args.head_dim, args.layers, batch, dev, dtype, gen)
            for c in calls:
                c.sigma = s
            sync(dev)
            t0 = time.perf_counter()
            for c in calls:
                cal.observe(c)
            sync(dev)
            on.append(time.perf_counter() - t0)
        # The statistics kernel alone on one call's positive chunk, against one dense forward of that chunk.
        q, k, v = (t[:1] for t in calls[0].bhld())
        for name, fn in (("dense", lambda: dense_attention(q, k, v, None)),
                         ("block_energy", lambda: block_energy(q, k, cal.geometry, row_stride=args.row_stride,
                                                               row_offset=1 % args.row_stride))):
            fn()
            sync(dev)
            t0 = time.perf_counter()
            for _ in range(5):
                fn()
            sync(dev)
            kernel_ms[name] = 1000 * (time.perf_counter() - t0) / 5
        in_run[0] = time.perf_counter() - t_run

    t0 = time.perf_counter()
    calibrate(run_prompt, [0], cal)
    after_s = time.perf_counter() - t0 - in_run[0]
    peak = (torch.cuda.max_memory_allocated(dev) - base_mem) if dev.type == "cuda" else 0
    st = cal.state()

    warm = 1 if args.steps > 1 else 0
    off_s = sum(off[warm:]) / len(off[warm:])
    on_s = sum(on[warm:]) / len(on[warm:])
    overhead = on_s - off_s
    tokens = grid.video_tokens
    scale720 = (WAN720P_TOKENS / tokens) ** 2 * (40 / args.heads) * (40 / args.layers)
    after_step = after_s / args.steps
    after720 = after_step * (WAN720P_TOKENS / tokens) ** 2 * (40 / args.heads) * (40 / args.layers)
    est = []
    for steps in (50, 30, 20):
        for cfg in (True, False):
            step = WAN14B_720P_STEP_S if cfg else WAN14B_720P_STEP_S / 2
            # Statistics read only the positive chunk, so their overhead is the same with or without CFG.
            hours = args.prompts * steps * (step + overhead * scale720) / 3600
            est.append({"steps": steps, "cfg": cfg, "gpu_hours": round(hours, 2), "goal_met": hours <= 2.0})
    res = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "device_type": dev.type, "torch": torch.__version__, "grid": list(args.grid), "tokens": tokens,
        "heads": args.heads, "stats_row_stride": args.row_stride,
        "layers": args.layers, "block": args.block, "cfg_batch": batch, "steps_timed": args.steps - warm,
        "step_s_stats_off": round(off_s, 4), "step_s_stats_on": round(on_s, 4),
        "overhead_s_per_step": round(overhead, 4), "overhead_ratio": round(on_s / off_s, 3),
        "overhead_ms_per_call": round(1000 * overhead / args.layers, 3),
        "peak_extra_gpu_mb_stats_on": round(peak / 2**20, 1),
        "block_energy_ms_per_call": round(kernel_ms["block_energy"], 2),
        "dense_ms_per_call_batch1": round(kernel_ms["dense"], 2),
        "block_energy_over_dense": round(kernel_ms["block_energy"] / kernel_ms["dense"], 3),
        "after_run_cpu_s_per_step": round(after_step, 4),
        "counters_raw_mb": round(st.raw_nbytes() / 2**20, 2), "counters_stored_mb": round(st.nbytes() / 2**20, 2),
        "est_overhead_s_per_step_720p": round(overhead * scale720, 2),
        "est_after_run_cpu_s_per_step_720p": round(after720, 2),
        "estimate_wan14b_720p": est, "prompts": args.prompts,
    }
    res["commit"] = git_commit()
    res["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return res


# ---- selection quality vs row stride (CPU) -------------------------------------------------------------------
QUALITY_KINDS = [["local", "stripes", "repeat", "global"], ["global", "repeat", "local", "stripes"]]
QUALITY_REPEAT = {(0, 2), (1, 1)}


def quality_case(grid_fhw, block, noise, beta, strides, prompts=4, held_out=(17, 18), head_dim=16,
                 repetition=True):
    """Calibrate the planted-structure layers once per stride and score each against the full-row energy."""
    from calibatt.calibration.selection import kept_mass, mean_block_mass, select_blocks
    from synthetic import global_columns, planted_layer  # tests/synthetic.py, the planted-structure fixture
    from calibatt.kernels.attention.naive import sparse_attention_reference
    from calibatt.kernels.block_energy.naive import block_energy_reference
    from calibatt.masks import BlockGeometry

    grid = TokenGrid(*grid_fhw)
    L, H = len(QUALITY_KINDS), len(QUALITY_KINDS[0])
    sig = ModelSignature("generic", L, H, head_dim, H * head_dim)
    sigmas = [10.0, 3.0, 1.0, 0.3, 0.1]
    g = BlockGeometry(grid.video_tokens, block, block)
    cache = {}

    def qkv(p, layer, s, **kw):
        key = (p, layer, s, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = planted_layer(grid, QUALITY_KINDS[layer], head_dim, prompt=p, layer=layer, sigma=s,
                                       noise=kw.get("noise", noise), beta=beta)
        return cache[key]

    def full_mass(p, layer, s):
        key = ("mass", p, layer, s)
        if key not in cache:
            q, k, _ = qkv(p, layer, s)
            cache[key] = mean_block_mass(block_energy_reference(q.double(), k.double(), g, scale=1.0).float(), g, 1)
        return cache[key]

    def dense(p, layer, s):
        key = ("dense", p, layer, s)
        if key not in cache:
            q, k, v = (x.double() for x in qkv(p, layer, s))
            cache[key] = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        return cache[key]

    rows = []
    base_masks = None
    for stride in strides:
        st = CalibrationSettings(block_q=block, block_k=block, A=0.85, C=0.97, k=4.0, stats_row_stride=stride,
                                 repetition=repetition)
        cal = Calibrator(sig, grid, st, background=False)
        # Per-prompt selections from the strided estimate, judged by the full-row mass (the eps guarantee).
        short = []

        def run_prompt(p, cal):
            cal.set_schedule(sigmas)
            for t, s in enumerate(sigmas):
                eps = st.eps(t, len(sigmas))
                for layer in range(L):
                    q, k, v = qkv(p, layer, s)
                    cal.observe(AttentionCall(q, k, v, "bhld", H, layer, s, grid, scale=1.0))
                    est = mean_block_mass(block_energy_reference(q, k, g, scale=1.0, row_stride=stride,
                                                                 row_offset=(t + layer) % stride), g, 1)
                    keep = select_blocks(est, eps)
                    short.append((eps - kept_mass(full_mass(p, layer, s), keep)).clamp_min(0.0).flatten())
        bundle = calibrate(run_prompt, range(prompts), cal)
        short = torch.cat(short)
        masks = {s: bundle.skip_lists(bundle.bucket_for_sigma(s)).block_mask() for s in sigmas}
        eps_min = min(bundle.settings["eps_per_step"])
        # Planted blocks: blocks holding more than 1 - eps of a row's noise-free mass (+ margin) must be kept.
        must_total = must_kept = gcol_total = gcol_kept = 0
        col_blocks = sorted(set((global_columns(grid) // g.block_k).tolist()))
        for s in sigmas:
            for layer in range(L):
                q0, k0, _ = qkv(0, layer, s, noise=0.0)
                m0 = mean_block_mass(block_energy_reference(q0, k0, g, scale=1.0), g, 1)
                must = m0 > (1.0 - eps_min) + 0.05
                must_total += int(must.sum())
                must_kept += int((masks[s][layer] & must).sum())
                gh = QUALITY_KINDS[layer].index("global")
                gcol_total += g.nq * len(col_blocks)
                gcol_kept += int(masks[s][layer, gh][:, col_blocks].sum())
        rep_ok = all({(lh[0], lh[1]) for lh in rep_b} == QUALITY_REPEAT for rep_b in
                     [{tuple(x) for x in (bundle.entry_rep[b] >= 0).nonzero().tolist()}
                      for b in range(bundle.num_buckets)])

        def out_error(p):
            errs, bundle_short = [], []
            for t, s in enumerate(sigmas):
                sl = bundle.skip_lists(bundle.bucket_for_sigma(s))
                for layer in range(L):
                    q, k, v = (x.double() for x in qkv(p, layer, s))
                    d = dense(p, layer, s)
                    out = sparse_attention_reference(q, k, v, sl.layer(layer), scale=1.0)
                    errs.append(float((out - d).norm() / d.norm()))
                    eps = st.eps(t, len(sigmas))
                    bundle_short.append((eps - kept_mass(full_mass(p, layer, s), masks[s][layer]))
                                        .clamp_min(0.0).flatten())
            return sum(errs) / len(errs), torch.cat(bundle_short)

        calib_err = sum(out_error(p)[0] for p in range(prompts)) / prompts
        held = [out_error(p) for p in held_out]
        held_err = sum(h[0] for h in held) / len(held)
        held_short = torch.cat([h[1] for h in held])
        flat = torch.stack([masks[s] for s in sigmas])
        iou = None
        if base_masks is None:
            base_masks = flat
        else:
            iou = float((flat & base_masks).sum() / (flat | base_masks).sum())
        rows.append({
            "stride": stride, "density": round(bundle.density, 4),
            "block_mask_density": round(float(flat.float().mean()), 4),
            "repetitive_entries": int((bundle.entry_rep >= 0).sum()),
            "iou_vs_stride1": None if iou is None else round(iou, 4),
            "planted_blocks_kept": f"{must_kept}/{must_total}", "global_col_blocks_kept": f"{gcol_kept}/{gcol_total}",
            "repetitive_heads_exact": rep_ok,
            "per_prompt_rows_below_eps": round(float((short > 1e-6).float().mean()), 4),
            "per_prompt_max_shortfall": round(float(short.max()), 4),
            "per_prompt_mean_shortfall": round(float(short.mean()), 5),
            "heldout_rows_below_eps": round(float((held_short > 1e-6).float().mean()), 4),
            "heldout_max_shortfall": round(float(held_short.max()), 4),
            "calib_out_err": round(calib_err, 4), "heldout_out_err": round(held_err, 4),
        })
    return {"grid": list(grid_fhw), "block": block, "noise": noise, "beta": beta, "prompts": prompts,
            "repetition": repetition,
            "held_out": list(held_out), "rows": rows}


def quality(args):
    torch.set_num_threads(1)  # tiny tensors on a small CPU: threads only contend
    strides = args.strides
    cases = [((8, 16, 16), 128, 0.35, 0.05), ((8, 16, 16), 128, 0.7, 0.05), ((8, 16, 16), 64, 0.35, 0.2),
             ((4, 8, 8), 16, 0.35, 0.6)]
    if args.tiny:
        cases = cases[-1:]
    elif args.cases:
        cases = [cases[i] for i in args.cases]
    res = {"cases": []}
    for grid_fhw, block, noise, beta in cases:
        t0 = time.perf_counter()
        c = quality_case(grid_fhw, block, noise, beta, strides, repetition=args.repetition)
        c["seconds"] = round(time.perf_counter() - t0, 1)
        res["cases"].append(c)
        print(f"grid {grid_fhw} block {block} noise {noise} beta {beta} repetition {args.repetition} "
              f"({c['seconds']} s)", flush=True)
        for r in c["rows"]:
            print("  " + ", ".join(f"{k}={v}" for k, v in r.items()), flush=True)
    res["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", type=int, nargs=3, default=[21, 30, 52], metavar=("F", "H", "W"),
                    help="latent token grid (default Wan 480p 81 frames: 21 x 30 x 52 = 32,760 tokens)")
    ap.add_argument("--heads", type=int, default=40, help="40 for Wan 14B, 12 for 1.3B")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="steps to time (the first is warm-up)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--no-cfg", dest="cfg", action="store_false", help="batch 1 instead of a CFG batch of 2")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA exists")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run)")
    ap.add_argument("--row-stride", type=int, default=1,
                    help="CalibrationSettings.stats_row_stride: statistics from every n-th query row (1 = all)")
    ap.add_argument("--quality", action="store_true",
                    help="instead of timing: selection quality vs row stride on planted structure (CPU)")
    ap.add_argument("--strides", type=int, nargs="+", default=[1, 2, 4, 8], help="strides for --quality")
    ap.add_argument("--no-repetition", dest="repetition", action="store_false",
                    help="--quality with repetitive heads off (block masks alone)")
    ap.add_argument("--cases", type=int, nargs="+", help="indices of the --quality cases to run (default all)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.quality:
        res = quality(args)
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
        return
    if args.tiny:
        args.grid, args.heads, args.head_dim, args.layers, args.block = [3, 4, 8], 2, 32, 2, 16
    res = run(args)
    print(json.dumps(res, indent=1))
    print(f"\nrow stride {res['stats_row_stride']}: block energy {res['block_energy_ms_per_call']:.2f} ms per call = "
          f"{res['block_energy_over_dense']:.2f}x one dense forward (batch 1)")
    print(f"statistics overhead: {res['overhead_s_per_step']:.3f} s per step ({res['overhead_ratio']:.2f}x the "
          f"attention time) at {res['tokens']} tokens; estimated {res['est_overhead_s_per_step_720p']:.1f} s per "
          f"step at Wan 14B 720p")
    if res["tokens"] < 8192 or "cuda" not in str(res.get("device_type")):
        print("  (smoke run: fixed per-call costs dominate at this size; the 720p estimate below is only meaningful "
              "from a full-size GPU run)")
    for e in res["estimate_wan14b_720p"]:
        print(f"  {res['prompts']} prompts x {e['steps']} steps, CFG {'on ' if e['cfg'] else 'off'}: "
              f"{e['gpu_hours']:.2f} GPU-hours {'(goal <= 2 met)' if e['goal_met'] else ''}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
