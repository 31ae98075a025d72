"""Where an attention call's time goes at the tiny model's size: in the run (CUDA events around each call, which
also count the GPU waiting for the host when the host is the bottleneck), the host's own time per call, and the
GPU time of the same calls replayed back to back (the host then runs ahead, so only the kernels are timed).

GPU: python3 bench/attention_profile.py [--model tinywan64w] [--steps 10] [--preset 0.95:0.995:12] [--rho 0.125]

Three handlers on the same held-out prompts and seeds: the model's own attention (diffusers), our dense fallback
(cuDNN SDPA, kernels/dense.py) and the sparse runner on a bundle calibrated here. The replay takes the q, k, v of
every self-attention call of one dense run and times each handler on them with triton.testing.do_bench.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from _pkg import git_commit, load_package  # noqa: E402

load_package()
import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from calibatt.adapters import diffusers_wan as adapter  # noqa: E402
from calibatt.calibration import CalibrationSettings, eps_spec  # noqa: E402
from calibatt.kernels.dense import dense_attention  # noqa: E402
from calibatt.kernels.runner import SparseRunner  # noqa: E402
from calibatt.tinywan import data, evaluate, pipeline  # noqa: E402
from calibatt.tinywan.model import load_tinywan  # noqa: E402


class Probe:
    """Wraps a handler (None = the model's own attention): host time per call, and optionally a copy of each call."""

    def __init__(self, inner, record: bool = False):
        self.inner = inner
        self.record = record
        self.calls: list = []
        self.host_s = 0.0
        self.count = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, call):
        t0 = time.perf_counter()
        out = self.inner(call) if self.inner is not None else call.dense()
        self.host_s += time.perf_counter() - t0
        self.count += 1
        if self.record:
            self.calls.append(call)
        return out


def cudnn_dense(call):
    q, k, v = call.bhld()
    return call.to_host_layout(dense_attention(q, k, v, scale=call.scale))


def in_run(model, handler, caps, seeds, steps, guidance, record=False):
    timer = adapter.AttentionTimer()
    probe = Probe(handler, record)
    with adapter.WanAttentionHook(model.transformer, probe, timer=timer, **evaluate.HOOK_KW) as hook:
        on_step = evaluate.step_callback(hook, len(caps), guidance)
        pipeline.generate(model, caps, seeds, steps=steps, guidance=guidance, on_step=on_step)  # warm-up
        torch.cuda.synchronize()
        timer.reset()
        probe.host_s, probe.count, probe.calls = 0.0, 0, []
        t0 = time.perf_counter()
        pipeline.generate(model, caps, seeds, steps=steps, guidance=guidance, on_step=on_step)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    n = probe.count
    return {"calls": n, "event_ms_per_call": round(1e3 * timer.seconds / n, 4),
            "host_ms_per_call": round(1e3 * probe.host_s / n, 4), "generation_s": round(wall, 4)}, probe.calls


def replay(handler, calls, device):
    """Mean GPU ms per call over the recorded calls, each timed back to back (host ahead of the GPU)."""
    total = 0.0
    for c in calls:
        if hasattr(handler, "begin_step"):
            handler.begin_step(c.sigma, device)
        fn = (lambda: handler(c)) if handler is not None else c.dense
        total += do_bench(fn, warmup=5, rep=40, return_mode="median")
    return round(total / len(calls), 4)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tinywan64w")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--rho", type=float, default=0.125)
    ap.add_argument("--preset", default="0.95:0.995:12")
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    device = torch.device("cuda")
    model = load_tinywan(name=a.model, device=device, dtype=torch.bfloat16)
    st = CalibrationSettings(**eps_spec(a.preset), rho=a.rho, repetition=False, block_q=64, block_k=64,
                             steps=a.steps)
    bundle = evaluate.calibrate(model, data.training_captions(a.calib), st, steps=a.steps, guidance=a.guidance)
    caps, seeds = data.held_out_captions(3), [1000, 1001, 1002]
    res = {"device": torch.cuda.get_device_name(), "model": a.model, "commit": git_commit(),
           "date": time.strftime("%Y-%m-%d %H:%M"), "preset": a.preset, "rho": a.rho, "calib": a.calib,
           "density": round(evaluate.sampled_density(bundle, a.steps), 4), "handlers": {}}
    runner = SparseRunner(bundle)
    calls = None
    for name, handler in (("model's own (diffusers)", None), ("cuDNN dense", cudnn_dense),
                          ("sparse runner", runner)):
        r, rec = in_run(model, handler, caps, seeds, a.steps, a.guidance, record=calls is None)
        calls = calls if calls is not None else rec
        r["replay_gpu_ms_per_call"] = replay(handler, calls, device)
        res["handlers"][name] = r
        print(f"{name:24s} per call: in the run {r['event_ms_per_call']:.3f} ms (host {r['host_ms_per_call']:.3f}), "
              f"replayed {r['replay_gpu_ms_per_call']:.3f} ms; generation {r['generation_s']:.3f} s", flush=True)
    runner.end()
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
