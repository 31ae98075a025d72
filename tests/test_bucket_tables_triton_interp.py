"""The Triton skip-table builder (kernels/tables/triton_build.py) and the runner's Triton path over per-call tables, run on
the CPU by Triton's interpreter: the builder writes the previous scheme's tables, and the runner's output (sparse
layers, a mixed layer's dense heads in the same launch, a repetitive head) matches the reference and float64 dense
attention across bucket changes. float16 only (the interpreter's bf16 dot is wrong, see
test_kernels_triton_interp.py); the GPU side is tests/test_bucket_tables.py's CUDA test and bench/memory_step.py."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels' @triton.jit runs (it decides at decoration time)

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

triton = pytest.importorskip("triton")
from triton_interp import interpreted_kernels  # noqa: E402

TA, TS = interpreted_kernels()

import calibatt.kernels.tables.triton_build as TT  # noqa: E402
from calibatt.kernels.tables.naive import packed_to_table  # noqa: E402
from calibatt.kernels import tables as BT  # noqa: E402
from calibatt.kernels.tables import BucketTables  # noqa: E402
from calibatt.kernels.call import AttentionCall  # noqa: E402
from calibatt.kernels.attention.naive import sparse_attention_reference  # noqa: E402
from calibatt.kernels.runner import DENSE_CUTOFF, SparseRunner  # noqa: E402
from calibatt.kernels.support import KernelHealth  # noqa: E402
from calibatt.masks.packing import pack_bits  # noqa: E402
from helpers_core import rel  # noqa: E402
from helpers_tables import assert_same_layer, old_bucket_layers, old_mask_to_table, random_bundle  # noqa: E402

import triton.runtime.interpreter as _interp  # noqa: E402

if not isinstance(TT._packed_rows_to_table, _interp.InterpretedFunction):
    TT = importlib.reload(TT)  # compiled for a GPU by an earlier import: interpret it here


def _full_heads(bundle, bucket, cutoff=DENSE_CUTOFF):
    above = bundle.entry_densities()[bucket] > cutoff
    return above & (above.any(-1) & ~above.all(-1))[:, None]


@settings(max_examples=12, deadline=None)
@given(H=st.integers(1, 3), nq=st.integers(1, 7), nk=st.integers(1, 90), density=st.floats(0.0, 1.0),
       extra=st.integers(0, 5), with_full=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_triton_builder_writes_the_argsort_tables(H, nq, nk, density, extra, with_full, seed):
    """Straight from the packed bits into int16 tables with counts: rows of up to 90 key blocks (several bytes and
    a partial byte), empty rows, widths beyond the longest row, full heads."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(H, nq, nk, generator=gen) < density
    full = (torch.rand(H, generator=gen) < 0.5) if with_full else None
    eff = mask | full[:, None, None] if full is not None else mask
    W = min(nk, max(1, int(eff.sum(-1).max())) + extra)
    want, want_c = old_mask_to_table(eff, W)
    idx = torch.full((H, nq, W), -7, dtype=torch.int16)
    cnt = torch.full((H, nq), -7, dtype=torch.int32)
    TT.packed_to_table_triton(pack_bits(mask).contiguous(), nk, idx, cnt,
                              None if full is None else full.to(torch.uint8))
    assert torch.equal(idx, want) and torch.equal(cnt, want_c)
    naive, naive_c = packed_to_table(pack_bits(mask), nk, W, full)  # the reference beside the Triton builder
    assert torch.equal(idx, naive) and torch.equal(cnt, naive_c)


def test_triton_builder_int32_indices_past_32767_key_blocks():
    """nk > 32767 key blocks: the table switches to int32 and the builder writes it (one query block)."""
    nk = 33000
    gen = torch.Generator().manual_seed(2)
    mask = torch.rand(1, 1, nk, generator=gen) < 0.001
    mask[0, 0, [0, 32767, 32768, nk - 1]] = True
    W = int(mask.sum())
    want, want_c = old_mask_to_table(mask, W)
    assert want.dtype == torch.int32
    idx = torch.zeros(1, 1, W, dtype=torch.int32)
    cnt = torch.zeros(1, 1, dtype=torch.int32)
    TT.packed_to_table_triton(pack_bits(mask), nk, idx, cnt)
    assert torch.equal(idx, want) and torch.equal(cnt, want_c)
    assert int(idx.max()) == nk - 1


