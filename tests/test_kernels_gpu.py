"""The Triton kernels on a real GPU at real shapes (Wan 480p: 32,760 tokens, D=128), bf16 and fp16.

Skipped without CUDA (CI has none); bench/bench_kernels.py runs the same checks and more on the device.
"""

import math

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels run there)")]

from calibatt.kernels.reference import sparse_attention_reference  # noqa: E402
from calibatt.kernels.stats import block_energy  # noqa: E402
from calibatt.kernels.stats_reference import block_energy_reference  # noqa: E402
from calibatt.masks import BlockGeometry, RepetitionPlan, SkipLists  # noqa: E402


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("dtype,layout,density,n_text,B,rep", [
    (torch.bfloat16, "bld", 0.3, 0, 2, False),
    (torch.float16, "bhld", 1.0, 0, 1, False),
    (torch.bfloat16, "bhld", 0.0, 0, 1, False),  # a single (diagonal) block per row
    (torch.bfloat16, "bld", 0.2, 118, 2, True),  # trailing text + repetitive heads
])
def test_real_shape_matches_reference(dtype, layout, density, n_text, B, rep):
    from calibatt.kernels.triton_attention import sparse_attention_triton, to_bhld
    H, D, frames, T = 8, 128, 21, 1560
    n = frames * T  # 32,760: the last 128-block is partial
    g = BlockGeometry(n, 128, 128)
    gen = torch.Generator().manual_seed(int(density * 100) + n_text)
    plan = None
    if rep:
        slot = torch.full((1, H), -1, dtype=torch.int32)
        slot[0, 1] = 0
        plan = RepetitionPlan(T, slot, torch.randperm(T, generator=gen)[:5][None],
                              torch.randint(0, 5, (1, T), generator=gen))
    layer = SkipLists.from_block_mask(torch.rand(1, H, g.nq, g.nk, generator=gen) < density, g, plan).layer(0)
    layer = layer.to("cuda")
    N = n + n_text
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dtype) for _ in range(3))
    if layout == "bld":
        q, k, v = (t.transpose(1, 2).reshape(B, N, H * D) for t in (q, k, v))
    out = torch.full_like(q, float("nan"))
    sparse_attention_triton(q, k, v, layer, layout=layout, heads=H, out=out)
    assert not torch.isnan(out).any()
    ref = sparse_attention_reference(q, k, v, layer, layout=layout, heads=H)
    assert rel(out, ref) < (1e-2 if dtype == torch.bfloat16 else 3e-3)
    assert to_bhld(out, layout, H).shape == (B, H, N, D)


def test_block_energy_real_shape():
    H, D, n, n_text = 4, 128, 32760, 118
    g = BlockGeometry(n, 128, 128)
    q, k = (torch.randn(2, H, n + n_text, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    init = torch.rand(H, g.nq, g.nk, device="cuda")
    out = block_energy(q, k, g, out=init.clone())  # CUDA + bf16 -> the Triton kernel
    ref = block_energy_reference(q, k, g, out=init.clone())
    assert rel(out - init, ref - init) < 1e-2
    # each query row's mass over video blocks is at most 1 (the rest went to text)
    rows = torch.clamp(torch.arange(g.nq, device="cuda") * 128 + 128, max=n) - torch.arange(g.nq, device="cuda") * 128
    per_row = (out - init).sum(-1) / (2 * rows)
    assert float(per_row.max()) <= 1.0 + 1e-3 and math.isfinite(float(per_row.min()))
