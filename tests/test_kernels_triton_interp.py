"""The Triton kernels, run on the CPU by Triton's interpreter, against the reference and float64 dense attention.

Tiny shapes (the interpreter is slow). float16 only: the Triton 3.6 interpreter's bf16 tl.dot is wrong (its
numpy emulation of bf16 operands), so bf16 is covered by the GPU tests (test_kernels_gpu.py) and the device
benchmark instead.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels' @triton.jit runs (it decides at decoration time)

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

triton = pytest.importorskip("triton")
from triton_interp import interpreted_kernels  # noqa: E402

TA, TS = interpreted_kernels()

from calibatt.kernels.attention.naive import sparse_attention_reference  # noqa: E402
from calibatt.kernels.support import KernelUnsupported  # noqa: E402
from calibatt.kernels.block_energy import block_energy  # noqa: E402
from calibatt.kernels.block_energy.naive import block_energy_reference  # noqa: E402
from calibatt.masks import BlockGeometry, RepetitionPlan, SkipLists  # noqa: E402
from calibatt.masks.skiplists import LayerSkipList  # noqa: E402
from helpers_core import rel, token_mask  # noqa: E402


def make_inputs(B, H, N, D, layout, gen, dtype=torch.float16):
    q, k, v = (torch.randn(B, H, N, D, generator=gen).to(dtype) for _ in range(3))
    if layout == "bld":
        q, k, v = (t.transpose(1, 2).reshape(B, N, H * D) for t in (q, k, v))
    return q, k, v


def run_poisoned(q, k, v, layer, layout, H, tiles=None):
    out = torch.full_like(q, float("nan"))
    res = TA.sparse_attention_triton(q, k, v, layer, layout=layout, heads=H, out=out, tiles=tiles)
    assert res.data_ptr() == out.data_ptr()
    assert not torch.isnan(res).any(), "some output element was never written"
    return res


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 180), n_text=st.sampled_from([0, 7]), heads=st.integers(1, 2),
       block=st.sampled_from([(16, 16), (32, 16), (16, 32), (32, 32)]), d=st.sampled_from([16, 64]),
       density=st.floats(0.0, 1.0), batch=st.integers(1, 2), layout=st.sampled_from(["bhld", "bld"]),
       seed=st.integers(0, 2**31 - 1))
def test_sparse_matches_reference_and_float64(n, n_text, heads, block, d, density, batch, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    g = BlockGeometry(n, *block)
    layer = SkipLists.from_block_mask(torch.rand(1, heads, g.nq, g.nk, generator=gen) < density, g).layer(0)
    N = n + n_text
    q, k, v = make_inputs(batch, heads, N, d, layout, gen)
    out = run_poisoned(q, k, v, layer, layout, heads)
    ref = sparse_attention_reference(q.float(), k.float(), v.float(), layer, layout=layout, heads=heads)
    assert rel(out, ref) < 3e-3
    qh, kh, vh, oh = (TA.to_bhld(t, layout, heads) for t in (q, k, v, out))
    want = F.scaled_dot_product_attention(qh.double(), kh.double(), vh.double(),
                                          attn_mask=token_mask(layer, n, n_text)[None])
    assert rel(oh, want) < 3e-3


@pytest.mark.parametrize("case", ["dense", "single", "tail64"])
def test_edge_masks(case):
    gen = torch.Generator().manual_seed(hash(case) % 1000)
    H, D = 2, 64
    if case == "tail64":  # 64-wide mask blocks iterated as kernel tiles, partial last block, text after it
        n, n_text, g = 150, 5, BlockGeometry(150, 64, 64)
    else:
        n, n_text, g = 160, 0, BlockGeometry(160, 32, 32)
    if case == "dense":
        m = torch.ones(1, H, g.nq, g.nk, dtype=torch.bool)
    elif case == "single":
        m = torch.zeros(1, H, g.nq, g.nk, dtype=torch.bool)  # from_block_mask adds the diagonal: 1 block/row
    else:
        m = torch.rand(1, H, g.nq, g.nk, generator=gen) < 0.5
        m[..., -1] = True  # the partial last key block listed for every row
    layer = SkipLists.from_block_mask(m, g).layer(0)
    if case == "single":
        assert int(layer.kv_counts.max()) == 1
    q, k, v = make_inputs(1, H, n + n_text, D, "bhld", gen)
    out = run_poisoned(q, k, v, layer, "bhld", H)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                          attn_mask=token_mask(layer, n, n_text)[None])
    assert rel(out, want) < 3e-3


def test_repetition_plan_and_skip_heads():
    gen = torch.Generator().manual_seed(5)
    frames, T, H, D, n_text = 3, 40, 2, 16, 6
    n = frames * T
    g = BlockGeometry(n, 16, 16)
    slot = torch.tensor([[-1, 0]], dtype=torch.int32)
    plan = RepetitionPlan(T, slot, torch.randperm(T, generator=gen)[:3][None],
                          torch.randint(0, 3, (1, T), generator=gen))
    layer = SkipLists.from_block_mask(torch.rand(1, H, g.nq, g.nk, generator=gen) < 0.4, g, plan).layer(0)
    q, k, v = make_inputs(2, H, n + n_text, D, "bld", gen)
    out = run_poisoned(q, k, v, layer, "bld", H)
    ref = sparse_attention_reference(q.float(), k.float(), v.float(), layer, layout="bld", heads=H)
    assert rel(out, ref) < 3e-3
    # skip_heads leaves a head to the caller: those outputs stay untouched (still the poison)
    out2 = torch.full_like(q, float("nan"))
    TA.sparse_attention_triton(q, k, v, layer, layout="bld", heads=H, out=out2, skip_heads=torch.tensor([True, False]))
    o2 = TA.to_bhld(out2, "bld", H)
    assert torch.isnan(o2[:, 0]).all()
    assert rel(o2[:, 1], TA.to_bhld(ref, "bld", H)[:, 1]) < 3e-3


def test_full_heads_give_exact_dense_for_those_heads_in_one_launch():
    """The runner's mixed layers on the Triton path: heads above the cutoff list every key block (and stop being
    repetitive), the others keep their mask and repetition plan."""
    gen = torch.Generator().manual_seed(9)
    frames, T, H, D, n_text = 3, 40, 3, 16, 5
    n = frames * T
    g = BlockGeometry(n, 16, 16)
    slot = torch.tensor([[0, -1, 0]], dtype=torch.int32)
    plan = RepetitionPlan(T, slot, torch.randperm(T, generator=gen)[:3][None],
                          torch.randint(0, 3, (1, T), generator=gen))
    layer = SkipLists.from_block_mask(torch.rand(1, H, g.nq, g.nk, generator=gen) < 0.3, g, plan).layer(0)
    full = layer.with_full_heads(torch.tensor([True, True, False]))
    assert int(full.kv_counts[:2].min()) == g.nk and torch.equal(full.kv_counts[2], layer.kv_counts[2])
    assert full.repetition.head_slot.tolist() == [-1, -1, int(layer.repetition.head_slot[2])]
    assert torch.equal(full.block_mask()[2], layer.block_mask()[2])
    q, k, v = make_inputs(2, H, n + n_text, D, "bhld", gen)
    out = run_poisoned(q, k, v, full, "bhld", H)
    dense = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    ref = sparse_attention_reference(q.float(), k.float(), v.float(), layer)
    assert rel(out[:, :2], dense[:, :2]) < 3e-3
    assert rel(out[:, 2:], ref[:, 2:]) < 3e-3
    assert rel(ref[:, :2], dense[:, :2]) > 1e-2  # those heads were really sparse / repetitive before


@settings(max_examples=6, deadline=None)
@given(n=st.integers(1, 150), n_text=st.sampled_from([0, 9]), heads=st.integers(1, 2),
       block=st.sampled_from([(16, 16), (32, 16), (16, 32)]), batch=st.integers(1, 2), seed=st.integers(0, 2**31 - 1))
def test_block_energy_matches_reference_and_float64(n, n_text, heads, block, batch, seed):
    gen = torch.Generator().manual_seed(seed)
    g = BlockGeometry(n, *block)
    N, D = n + n_text, 16
    q, k = (torch.randn(batch, heads, N, D, generator=gen).to(torch.float16) for _ in range(2))
    init = torch.rand(heads, g.nq, g.nk, generator=gen)  # accumulation target with prior content
    out = TS.block_energy_triton(q, k, g, out=init.clone())
    ref = block_energy_reference(q.float(), k.float(), g, out=init.clone())
    assert rel(out - init, ref - init) < 1e-4
    # float64 from the full probability matrix (tiny N), summed per block independently
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(D), -1)[:, :, :n, :n]
    qi = torch.arange(n) // g.block_q
    ki = torch.arange(n) // g.block_k
    want = torch.zeros(heads, g.nq, g.nk, dtype=torch.float64)
    want.index_put_((torch.arange(heads)[:, None, None], qi[None, :, None], ki[None, None, :]),
                    p.sum(0), accumulate=True)
    assert rel(out - init, want) < 1e-4


def test_block_energy_cpu_dispatch_uses_reference():
    gen = torch.Generator().manual_seed(1)
    g = BlockGeometry(40, 16, 16)
    q, k = (torch.randn(1, 2, 40, 16, generator=gen) for _ in range(2))
    assert torch.equal(block_energy(q, k, g), block_energy_reference(q, k, g))


def test_unsupported_inputs_raise_clear_errors():
    g = BlockGeometry(32, 16, 16)
    layer = SkipLists.from_block_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool), g).layer(0)
    q = torch.randn(1, 1, 32, 24).half()
    with pytest.raises(KernelUnsupported, match="head_dim 24"):
        TA.sparse_attention_triton(q, q, q, layer)
    q = torch.randn(1, 1, 32, 16)
    with pytest.raises(KernelUnsupported, match="float16 or bfloat16"):
        TA.sparse_attention_triton(q, q, q, layer)
    q = torch.randn(1, 1, 20, 16).half()
    with pytest.raises(ValueError, match="does not cover"):
        TA.sparse_attention_triton(q, q, q, layer)
    odd = SkipLists.from_block_mask(torch.ones(1, 1, 4, 4, dtype=torch.bool), BlockGeometry(32, 8, 8)).layer(0)
    with pytest.raises(KernelUnsupported, match="8x8"):
        TA.sparse_attention_triton(torch.randn(1, 1, 32, 16).half(), *(torch.randn(1, 1, 32, 16).half(),) * 2, odd)


@pytest.mark.parametrize("blocks,tma,group", [((32, 32), 0, 1), ((64, 32), 0, 4), ((32, 32), 2, 4)])
def test_mask_block_iterated_as_smaller_tiles(blocks, tma, group):
    """A mask block wider than the kernel tile is walked as several tiles (128-wide blocks as 64 tiles on the
    GPU); forced here with 16x16 tiles on small blocks, text tokens and a partial last block included. tma=2 runs
    the host TMA-descriptor loads (the Hopper default) through the interpreter; group > 1 exercises the grouped
    reduction of the statistics kernel with more key blocks than one group."""
    gen = torch.Generator().manual_seed(sum(blocks) + tma)
    H, D, n, n_text = 2, 16, 110, 4
    g = BlockGeometry(n, *blocks)
    layer = SkipLists.from_block_mask(torch.rand(1, H, g.nq, g.nk, generator=gen) < 0.5, g).layer(0)
    q, k, v = make_inputs(2 if group == 1 else 1, H, n + n_text, D, "bld" if tma else "bhld", gen)
    tiles = TA.TileConfig(16, 16, 4, 2, tma)
    layout = "bld" if tma else "bhld"
    assert TA.pick_tiles(D, *blocks, q.device, tiles).block_m == 16
    out = run_poisoned(q, k, v, layer, layout, H, tiles)
    qh, kh, vh, oh = (TA.to_bhld(t, layout, H) for t in (q, k, v, out))
    e = TS.block_energy_triton(qh, kh, g, tiles=tiles, group=group)
    want = F.scaled_dot_product_attention(qh.double(), kh.double(), vh.double(),
                                          attn_mask=token_mask(layer, n, n_text)[None])
    assert rel(oh, want) < 3e-3
    assert rel(e, block_energy_reference(qh.float(), kh.float(), g)) < 1e-4


def test_skip_list_on_another_device_is_refused_not_copied_per_call():
    """The kernel never copies a skip list per call: a list whose tables sit on another device than q is an error
    that says how to move it once (a CPU stand-in for "another device": the list's tensors on the meta device)."""
    g = BlockGeometry(64, 16, 16)
    layer = SkipLists.from_block_mask(torch.ones(1, 2, g.nq, g.nk, dtype=torch.bool), g).layer(0)
    moved = LayerSkipList(g, layer.kv_indices.to("meta"), layer.kv_counts.to("meta"))
    q = torch.randn(1, 2, 64, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"LayerSkipList.to\(device\)"):
        TA.sparse_attention_triton(q, q, q, moved)
