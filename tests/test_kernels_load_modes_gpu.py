"""The attention kernel's three K/V load modes (pointer loads, in-kernel TMA descriptors, host TMA descriptors)
against the reference, with text tokens after the video and a repetitive head, bf16, D 64 and 128.

Skipped without CUDA (CI has none); it was bench/desc_modes_check.py (docs/BENCHMARKS.md, "K/V load modes").
"""

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels run there)")]

from calibatt.kernels import triton_attention as ta  # noqa: E402
from calibatt.kernels.reference import sparse_attention_reference  # noqa: E402
from calibatt.masks import BlockGeometry, RepetitionPlan, SkipLists  # noqa: E402

MODES = {0: "pointer loads", 1: "in-kernel TMA descriptors", 2: "host TMA descriptors"}


@pytest.mark.parametrize("mode", sorted(MODES), ids=list(MODES.values()))
@pytest.mark.parametrize("D", [64, 128])
def test_every_load_mode_matches_the_reference(mode, D):
    if mode and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA descriptors need sm90+")
    gen = torch.Generator().manual_seed(0)
    frames, T, H = 4, 300, 4
    g = BlockGeometry(frames * T, 128, 128)
    rep = RepetitionPlan(T, torch.tensor([[-1, -1, 0, -1]]), torch.tensor([[5, 100, 200]]),
                         torch.randint(0, 3, (1, T), generator=gen))
    layer = SkipLists.from_block_mask(torch.rand(1, H, g.nq, g.nk, generator=gen) < 0.4, g, rep).layer(0).to("cuda")
    q, k, v = (torch.randn(2, H, frames * T + 77, D, generator=gen).to("cuda", torch.bfloat16) for _ in range(3))
    ref = sparse_attention_reference(q, k, v, layer).float()
    out = torch.full_like(q, float("nan"))  # an unwritten row stays NaN
    ta.set_tile_override(ta.TileConfig(128, 128, 8, 3, mode))
    try:
        ta.sparse_attention_triton(q, k, v, layer, out=out)
        torch.cuda.synchronize()
    finally:
        ta.set_tile_override(None)
    assert bool(torch.isfinite(out).all()), f"{MODES[mode]}: rows left unwritten"
    err = float((out.float() - ref).norm() / ref.norm())
    assert err < 1e-2, f"{MODES[mode]}, D={D}: relative error {err:.2e}"
