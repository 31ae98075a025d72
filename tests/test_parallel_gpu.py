"""Sparse attention inside yunchang / xfuser on one CUDA GPU (a one-rank group): the Ulysses-only path runs the
Triton kernel where the runner would, through the engines' own modules, and matches the float32 reference.

Skipped without CUDA (CI has none) and where yunchang / xfuser are not installed. One rank only: the several-GPU
runs are listed in docs/PARALLEL.md. xfuser cannot even be imported without a GPU (xfuser/envs.py raises), so this
is the only place its xFuserLongContextAttention seam can run."""

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels run there)")]

pytest.importorskip("yunchang", reason="yunchang (xDiT's USP engine) is not installed: make setup installs it")

import torch.distributed as dist  # noqa: E402

import calibatt.kernels.attention.triton_fwd as triton_attention  # noqa: E402
from calibatt.kernels.attention.naive import sparse_attention_reference  # noqa: E402
from calibatt.masks import BlockGeometry, RepetitionPlan, SkipLists  # noqa: E402
from calibatt.parallel import SequenceParallelSparse  # noqa: E402

H, D, T, FRAMES, BLOCK, TEXT = 5, 64, 256, 3, 64, 16


def lists(seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = BlockGeometry(FRAMES * T, BLOCK, BLOCK)
    i, j = torch.arange(g.nq)[:, None], torch.arange(g.nk)[None, :]
    m = torch.zeros(2, H, g.nq, g.nk, dtype=torch.bool)
    m[:, 0] = True
    for h in range(1, H):
        m[:, h] = ((i - j).abs() <= h % 2) | (torch.rand(g.nq, g.nk, generator=gen) < 0.1)
    slot = torch.full((2, H), -1, dtype=torch.int32)
    slot[0, H - 1] = 0
    plan = RepetitionPlan(T, slot, torch.randperm(T, generator=gen)[:4].sort().values[None],
                          torch.randint(0, 4, (1, T), generator=gen))
    return SkipLists.from_block_mask(m, g, plan)


@pytest.fixture
def one_rank_groups():
    from yunchang import set_seq_parallel_pg
    from yunchang.globals import PROCESS_GROUP

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    from dist_harness import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    set_seq_parallel_pg(1, 1, 0, 1)
    yield PROCESS_GROUP
    dist.destroy_process_group()


def _run(module, groups, monkeypatch, text_first):
    sl = lists()
    sp = SequenceParallelSparse(sl, ulysses_group=groups.ULYSSES_PG, ring_group=groups.RING_PG, dense_cutoff=0.5)
    sp.install(module)
    calls = []
    real = triton_attention.sparse_attention_triton
    monkeypatch.setattr(triton_attention, "sparse_attention_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    N = FRAMES * T + TEXT
    vs = TEXT if text_first else 0
    bias = torch.zeros(1, TEXT, device="cuda")
    bias[0, -3:] = float("-inf")
    for layer in range(2):
        q, k, v = (torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        got = sp.attention(module, q, k, v, layer=layer, video_start=vs, text_bias=bias)
        spec = sl.layer(layer).with_full_heads(sl.layer(layer).head_densities() > 0.5).to("cuda")
        want = sparse_attention_reference(*(t.float().transpose(1, 2) for t in (q, k, v)), spec, text_bias=bias,
                                          video_start=vs).transpose(1, 2)
        rel = float((got.float() - want).norm() / want.norm())
        assert rel < 2e-2, (layer, rel)
    assert len(calls) == 2, "the Triton kernel did not run"


@pytest.mark.parametrize("text_first", [False, True])
def test_yunchang_one_rank_runs_the_triton_kernel(one_rank_groups, monkeypatch, text_first):
    from yunchang import LongContextAttention
    from yunchang.kernels import AttnType

    _run(LongContextAttention(ring_impl_type="basic_pytorch", attn_type=AttnType.TORCH_MATH), one_rank_groups,
         monkeypatch, text_first)


def test_xfuser_long_context_attention_seam(one_rank_groups, monkeypatch):
    hybrid = pytest.importorskip("xfuser.core.long_ctx_attention",
                                 reason="xfuser (xDiT) and its dependencies are not installed")
    _run(hybrid.xFuserLongContextAttention(), one_rank_groups, monkeypatch, False)
