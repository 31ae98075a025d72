"""Fidelity of sparse vs dense generation on the shipped tiny Wan model, against density.

    python bench/bench_fidelity.py [--model tinywan|tinywan64w] [--steps 10] [--calib 3] [--eval 3]
                                   [--presets quality balanced fast 0.97:0.995:12] [--out output/bench/fidelity.json]

Calibrated on prompt set A (training-distribution captions), evaluated on set B (held-out caption combinations
never seen in training) and, for the generalisation check, on A itself (same captions and seeds as calibration).
For each eps preset: CalibAtt with and without repetition heads (one calibration per preset: the repetition
decision is made in finish(), so the same statistics give both bundles). At each calibrated config's measured
density, two baselines with the same number of key blocks per query block:
  - window: a fixed 3-D local window (the k key blocks nearest to the query block in (t, h, w) token space);
  - topk-online: per call, top-k key blocks from mean-pooled q and k per block (estimated online, no calibration).
PSNR / SSIM are sparse vs dense clips with the same seeds. Attention time is measured in the same run on this
machine (on CPU the sparse path is the PyTorch reference, so times there are not the product's speed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402

import _pkg  # noqa: E402

_pkg.load_package()
from calibatt.calibration import CalibrationSettings, eps_spec  # noqa: E402
from calibatt.calibration.calibrator import Calibrator  # noqa: E402
from calibatt.kernels.attention.naive import sparse_attention_reference  # noqa: E402
from calibatt.masks import BlockGeometry, MaskBundle, SkipLists  # noqa: E402
from calibatt.tinywan import data, evaluate  # noqa: E402
from calibatt.tinywan.model import load_tinywan  # noqa: E402


def block_centres(grid, block: int) -> torch.Tensor:
    """[n_blocks, 3] mean (t, h, w) token position of each block."""
    n = grid.video_tokens
    idx = torch.arange(n)
    pos = torch.stack([idx // grid.frame_tokens, (idx // grid.width) % grid.height, idx % grid.width], -1).double()
    nb = math.ceil(n / block)
    return torch.stack([pos[b * block:(b + 1) * block].mean(0) for b in range(nb)])


def window_bundle(model, grid, block: int, density: float) -> MaskBundle:
    """One fixed mask for every step, layer and head: each query block keeps its k nearest key blocks in 3-D."""
    g = BlockGeometry(grid.video_tokens, block, block)
    c = block_centres(grid, block)
    dist = torch.cdist(c, c)
    k = max(1, min(g.nk, round(density * g.nk)))
    keep = torch.zeros(g.nq, g.nk, dtype=torch.bool)
    keep.scatter_(1, dist.argsort(dim=1, stable=True)[:, :k], True)
    L, H = model.cfg.layers, model.cfg.dim_heads
    return MaskBundle.from_block_masks(model.signature(), grid, g, [keep.expand(L, H, g.nq, g.nk)], [1.0],
                                       [0])


class TopKOnline:
    """Per call: block scores from mean-pooled q and k per block, top-k key blocks per query block (+ diagonal),
    then the block-sparse reference. k is fixed, so every call has the same density."""

    def __init__(self, grid, block: int, density: float):
        self.g = BlockGeometry(grid.video_tokens, block, block)
        self.k = max(1, min(self.g.nk, round(density * self.g.nk)))
        self.diag = self.g.diagonal()
        self._density_sum = 0.0
        self._calls = 0

    def mean_density(self) -> float:
        return self._density_sum / max(1, self._calls)

    def _pool(self, x):  # (B, H, N, D) -> (H, nb, D), averaged over batch rows and block tokens
        B, H, N, D = x.shape
        pad = self.g.nk * self.g.block_k - N
        xp = torch.nn.functional.pad(x.float(), (0, 0, 0, pad))
        counts = torch.clamp(N - torch.arange(self.g.nk) * self.g.block_k, max=self.g.block_k).to(xp)
        return xp.reshape(B, H, self.g.nk, self.g.block_k, D).sum(3).mean(0) / counts[None, :, None]

    def __call__(self, call):
        q, k, v = call.bhld()
        scale = call.scale or 1.0 / math.sqrt(q.shape[-1])
        s = torch.softmax(self._pool(q) @ self._pool(k).transpose(-1, -2) * scale, dim=-1)  # [H, nq, nk]
        keep = torch.zeros_like(s, dtype=torch.bool)
        keep.scatter_(-1, s.topk(self.k, dim=-1).indices, True)
        keep = keep | self.diag.to(keep.device)
        self._density_sum += float(keep.float().mean())  # a host read per call: fine for a benchmark baseline
        self._calls += 1
        layer = SkipLists.from_block_mask(keep[None], self.g).layer(0)
        return call.to_host_layout(sparse_attention_reference(q, k, v, layer, scale=call.scale))


def calibrate_both(model, caps, seeds, preset, steps, guidance, block, grid, frames=None, rho=0.5):
    """(bundle with repetition, bundle without) from one calibration pass."""
    st = CalibrationSettings(**eps_spec(preset), repetition=True, block_q=block, block_k=block, steps=steps,
                             rho=rho)
    cal = Calibrator(model.signature(), grid, st)
    try:
        with_rep = evaluate.run_calibration(model, cal, caps, seeds=seeds, steps=steps, guidance=guidance,
                                            frames=frames)
        # Repetition is decided in step_masks() from statistics gathered either way; turning it off here gives
        # the block-sparse-only bundle of the same calibration.
        cal.settings.repetition = False
        without = cal.finish()
        return with_rep, without
    finally:
        cal.close()


def evaluate_method(model, name, caps_b, seeds_b, caps_a, seeds_a, dense_b, dense_a, steps, guidance, *,
                    bundle=None, handler=None, density=None, frames=None):
    mode = "sparse" if bundle is not None else "handler"
    res = {"method": name}
    sets = [("B", caps_b, seeds_b, dense_b)] + ([("A", caps_a, seeds_a, dense_a)] if caps_a else [])
    for tag, caps, seeds, dense in sets:
        clips, att_s, _ = evaluate.generate(model, caps, seeds, steps=steps, guidance=guidance, mode=mode,
                                            bundle=bundle, handler=handler, frames=frames)
        ps = [evaluate.psnr(d, s) for d, s in zip(dense[0], clips)]
        ss = [evaluate.ssim(d, s) for d, s in zip(dense[0], clips)]
        res[tag] = {"psnr_db": [round(p, 3) for p in ps], "psnr_mean": round(sum(ps) / len(ps), 3),
                    "ssim_mean": round(sum(ss) / len(ss), 4),
                    "mse_mean": sum(float(((d - s) ** 2).mean()) for d, s in zip(dense[0], clips)) / len(ps),
                    "attention_s": round(att_s, 3), "speedup": round(dense[1] / att_s, 3)}
    if density is None:
        density = evaluate.sampled_density(bundle, steps) if bundle is not None else handler.mean_density()
    res["density"] = round(density, 4)
    if "A" in res:
        res["heldout_over_calib_error"] = round(res["B"]["mse_mean"] / max(res["A"]["mse_mean"], 1e-12), 3)
    a_part = (f"A: {res['A']['psnr_mean']:6.2f} dB  B/A mse {res['heldout_over_calib_error']:.2f}" if "A" in res
              else "A: not run")
    print(f"{name:28s} density {res['density']:.3f}  B: {res['B']['psnr_mean']:6.2f} dB SSIM "
          f"{res['B']['ssim_mean']:.3f}  {a_part}  speedup {res['B']['speedup']:.2f}x", flush=True)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--calib", type=int, default=3)
    ap.add_argument("--eval", type=int, default=3)
    ap.add_argument("--eval-a", type=int, default=2, help="calibration prompts re-generated for the held-out / "
                                                           "calibration error ratio (calibrated configs only)")
    ap.add_argument("--presets", nargs="+", default=["balanced", "quality", "fast"],
                    help="eps presets and/or explicit schedules A:C:k")
    ap.add_argument("--model", default="tinywan", choices=["tinywan", "tinywan64w"],
                    help="shipped model: tinywan (32 px, 2,048 tokens) or tinywan64w (64 px, 8,192 tokens, 4 heads x "
                         "64)")
    ap.add_argument("--weights", default=None, help="a tiny-model file not shipped (e.g. a train.py output); "
                                                    "overrides --model")
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--rho", type=float, default=0.5, help="cross-prompt vote: keep a block kept by this share")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--frames", type=int, default=None, help="shorter clips (smoke tests); default the model's")
    ap.add_argument("--device", default=None)
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--no-repetition", action="store_true", help="evaluate only the bundles without repetition heads")
    ap.add_argument("--out", default=str(ROOT / "output" / "bench" / "fidelity.json"))
    a = ap.parse_args(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_tinywan(a.weights, name=a.model, device=device, dtype=dtype)
    grid = model.cfg.grid(frames=a.frames)
    caps_a = data.training_captions(a.calib)
    seeds_a = list(range(100, 100 + len(caps_a)))  # the seeds calibration used
    caps_b = data.held_out_captions(a.eval)
    seeds_b = list(range(1000, 1000 + len(caps_b)))
    t0 = time.time()
    dense_b = evaluate.generate(model, caps_b, seeds_b, steps=a.steps, guidance=a.guidance, frames=a.frames)
    caps_a_eval, seeds_a_eval = caps_a[:a.eval_a], seeds_a[:a.eval_a]
    dense_a = evaluate.generate(model, caps_a_eval, seeds_a_eval, steps=a.steps, guidance=a.guidance,
                                frames=a.frames)
    print(f"dense: attention {dense_b[1]:.2f} s (B), {dense_a[1]:.2f} s (A)", flush=True)
    rows = []
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"

    def write(partial: bool) -> dict:
        result = {"device": dev, "model": a.weights or a.model, "rho": a.rho, "steps": a.steps, "guidance": a.guidance, "block": a.block,
                  "grid": grid.to_dict(), "calibration_prompts": caps_a, "held_out_prompts": caps_b,
                  "calibration_prompts_regenerated": caps_a_eval, "rows": rows, "partial": partial,
                  "seconds": round(time.time() - t0, 1), "torch": torch.__version__,
                  "date": time.strftime("%Y-%m-%d %H:%M"), "commit": _pkg.git_commit()}
        out = pathlib.Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, out)
        return result

    common = (caps_b, seeds_b, caps_a_eval, seeds_a_eval, dense_b, dense_a, a.steps, a.guidance)
    base = (caps_b, seeds_b, [], [], dense_b, None, a.steps, a.guidance)  # baselines: held-out set only
    for preset in a.presets:
        with_rep, without = calibrate_both(model, caps_a, seeds_a, preset, a.steps, a.guidance, a.block, grid,
                                           a.frames, rho=a.rho)
        for bundle, tag in ((with_rep, "rep"), (without, "norep"))[int(a.no_repetition):]:
            r = evaluate_method(model, f"calibatt {preset} {tag}", *common, bundle=bundle, frames=a.frames)
            r.update({"preset": preset, "repetition": tag == "rep", "bundle": bundle.summary()})
            rows.append(r)
        if a.no_baselines:
            continue
        d = rows[-1]["density"]  # the block-sparse-only config: baselines at the same density
        r = evaluate_method(model, f"window @ {preset} density", *base,
                            bundle=window_bundle(model, grid, a.block, d), frames=a.frames)
        rows.append({**r, "preset": preset, "baseline": "window"})
        tk = TopKOnline(grid, a.block, d)
        r = evaluate_method(model, f"topk-online @ {preset} density", *base, handler=tk, frames=a.frames)
        rows.append({**r, "preset": preset, "baseline": "topk-online"})
        write(partial=True)
    result = write(partial=False)
    print("\n| method | density | PSNR B (dB) | SSIM B | PSNR A (dB) | held-out / calib MSE | attn speedup |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        a_psnr = f"{r['A']['psnr_mean']:.2f}" if "A" in r else "-"
        ratio = f"{r['heldout_over_calib_error']:.2f}" if "A" in r else "-"
        print(f"| {r['method']} | {r['density']:.3f} | {r['B']['psnr_mean']:.2f} | {r['B']['ssim_mean']:.3f} | "
              f"{a_psnr} | {ratio} | {r['B']['speedup']:.2f}x |")
    print(f"wrote {a.out} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
