"""Small builders shared by the core tests: random skip lists and bundles with real structure."""

import torch

from calibatt.masks import BlockGeometry, MaskBundle, ModelSignature, RepetitionPlan, SkipLists, TokenGrid


def random_block_mask(L, H, geometry, density, gen):
    return torch.rand(L, H, geometry.nq, geometry.nk, generator=gen) < density


def make_bundle(*, L=2, H=3, grid=None, block=16, steps=4, shared_steps=True, repetition=True, seed=0,
                density=0.3, family="wan21"):
    gen = torch.Generator().manual_seed(seed)
    grid = grid or TokenGrid(frames=3, height=6, width=8)
    g = BlockGeometry(grid.video_tokens, block, block)
    sig = ModelSignature(family, L, H, 16, 16 * H)
    buckets = []
    base = random_block_mask(L, H, g, density, gen)
    for b in range(steps - 1 if shared_steps else steps):
        m = base.clone()
        m[0, 0] ^= torch.rand(g.nq, g.nk, generator=gen) < 0.1  # late buckets differ a little from each other
        rep = None
        if repetition and b == 0:
            slot = torch.full((L, H), -1, dtype=torch.int32)
            slot[0, H - 1] = 0
            K = 2
            anchors = torch.randperm(grid.frame_tokens, generator=gen)[:K][None]
            row_anchor = torch.randint(0, K, (1, grid.frame_tokens), generator=gen)
            rep = RepetitionPlan(grid.frame_tokens, slot, anchors, row_anchor)
        buckets.append(SkipLists.from_block_mask(m, g, rep))
    sigmas = torch.linspace(1.0, 0.05, steps).tolist()
    step_bucket = list(range(len(buckets)))
    if shared_steps:
        step_bucket.append(len(buckets) - 1)  # the last two steps share a bucket
    return MaskBundle.from_skip_lists(sig, grid, buckets, sigmas, step_bucket,
                                      settings={"preset": "balanced", "rho": 0.5})
