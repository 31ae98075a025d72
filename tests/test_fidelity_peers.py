"""bench/fidelity_peers.py's Sol-Attn handler: the routed set it counts for the density is the one comfy-kitchen's
reference routes (checked through the reference's output without its pooled tail), and the handler matches the
target density. Needs comfy_kitchen (installed with ComfyUI; run under the ComfyUI venv), skipped without it."""

import pathlib
import sys

import pytest
import torch

pytest.importorskip("comfy_kitchen", reason="comfy_kitchen (ComfyUI's kernel package) is not installed in this venv; "
                                            "run under the ComfyUI venv")
from comfy_kitchen.backends.eager.sol_attn import sol_attn  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
from fidelity_peers import SolAttn  # noqa: E402

from calibatt.calibration.hybrid import block_mask_attention  # noqa: E402
from calibatt.kernels.call import AttentionCall  # noqa: E402
from calibatt.kernels.dense import dense_attention  # noqa: E402
from calibatt.masks import BlockGeometry, TokenGrid  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = TokenGrid(2, 16, 16)  # 512 tokens: 8 blocks of 64, Sol-Attn's block


def _qkv(seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, GRID.video_tokens, 16, generator=g, dtype=torch.float64) for _ in range(3))
    k[:, :, 128:192] += 1.5 * q[:, :, :64].mean(2, keepdim=True)  # a key block many queries favour
    return q, k, v


@pytest.mark.parametrize("kk", [1, 3, 5])
def test_routed_mask_is_the_references_routing(kk):
    q, k, v = _qkv(kk)
    h = SolAttn(sol_attn, GRID, 0.5, tail=False)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    mask = h.routed_mask(qt, kt, kk)
    assert mask.shape == (2, 2, 8, 8) and not bool(mask.all())
    ref = sol_attn(qt, kt, vt, scale=0.25, topk_ratio=kk / 8, tail=False).transpose(1, 2)
    mine = block_mask_attention(q, k, v, mask, BlockGeometry(GRID.video_tokens, 64, 64), scale=0.25)
    assert torch.allclose(ref.double(), mine, atol=1e-5)
    # one block more or less routes another set: the comparison can tell them apart
    other = h.routed_mask(qt, kt, kk + 1)
    assert not torch.allclose(ref.double(), block_mask_attention(q, k, v, other, BlockGeometry(512, 64, 64),
                                                                 scale=0.25), atol=1e-3)


def test_handler_matches_the_target_density_and_the_tail_moves_the_output():
    q, k, v = _qkv(9)
    call = AttentionCall(q, k, v, "bhld", 2, 0, 1.0, GRID, scale=0.25)
    plain, pooled = SolAttn(sol_attn, GRID, 0.6, tail=False), SolAttn(sol_attn, GRID, 0.6, tail=True)
    a, b = plain(call), pooled(call)
    assert abs(plain.mean_density() - 0.6) <= 1.5 / 8  # the nearest routed-set size to 0.6 of 8 blocks
    assert plain.mean_density() == pytest.approx(pooled.mean_density())
    dense = dense_attention(q, k, v, 0.25)
    assert not torch.allclose(a, b, atol=1e-4)
    assert float((b - dense).norm()) < float((a - dense).norm())  # the pooled tail brings the rest back, roughly
