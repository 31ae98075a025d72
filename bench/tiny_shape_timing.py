"""Where the time goes at the tiny models' shapes on a GPU: the Triton kernel alone after warm-up vs dense SDPA
(per call, random block masks at the given densities), and the per-step cost of building a bucket's skip lists.

GPU: python3 bench/tiny_shape_timing.py [--grid 8 16 16] [--densities 0.8] [--block 64]
     (--grid 8 32 32 is the 64 px model's 8,192 tokens)
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from _pkg import load_package  # noqa: E402

load_package()
import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from calibatt.kernels.dense import dense_attention  # noqa: E402
from calibatt.kernels.attention import triton_fwd as TA  # noqa: E402
from calibatt.masks import BlockGeometry, MaskBundle, ModelSignature, TokenGrid  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", type=int, nargs=3, default=[8, 16, 16], metavar=("T", "H", "W"))
    ap.add_argument("--densities", type=float, nargs="+", default=[0.8])
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=32, help="32: tinywan; 64: tinywan64w")
    ap.add_argument("--tiles", type=int, nargs=4, default=None, metavar=("BM", "BN", "WARPS", "STAGES"),
                    help="force the kernel tile (BM / BN must divide the block size)")
    ap.add_argument("--tma", type=int, default=None, choices=[0, 1, 2],
                    help="force K/V loads: 0 pointers, 1 in-kernel TMA descriptors, 2 host TMA descriptors "
                         "(default: the tile table's choice)")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    base = None
    if a.tma is not None or a.tiles is not None:
        base = TA.pick_tiles(a.head_dim, a.block, a.block, torch.device("cuda"))
        if a.tma is not None:
            base = dataclasses.replace(base, tma=a.tma)
        if a.tiles is not None:
            base = dataclasses.replace(base, block_m=a.tiles[0], block_n=a.tiles[1], num_warps=a.tiles[2],
                                       stages=a.tiles[3])
    grid = TokenGrid(*a.grid)
    g = BlockGeometry(grid.video_tokens, a.block, a.block)
    L, H, D = 6, a.heads, a.head_dim
    q, k, v = (torch.randn(a.batch, H, grid.video_tokens, D, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    t_dense = do_bench(lambda: dense_attention(q, k, v), warmup=25, rep=200, return_mode="median")
    for dens in a.densities:
        buckets = [torch.rand(L, H, g.nq, g.nk) < dens for _ in range(10)]
        b = MaskBundle.from_block_masks(ModelSignature("tinywan", L, H, D, H * D), grid, g, buckets,
                                        torch.linspace(1, 0.1, 10).tolist(), list(range(10)))
        layer = b.skip_lists(0, "cuda").layer(0)
        TA.sparse_attention_triton(q, k, v, layer, tiles=base)
        torch.cuda.synchronize()
        t_sparse = do_bench(lambda: TA.sparse_attention_triton(q, k, v, layer, tiles=base), warmup=25, rep=200,
                            return_mode="median")
        t0 = time.perf_counter()
        for i in range(1, 10):
            b.skip_lists(i, "cuda")
        torch.cuda.synchronize()
        t_build = (time.perf_counter() - t0) / 9 * 1e3
        loads = "table" if a.tma is None else a.tma
        print(f"{grid.video_tokens} tokens, B={a.batch}, H={H}, D={D}, blocks {a.block}, density "
              f"{float(b.density):.3f}, K/V loads {loads}, tiles {a.tiles or 'table'}: triton sparse "
              f"{t_sparse:.3f} ms/call, dense {t_dense:.3f} ms/call ({t_dense / t_sparse:.2f}x), bucket build "
              f"{t_build:.1f} ms/step ({L} layers)", flush=True)


if __name__ == "__main__":
    main()
