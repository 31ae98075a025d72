"""GPU check of the three K/V load modes of the attention kernel (pointer loads, in-kernel TMA descriptors, host TMA
descriptors) against the reference, with text tokens and repetition. GPU: python3 bench/desc_modes_check.py"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from _pkg import load_package  # noqa: E402

load_package()
import torch  # noqa: E402

from calibatt.kernels import triton_attention as ta  # noqa: E402
from calibatt.kernels.reference import sparse_attention_reference  # noqa: E402
from calibatt.masks import BlockGeometry, RepetitionPlan, SkipLists  # noqa: E402


def main():
    torch.manual_seed(0)
    frames, T = 4, 300
    g = BlockGeometry(frames * T, 128, 128)
    H = 4
    slot = torch.tensor([[-1, -1, 0, -1]])
    rep = RepetitionPlan(T, slot, torch.tensor([[5, 100, 200]]), torch.randint(0, 3, (1, T)))
    layer = SkipLists.from_block_mask(torch.rand(1, H, g.nq, g.nk) < 0.4, g, rep).layer(0).to("cuda")
    ok = True
    for D in (64, 128):
        q, k, v = (torch.randn(2, H, frames * T + 77, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        ref = sparse_attention_reference(q, k, v, layer).float()
        for mode in (0, 1, 2):
            ta.set_tile_override(ta.TileConfig(128, 128, 8, 3, mode))
            out = torch.full_like(q, float("nan"))
            ta.sparse_attention_triton(q, k, v, layer, out=out)
            torch.cuda.synchronize()
            err = float((out.float() - ref).norm() / ref.norm())
            good = bool(torch.isfinite(out).all()) and err < 1e-2
            ok &= good
            print(f"D={D} mode={mode}: rel err {err:.2e} {'ok' if good else 'FAIL'}", flush=True)
    ta.set_tile_override(None)
    print("ALL MODES OK" if ok else "SOME MODE FAILED")


if __name__ == "__main__":
    main()
