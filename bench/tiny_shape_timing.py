"""Where the time goes at the tiny demo shape (B=2, 4 heads x 32, 2,048 tokens, blocks of 64) on a GPU:
the Triton kernel alone after warm-up, dense SDPA, and the per-step cost of building a bucket's skip lists.

GPU: python3 bench/tiny_shape_timing.py
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from _pkg import load_package  # noqa: E402

load_package()
import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from calibatt.kernels.dense import dense_attention  # noqa: E402
from calibatt.kernels.triton_attention import sparse_attention_triton  # noqa: E402
from calibatt.masks import BlockGeometry, MaskBundle, ModelSignature, SkipLists, TokenGrid  # noqa: E402


def main():
    torch.manual_seed(0)
    grid = TokenGrid(8, 16, 16)
    g = BlockGeometry(grid.video_tokens, 64, 64)
    L, H, D = 6, 4, 32
    buckets = [SkipLists.from_block_mask(torch.rand(L, H, g.nq, g.nk) < 0.8, g) for _ in range(10)]
    b = MaskBundle.from_skip_lists(ModelSignature("tinywan", L, H, D, H * D), grid, buckets,
                                   torch.linspace(1, 0.1, 10).tolist(), list(range(10)))
    q, k, v = (torch.randn(2, H, grid.video_tokens, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    layer = b.skip_lists(0, "cuda").layer(0)
    sparse_attention_triton(q, k, v, layer)
    torch.cuda.synchronize()
    t_sparse = do_bench(lambda: sparse_attention_triton(q, k, v, layer), warmup=25, rep=200, return_mode="median")
    t_dense = do_bench(lambda: dense_attention(q, k, v), warmup=25, rep=200, return_mode="median")
    t0 = time.perf_counter()
    for i in range(1, 10):
        b.skip_lists(i, "cuda")
    torch.cuda.synchronize()
    t_build = (time.perf_counter() - t0) / 9 * 1e3
    print(f"tiny shape: triton sparse {t_sparse:.3f} ms/call, dense {t_dense:.3f} ms/call, "
          f"bucket build {t_build:.1f} ms/step ({L} layers)")


if __name__ == "__main__":
    main()
