"""Mask bundles of realistic structure at a chosen density, for bench/model_step.py.

Structure: FastVideo's Sliding Tile Attention windows for HunyuanVideo 720p (sta_mask_strategy_hunyuan.json, real
per-(step, layer, head) window sizes; not Wan's and not CalibAtt's output), mapped onto the benchmarked model's token
grid as bench/bench_bundle_size.py does (layer l takes STA layer l mod 60, head h STA head h mod 24), plus a share of
dense heads per layer (most layers mixed, as calibrated bundles are). One bucket, so every step of a timed run uses
the same masks.

A density is reached by two knobs, chosen so the structure stays the data's: the dense heads per layer (a share of
0.1 by default, more only when the windows are too sparse for the target) and one scale on every window's extent
(bisection; below 1 when the windows are denser than the target). The data file is found by bench/_data.py;
without it the same window vocabulary is drawn at random (labelled "synthetic" in the output).
"""

from __future__ import annotations

import torch

from bench_bundle_size import TILES, block_boxes, window_mask  # noqa: E402  (bench/ is on sys.path)
from calibatt.masks import BlockGeometry, MaskBundle  # noqa: E402
from calibatt.masks.packing import pack_bits  # noqa: E402

# STA's window vocabulary from step 15 on, with its frequencies there (dense windows excluded): the synthetic
# fallback when the data file is absent (same as bench/memory_step.py).
SYNTH_WINDOWS = [((5, 3, 3), 20380), ((1, 6, 10), 15916), ((3, 3, 5), 7396), ((5, 1, 10), 5244), ((5, 6, 1), 1464)]


class WindowSource:
    """Per (layer, head) STA window of one STA step, and the density of each window on one block geometry."""

    def __init__(self, grid, block, L, H, strategy, sta_step, seed):
        self.grid, self.L, self.H = grid, L, H
        self.geometry = BlockGeometry(grid.video_tokens, block, block)
        self.boxes = block_boxes(self.geometry, grid, block)
        self.diag = self.geometry.diagonal()
        gen = torch.Generator().manual_seed(seed)
        weights = torch.tensor([w for _, w in SYNTH_WINDOWS], dtype=torch.float)
        self.windows = [[tuple(strategy[f"{sta_step}_{l % 60}_{h % 24}"]) if strategy is not None
                         else SYNTH_WINDOWS[int(torch.multinomial(weights, 1, generator=gen))][0]
                         for h in range(H)] for l in range(L)]
        self._masks = {}

    def mask(self, win, scale):
        """[nq, nk] bool: the window (its extent times `scale`, never below the block diagonal) or the full grid."""
        key = (win, round(scale, 6))
        if key not in self._masks:
            if win == TILES:
                m = torch.ones(self.geometry.nq, self.geometry.nk, dtype=torch.bool)
            else:
                m = window_mask(self.boxes, tuple(w * scale for w in win), self.grid) | self.diag
            self._masks[key] = m
        return self._masks[key]

    def mean_density(self, scale):
        dens = {w: float(self.mask(w, scale).float().mean()) for w in {w for row in self.windows for w in row}}
        return sum(dens[w] for row in self.windows for w in row) / (self.L * self.H)


def realistic_bundle(signature, grid, block, target, strategy, *, sta_step=20, dense_share=0.1, seed=0,
                     source_label=""):
    """-> (MaskBundle with one bucket, facts {density, dense_share, window_scale, ...}). target >= 0.999: every
    block of every head (the patch's dense routing, or with a dense cutoff of 1 the kernel over full rows)."""
    L, H = signature.num_layers, signature.num_heads
    src = WindowSource(grid, block, L, H, strategy, sta_step, seed)
    g = src.geometry
    full = target >= 0.999
    scale = 1.0
    n_dense = H if full else int(round(dense_share * H))
    if not full:
        def density(n, sc):  # the bundle's mean density with n dense heads per layer and windows scaled by sc
            return (n + (H - n) * src.mean_density(sc)) / H
        while n_dense < H and density(n_dense, 1.0) < target:  # windows alone too sparse: more dense heads
            n_dense += 1
        lo, hi = 0.02, 1.0  # bisection on the window scale (density grows with it), the dense heads fixed
        for _ in range(18):
            mid = (lo + hi) / 2
            if density(n_dense, mid) < target:
                lo = mid
            else:
                hi = mid
        # window masks change in whole blocks: the density is a step function of the scale; take the closer side
        scale = min((lo, hi), key=lambda sc: abs(density(n_dense, sc) - target))
    gen = torch.Generator().manual_seed(seed + 1)
    packed, ids = [], {}
    entry = torch.empty(1, L, H, dtype=torch.int32)

    def mask_id(m):
        bits = pack_bits(m)
        key = bits.numpy().tobytes()
        if key not in ids:
            ids[key] = len(packed)
            packed.append(bits)
        return ids[key]

    ones = torch.ones(g.nq, g.nk, dtype=torch.bool)
    for l in range(L):
        dense = set(torch.randperm(H, generator=gen)[:n_dense].tolist())
        for h in range(H):
            entry[0, l, h] = mask_id(ones if h in dense else src.mask(src.windows[l][h], scale))
    bundle = MaskBundle(signature=signature, grid=grid, geometry=g, calibrated_sigmas=[0.5], step_bucket=[0],
                        packed_masks=torch.stack(packed), entry_mask=entry,
                        entry_rep=torch.full((1, L, H), -1, dtype=torch.int32),
                        rep_anchors=torch.zeros(0, 4, dtype=torch.long),
                        rep_row_anchor=torch.zeros(0, grid.frame_tokens, dtype=torch.long),
                        settings={"source": source_label or ("STA HunyuanVideo windows" if strategy else "synthetic")})
    dens = bundle.entry_densities()[0]
    facts = {"target": target, "density": round(float(dens.mean()), 4), "dense_heads_per_layer": n_dense,
             "window_scale": round(scale, 4), "sta_step": sta_step if strategy is not None else None,
             "structure": bundle.settings["source"], "distinct_masks": len(packed), "block": block,
             "nq": g.nq, "nk": g.nk}
    return bundle, facts
