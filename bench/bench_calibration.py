"""Calibration overhead per denoising step (statistics on vs off) and the GPU-hours it implies for Wan 14B 720p.

Runs `layers` self-attention calls per step with random bf16 q/k/v in Wan's layout (B, L, H*D), CFG batch 2 with
the positive chunk first, through (a) dense attention only and (b) Calibrator.observe (dense output + block energy
of the positive rows + selection + repetition check), and times whole steps (synchronised at step ends, where the
calibrator also moves the step's keep bits to the host). The CPU work of committing a prompt's votes is timed
separately (it runs on a worker thread during the next prompt in real use).

GPU (the lead runs this):  python3 bench/bench_calibration.py --json bench/bench_calibration.json
CPU smoke run (tiny):       .venv/bin/python bench/bench_calibration.py --tiny

The 720p estimate scales the measured per-step statistics overhead by (tokens_720 / tokens)^2 (block energy and the
dense attention are quadratic in tokens) and adds Wan 14B 720p's measured step time (METHOD.md section 3,
baselines/comfy_wan_step.py: 24.39 s for a CFG batch of 2 on the H100; half of that without the negative branch).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))
from _pkg import load_package  # noqa: E402

load_package()  # makes `calibatt` importable
import torch  # noqa: E402

from calibatt.calibration import CalibrationSettings, Calibrator  # noqa: E402
from calibatt.kernels.call import AttentionCall  # noqa: E402
from calibatt.kernels.dense import dense_attention  # noqa: E402
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
    settings = CalibrationSettings(block_q=args.block, block_k=args.block, steps=args.steps)
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
    # (b) statistics on
    cal = Calibrator(sig, grid, settings, background=False)
    cal.begin_prompt(sample_sigmas=sigmas)
    on = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    base_mem = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
    for i, s in enumerate(sigmas):
        calls = make_calls(grid, args.heads, args.head_dim, args.layers, batch, dev, dtype, gen)
        for c in calls:
            c.sigma = s
        sync(dev)
        t0 = time.perf_counter()
        for c in calls:
            cal.observe(c)
        cal._drain()  # the step's host copy, which observe() otherwise does when the next step starts
        sync(dev)
        on.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(dev) - base_mem) if dev.type == "cuda" else 0
    t0 = time.perf_counter()
    cal.end_prompt()
    commit_s = time.perf_counter() - t0
    st = cal.state()

    warm = 1 if args.steps > 1 else 0
    off_s = sum(off[warm:]) / len(off[warm:])
    on_s = sum(on[warm:]) / len(on[warm:])
    overhead = on_s - off_s
    tokens = grid.video_tokens
    scale720 = (WAN720P_TOKENS / tokens) ** 2 * (40 / args.heads) * (40 / args.layers)
    commit_step = commit_s / args.steps
    commit720 = commit_step * (WAN720P_TOKENS / tokens) ** 2 * (40 / args.heads) * (40 / args.layers)
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
        "heads": args.heads,
        "layers": args.layers, "block": args.block, "cfg_batch": batch, "steps_timed": args.steps - warm,
        "step_s_stats_off": round(off_s, 4), "step_s_stats_on": round(on_s, 4),
        "overhead_s_per_step": round(overhead, 4), "overhead_ratio": round(on_s / off_s, 3),
        "overhead_ms_per_call": round(1000 * overhead / args.layers, 3),
        "peak_extra_gpu_mb_stats_on": round(peak / 2**20, 1),
        "commit_cpu_s_per_step": round(commit_step, 4),
        "counters_raw_mb": round(st.raw_nbytes() / 2**20, 2), "counters_stored_mb": round(st.nbytes() / 2**20, 2),
        "est_overhead_s_per_step_720p": round(overhead * scale720, 2),
        "est_commit_cpu_s_per_step_720p": round(commit720, 2),
        "estimate_wan14b_720p": est, "prompts": args.prompts,
    }
    try:
        res["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=pathlib.Path(__file__).resolve().parents[1]).stdout.strip()
    except OSError:
        res["commit"] = None
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
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.tiny:
        args.grid, args.heads, args.head_dim, args.layers, args.block = [3, 4, 8], 2, 32, 2, 16
    res = run(args)
    print(json.dumps(res, indent=1))
    print(f"\nstatistics overhead: {res['overhead_s_per_step']:.3f} s per step ({res['overhead_ratio']:.2f}x the "
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
