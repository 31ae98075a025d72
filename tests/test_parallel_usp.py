"""Our sparse attention inside the real yunchang (xDiT's USP engine) over gloo on the CPU: LongContextAttention
(Ulysses x Ring) and UlyssesAttention with their attention function swapped by SequenceParallelSparse.install; each
rank's output equals the one-process reference on the whole sequence (float64) with dense, sparse and repetitive
heads, text after and before the video, a text key bias, and head counts the Ulysses degree does not divide.
yunchang is a test dependency (Makefile TEST_PACKAGES); the module skips where it is not installed."""

import dist_harness  # noqa: F401  (first: makes `calibatt` importable in the spawned ranks)

import pytest
import torch

pytest.importorskip("yunchang", reason="yunchang (xDiT's USP engine) is not installed: make setup installs it")

from calibatt.kernels.attention.naive import sparse_attention_reference  # noqa: E402
from calibatt.masks import BlockGeometry, RepetitionPlan, SkipLists  # noqa: E402
from calibatt.parallel import SequenceParallelSparse  # noqa: E402

FRAMES, FT, BLOCK, TEXT = 3, 16, 8, 8


def mixed_lists(L, H, seed):
    """L layers: head 0 dense, the last head of layer 0 repetitive, others local windows with random extras."""
    gen = torch.Generator().manual_seed(seed)
    g = BlockGeometry(FRAMES * FT, BLOCK, BLOCK)
    i = torch.arange(g.nq)[:, None]
    j = torch.arange(g.nk)[None, :]
    m = torch.zeros(L, H, g.nq, g.nk, dtype=torch.bool)
    for l in range(L):
        m[l, 0] = True
        for h in range(1, H):
            m[l, h] = ((i - j).abs() <= (h + l) % 2) | (torch.rand(g.nq, g.nk, generator=gen) < 0.1)
    slot = torch.full((L, H), -1, dtype=torch.int32)
    slot[0, H - 1] = 0
    plan = RepetitionPlan(FT, slot, torch.randperm(FT, generator=gen)[:3].sort().values[None],
                          torch.randint(0, 3, (1, FT), generator=gen))
    return SkipLists.from_block_mask(m, g, plan)


def _usp_worker(rank, world, U, R, H, text_first, module_kind, cutoff=1.0):
    from yunchang import LongContextAttention, UlyssesAttention, set_seq_parallel_pg
    from yunchang.globals import PROCESS_GROUP
    from yunchang.kernels import AttnType

    set_seq_parallel_pg(U, R, rank, world)
    lists = mixed_lists(2, H, seed=H * 10 + world)
    if module_kind == "ulysses":
        # TORCH_MATH only so the constructor does not ask for flash_attn; install replaces the function
        module = UlyssesAttention(PROCESS_GROUP.ULYSSES_PG, attn_type=AttnType.TORCH_MATH)
        sp = SequenceParallelSparse(lists, ulysses_group=PROCESS_GROUP.ULYSSES_PG, dense_cutoff=cutoff)
    else:
        module = LongContextAttention(ring_impl_type="basic_pytorch", attn_type=AttnType.TORCH_MATH)
        sp = SequenceParallelSparse(lists, ulysses_group=PROCESS_GROUP.ULYSSES_PG, ring_group=PROCESS_GROUP.RING_PG,
                                    densities=lists.head_densities(), dense_cutoff=cutoff)
    sp.install(module)
    N = FRAMES * FT + TEXT
    vs = TEXT if text_first else 0
    gen = torch.Generator().manual_seed(5)
    B, D = 2, 8
    bias = torch.zeros(B, TEXT, dtype=torch.float64)
    bias[0, :2] = float("-inf")
    S = N // world
    for layer in range(2):
        q, k, v = (torch.randn(B, N, H, D, generator=gen, dtype=torch.float64) for _ in range(3))  # (B, S, H, D)
        # heads above the dense cutoff run dense, as in SparseRunner
        spec = lists.layer(layer).with_full_heads(lists.layer(layer).head_densities() > cutoff)
        want = sparse_attention_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), spec,
                                          text_bias=bias, video_start=vs).transpose(1, 2)
        sl = slice(rank * S, (rank + 1) * S)
        got = sp.attention(module, q[:, sl], k[:, sl], v[:, sl], layer=layer, video_start=vs, text_bias=bias)
        err = float((got - want[:, sl]).abs().max())
        assert err < 1e-12, f"rank {rank} layer {layer}: max error {err}"


@pytest.mark.parametrize("U,R,H,text_first,kind,cutoff", [
    (2, 1, 5, False, "usp", 1.0),   # pure Ulysses through LongContextAttention, 5 heads on 2 ranks (a padding slot)
    (4, 1, 5, True, "usp", 0.3),    # 5 heads on 4 Ulysses ranks: 2 slots each, 3 padding slots
    (2, 2, 5, True, "usp", 0.3),    # USP hybrid 2 x 2, text first; heads above density 0.3 routed dense
    (1, 2, 4, False, "usp", 1.0),   # pure ring through LongContextAttention
    (2, 1, 3, True, "ulysses", 0.3),  # UlyssesAttention's attn_fn seam
])
def test_yunchang_usp_equals_one_process(U, R, H, text_first, kind, cutoff):
    dist_harness.run_ranks(_usp_worker, U * R, U, R, H, text_first, kind, cutoff)
