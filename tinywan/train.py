"""Train the tiny pixel-space Wan model on the procedural data set (flow matching), seeded and reproducible.

    python tinywan/train.py --out DIR [--steps N | --steps auto --budget-s 420] [--batch 64] [--seed 0]

`--steps auto` times 20 warm-up steps, then fixes the step count that fits the budget and prints it; pass that
number as --steps to reproduce the run (the schedule depends only on --steps, the seed and the batch size;
GPU kernels may still differ in the last bits). Writes DIR/tinywan.safetensors (EMA weights, float32 unless
--save-dtype), its sha256, train_log.json and contact_sheet.png (held-out captions, then training captions); with --name other than
tinywan, those two files are prefixed with the name. --heads / --head-dim / --ffn / --layers shape a model trained
from scratch (with --init the architecture is the starting weights'); --save-dtype bfloat16 halves the file.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))
import _pkg  # noqa: E402

_pkg.load_package()
from calibatt.tinywan import data, pipeline  # noqa: E402
from calibatt.tinywan.model import TinyWan, TinyWanConfig, file_sha256, load_tinywan, save_tinywan  # noqa: E402
from calibatt.tinywan.sheet import clip_strip, write_contact_sheet  # noqa: E402


def make_batch(n, gen, device, drop_p, drop_gen, size=data.SIZE, frames=data.FRAMES):
    clips, caps = data.batch(n, gen, device=device, size=size, frames=frames)
    drop = torch.rand(n, generator=drop_gen) < drop_p
    caps = ["" if d else c for c, d in zip(caps, drop.tolist())]
    return clips, caps


def train_step(model, opt, clips, caps, gen, device, use_bf16):
    B = clips.shape[0]
    t = torch.sigmoid(torch.randn(B, generator=gen)).to(device)  # logit-normal: most weight mid-schedule
    noise = torch.randn(clips.shape, generator=gen).to(device)
    tt = t.view(B, 1, 1, 1, 1)
    xt = (1 - tt) * clips + tt * noise
    target = noise - clips
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
        ctx = model.text(caps, device)
        pred = model.transformer(xt, t * 1000.0, ctx, return_dict=False)[0]
    loss = torch.nn.functional.mse_loss(pred.float(), target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", default="auto")
    ap.add_argument("--budget-s", type=float, default=420.0, help="training time for --steps auto")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=data.SIZE, help="frame size in pixels (a multiple of 2)")
    ap.add_argument("--frames", type=int, default=data.FRAMES, help="frames per clip (a multiple of 2)")
    ap.add_argument("--init", default=None, help="start from these weights (e.g. fine-tune the shipped 32 px model "
                                                 "at a larger --size: RoPE positions carry over)")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--name", default="tinywan", help="output file stem (DIR/<name>.safetensors)")
    ap.add_argument("--heads", type=int, default=None, help="attention heads (new model; default 4)")
    ap.add_argument("--head-dim", type=int, default=None, help="head dimension (new model; default 32; RoPE "
                                                               "splits it over t, h, w, so larger = finer positions)")
    ap.add_argument("--ffn", type=int, default=None, help="feed-forward width (new model; default 512)")
    ap.add_argument("--layers", type=int, default=None, help="transformer blocks (new model; default 6)")
    ap.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="storage type of the weights file (bfloat16 halves it; loading upcasts)")
    a = ap.parse_args(argv)
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(a.device)
    use_bf16 = device.type == "cuda"
    torch.manual_seed(a.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    arch = {k: v for k, v in (("dim_heads", a.heads), ("head_dim", a.head_dim), ("ffn_dim", a.ffn),
                                ("layers", a.layers)) if v is not None}
    if a.init and arch:
        ap.error("--heads/--head-dim/--ffn/--layers shape a new model; with --init the architecture is the "
                 "starting weights'")
    if a.init:
        base = load_tinywan(a.init, verify=False)
        cfg = dataclasses.replace(base.cfg, size=a.size, frames=a.frames)
        model = TinyWan(cfg)
        model.load_state_dict(base.state_dict())
        del base
    else:
        cfg = TinyWanConfig(size=a.size, frames=a.frames, **arch)
        model = TinyWan(cfg)
    model = model.to(device).train()
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.99), weight_decay=0.01)
    data_gen = torch.Generator().manual_seed(a.seed + 1)
    noise_gen = torch.Generator().manual_seed(a.seed + 2)
    drop_gen = torch.Generator().manual_seed(a.seed + 3)

    # Timing probe for --steps auto: its steps are real training steps at warm-up LR (counted in the total).
    steps = None if a.steps == "auto" else int(a.steps)
    warmup = a.warmup
    log = []
    t_start = time.time()
    step = 0
    total = steps if steps is not None else 10 ** 9

    def lr_at(i, n):
        if i < warmup:
            return a.lr * (i + 1) / warmup
        return a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (i - warmup) / max(1, n - warmup)))))

    probe_t0 = None
    while step < total:
        if steps is None and step == 5:
            if device.type == "cuda":
                torch.cuda.synchronize()
            probe_t0 = time.time()
        if steps is None and step == 25:
            if device.type == "cuda":
                torch.cuda.synchronize()
            per = (time.time() - probe_t0) / 20
            steps = total = max(warmup + 100, int((a.budget_s - (time.time() - t_start)) / per) + step)
            print(f"timing: {per * 1000:.1f} ms/step -> --steps {steps}", flush=True)
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step, total if steps is not None else 10 ** 6)
        clips, caps = make_batch(a.batch, data_gen, device, 0.1, drop_gen, size=a.size, frames=a.frames)
        loss = train_step(model, opt, clips, caps, noise_gen, device, use_bf16)
        with torch.no_grad():
            d = min(0.999, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - d)
        step += 1
        if step % 100 == 0 or step == total:
            lv = float(loss)
            log.append({"step": step, "loss": lv, "lr": opt.param_groups[0]["lr"], "s": time.time() - t_start})
            print(f"step {step}/{total} loss {lv:.4f} {time.time() - t_start:.0f}s", flush=True)
    train_s = time.time() - t_start

    ema = ema.float().eval()
    meta = {"train": {"steps": step, "batch": a.batch, "lr": a.lr, "seed": a.seed, "seconds": round(train_s, 1),
                      "size": a.size, "frames": a.frames, "init": pathlib.Path(a.init).name if a.init else None,
                      "init_sha256": file_sha256(a.init) if a.init else None,
                      "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                      "torch": torch.__version__, "final_loss": log[-1]["loss"] if log else None}}
    meta["train"]["save_dtype"] = a.save_dtype
    sha = save_tinywan(ema, out / f"{a.name}.safetensors", extra_meta=meta, dtype=getattr(torch, a.save_dtype))
    (out / f"{a.name}.sha256").write_text(f"{sha}  {a.name}.safetensors\n")
    held = data.held_out_captions(6)
    seen = data.training_captions(3)
    caps = held + seen
    clips = pipeline.generate(ema, caps, seeds=list(range(len(caps))), steps=a.sample_steps)
    truth = data.render([data.parse_caption(c) for c in caps], torch.Generator().manual_seed(0), size=a.size,
                        frames=a.frames)
    rows = [[clip_strip(c), clip_strip(t)] for c, t in zip(clips, truth)]
    labels = [("HELD-OUT: " if i < len(held) else "train: ") + c + "   (generated | a data sample)"
              for i, c in enumerate(caps)]
    write_contact_sheet(rows, labels, out / ("contact_sheet.png" if a.name == "tinywan" else
                                             f"{a.name}_contact_sheet.png"))
    log_file = out / ("train_log.json" if a.name == "tinywan" else f"{a.name}_train_log.json")
    log_file.write_text(json.dumps({**meta, "log": log, "sha256": sha}, indent=1))
    print(f"done: {step} steps in {train_s:.0f}s, sha256 {sha}", flush=True)


if __name__ == "__main__":
    main()