@pytest.mark.parametrize("mode", ["streamed", "resident"])
def test_bucket_tables_with_the_triton_builder_equal_the_previous_scheme(mode):
    bundle, grid, lists = random_bundle(11, L=4, H=3, frames=3, height=5, width=7, block_q=16, block_k=32)
    health = KernelHealth()
    for b in range(bundle.num_buckets):
        full = _full_heads(bundle, b)
        old = old_bucket_layers(bundle, b, full)
        t = BucketTables(bundle, b, "cpu", full_heads=full, builder="triton", mode=mode, health=health)
        for l, f in [(3, False), (1, True), (1, False), (2, False), (0, True), (3, False), (1, True)]:
            plain, widened = old[l]
            assert_same_layer(t.layer(l, full=f), widened if f and widened is not None else plain)
    assert health.ok(("table builder", "cpu"))  # no silent fallback to the torch builder


def test_runner_triton_path_over_per_call_tables(monkeypatch):
    """The runner's Triton path on the CPU (the interpreter stands in for the GPU: _triton_ok is widened to CPU
    float16, the Triton builder forced): heads below the cutoff, a repetitive head among them, equal the reference
    on the bundle's original skip lists; heads above it (a sparse one included, so its full-row table differs
    from its mask) equal float64 dense attention; over two buckets and back, text tokens after the video."""
    monkeypatch.setattr(BT, "RESIDENT_BYTES", 0)  # streamed: every call rebuilds the one buffer
    monkeypatch.setattr(SparseRunner, "_triton_ok", staticmethod(lambda q: q.dtype == torch.float16))
    n_text = 5
    bundle, grid, lists = random_bundle(21, L=4, H=3, frames=3, height=4, width=10, block_q=16, block_k=16,
                                        n_text=n_text)
    dens = bundle.entry_densities()
    cutoff = 0.5 * float(dens[0, 1, 1])  # layer 1: head 0 (all blocks) and the sparse head 1 run as full rows
    runner = SparseRunner(bundle, dense_cutoff=cutoff, table_builder="triton")
    gen = torch.Generator().manual_seed(6)
    B, H, Nv, D = 2, 3, grid.video_tokens, 16
    N = Nv + n_text
    q, k, v = (torch.randn(B, H, N, D, generator=gen).to(torch.float16) for _ in range(3))
    dense = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    seen, widened = set(), 0
    # Bucket changes, a layer repeated, layers with different table widths in between.
    for sigma, layer in ((1.0, 1), (1.0, 3), (1.0, 1), (0.1, 1), (0.1, 2), (1.0, 1)):
        bucket = runner.begin_step(sigma, "cpu")
        above = dens[bucket] > cutoff
        kind = runner.route(layer)
        seen.add(kind)
        out = runner(AttentionCall(q, k, v, "bhld", H, layer, sigma, grid))
        ref = sparse_attention_reference(q.float(), k.float(), v.float(), lists[bucket].layer(layer))
        lo, hi = ~above[layer], above[layer]
        assert rel(out[:, lo], ref[:, lo]) < 3e-3
        if bool(hi.any()):
            assert rel(out[:, hi], dense[:, hi]) < 3e-3
            widened += rel(ref[:, hi], dense[:, hi]) > 1e-2  # those heads' own masks are sparse
    assert {"mixed", "sparse"} <= seen and widened >= 1
    above = dens[0] > cutoff
    assert lists[0].layer(1).repetition is not None and not bool(above[1, 2])  # a repetitive head below the cutoff
    assert runner._health.ok(("table builder", "cpu"))  # no silent fallback to the torch builder
    runner.end()
