"""Bundle size for a Wan 2.1 14B 720p, 50-step bundle with realistic mask structure.

Structure source: sta_mask_strategy_hunyuan.json (--data PATH, else found as bench/_data.py says, e.g. in
../shared/data beside the checkout), real per-(step, layer, head) 3D window sizes chosen for HunyuanVideo 720p
(FastVideo's Sliding Tile Attention). It is not Wan's and not CalibAtt's output: each window [t, h, w] (in 5 x 6 x
10 tiles of the grid) is scaled to Wan 720p's 21 x 45 x 80 token grid and turned into a 128 x 128 block mask (key
block kept if any of its tokens lies inside the window around any token of the query block). Layer l of Wan uses STA
layer l, head h uses STA head h mod 24.

Variants:
- exact: the windows as they are (many entries share a window, so dedup makes the bundle small);
- perturbed: every (step, layer, head) additionally flips p of the blocks on its window's edge at random, so no two
  entries are identical: the worst case for dedup, showing the XOR-with-parent + zlib coding cost.

Usage: python bench/bench_bundle_size.py [--data PATH] [--perturb 0.02] [--out docs-figures.json]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from _pkg import load_package  # noqa: E402
from _data import DATA_NAME, find_sta_data, load_sta_strategy  # noqa: E402  (bench/ is on sys.path)

load_package()
from calibatt.masks import BlockGeometry, MaskBundle, ModelSignature, TokenGrid, save_bundle, load_bundle  # noqa
from calibatt.masks.packing import pack_bits  # noqa: E402

STEPS, LAYERS, HEADS = 50, 40, 40
GRID = TokenGrid(frames=21, height=45, width=80)
TILES = (5, 6, 10)


def block_boxes(geom: BlockGeometry, grid: TokenGrid, block: int):
    idx = torch.arange(geom.num_tokens)
    t = idx // grid.frame_tokens
    h = (idx // grid.width) % grid.height
    w = idx % grid.width
    pad = geom.nq * block - geom.num_tokens
    def box(x):
        x = torch.nn.functional.pad(x.float(), (0, pad), value=float("nan")).view(geom.nq, block)
        return torch.nan_to_num(x, nan=float("inf")).amin(1), torch.nan_to_num(x, nan=float("-inf")).amax(1)
    return [box(t), box(h), box(w)]


def window_mask(boxes, window, grid):
    """[nq, nk] bool: blocks within the 3D window (half-extent in tokens per axis) of each other."""
    sizes = (grid.frames, grid.height, grid.width)
    keep = None
    for (lo, hi), win, tiles, size in zip(boxes, window, TILES, sizes):
        half = win / tiles * size / 2.0
        # interval distance between the two blocks' extents on this axis
        gap = torch.clamp(torch.maximum(lo[:, None] - hi[None, :], lo[None, :] - hi[:, None]), min=0)
        k = gap <= half
        keep = k if keep is None else keep & k
    return keep


def build(data_path, perturb, seed=0, steps=STEPS, first=0):
    strategy = load_sta_strategy(data_path)
    geom = BlockGeometry(GRID.video_tokens, 128, 128)
    boxes = block_boxes(geom, GRID, 128)
    diag = geom.diagonal()
    gen = torch.Generator().manual_seed(seed)
    cache, packed, ids = {}, [], {}
    entry = torch.empty(steps, LAYERS, HEADS, dtype=torch.int32)
    for s in range(steps):
        for l in range(LAYERS):
            for h in range(HEADS):
                win = tuple(strategy[f"{first + s}_{l}_{h % 24}"])
                if win not in cache:
                    cache[win] = window_mask(boxes, win, GRID) | diag
                m = cache[win]
                if perturb > 0 and win != TILES:
                    # flip blocks on the window's edge: where a one-block-wider window differs
                    edge = window_mask(boxes, tuple(x + 0.5 for x in win), GRID) & ~m if ("e", win) not in cache \
                        else cache[("e", win)]
                    cache[("e", win)] = edge
                    flip = edge & (torch.rand(edge.shape, generator=gen) < perturb * 10)
                    drop = m & ~diag & (torch.rand(m.shape, generator=gen) < perturb)
                    m = (m | flip) & ~drop
                bits = pack_bits(m)
                key = bits.numpy().tobytes()
                if key not in ids:
                    ids[key] = len(packed)
                    packed.append(bits)
                entry[s, l, h] = ids[key]
    sig = ModelSignature("wan21", LAYERS, HEADS, 128, 5120)
    sigmas = torch.linspace(1.0, 0.02, steps).tolist()
    return MaskBundle(signature=sig, grid=GRID, geometry=geom, calibrated_sigmas=sigmas,
                      step_bucket=list(range(steps)), packed_masks=torch.stack(packed), entry_mask=entry,
                      entry_rep=torch.full((steps, LAYERS, HEADS), -1, dtype=torch.int32),
                      rep_anchors=torch.zeros(0, 5, dtype=torch.long),
                      rep_row_anchor=torch.zeros(0, GRID.frame_tokens, dtype=torch.long),
                      settings={"source": "STA HunyuanVideo windows mapped to Wan 720p", "perturb": perturb})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=None, help="the STA window file (default: found as bench/_data.py says)")
    ap.add_argument("--perturb", type=float, nargs="*", default=[0.0, 0.002, 0.01])
    ap.add_argument("--steps", type=int, default=STEPS,
                    help="steps to build (the perturbed variant holds every distinct mask in memory: 44 KB each)")
    ap.add_argument("--first-step", type=int, default=0, help="start at this STA step (0-14 are all dense)")
    ap.add_argument("--out")
    args = ap.parse_args()
    args.data = find_sta_data(args.data)
    if args.data is None or not args.data.is_file():
        sys.exit(f"bench_bundle_size: {args.data or DATA_NAME} not found. It is sta_mask_strategy_hunyuan.json "
                 "from the shared data folder: put that folder's parent beside the checkout as ../shared "
                 "(make bench-size SHARED=DIR for another place), or pass --data PATH")
    rows = []
    g = BlockGeometry(GRID.video_tokens, 128, 128)
    raw_mask = g.nq * ((g.nk + 7) // 8)
    for p in args.perturb:
        t0 = time.time()
        b = build(args.data, p, steps=args.steps, first=args.first_step)
        with tempfile.TemporaryDirectory() as d:
            path = save_bundle(b, Path(d) / "wan14b_720p.safetensors")
            t1 = time.time()
            size = path.stat().st_size
            b2 = load_bundle(path)
            t2 = time.time()
            assert b2.num_unique_masks == b.num_unique_masks
        entries = args.steps * LAYERS * HEADS
        row = {"perturb": p, "steps": args.steps, "first_step": args.first_step,
               "distinct_masks": b.num_unique_masks, "entries": entries,
               "density": round(b.density, 4), "bytes": size, "MB": round(size / 1e6, 2),
               "untrimmed_bitpacked_MB": round(entries * raw_mask / 1e6, 1),
               "bytes_per_entry": round(size / entries, 1),
               "MB_if_50_steps": round(size / entries * STEPS * LAYERS * HEADS / 1e6, 2),
               "build_save_s": round(t1 - t0, 1), "load_validate_s": round(t2 - t1, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
