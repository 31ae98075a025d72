"""Per-call skip-list tables (kernels/tables/__init__.py): the same tables as the previous scheme (a whole bucket built
at once), the runner's output unchanged, and the device memory one bucket holds at Wan 14B 720p geometry under 2 %
of the model's weights (the previous scheme held ~2 GB there)."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from calibatt.kernels import tables as BT
from calibatt.kernels.tables import BucketTables
from calibatt.kernels.call import AttentionCall
from calibatt.kernels.dense import dense_attention
from calibatt.kernels.attention.naive import sparse_attention_reference
from calibatt.kernels.runner import DENSE_CUTOFF, SparseRunner
from calibatt.masks import BlockGeometry, MaskBundle, ModelSignature, TokenGrid, mask_to_table
from calibatt.masks.packing import pack_bits
from calibatt.masks.skiplists import packed_to_table
from helpers_tables import assert_same_layer, old_bucket_layers, old_mask_to_table, random_bundle

pytestmark = pytest.mark.usefixtures("one_thread")

WAN14B_WEIGHT_BYTES = 14e9 * 2  # bf16
BOUND = 0.02 * WAN14B_WEIGHT_BYTES  # 560 MB


@settings(max_examples=30, deadline=None)
@given(lead=st.sampled_from([(), (3,), (2, 3)]), nq=st.integers(1, 9), nk=st.integers(1, 70),
       density=st.floats(0.0, 1.0), extra=st.integers(0, 3), seed=st.integers(0, 2**31 - 1))
def test_compaction_equals_the_argsort_tables(lead, nq, nk, density, extra, seed):
    """mask_to_table and packed_to_table (prefix sum + scatter) write what the stable argsort wrote, padding and
    the empty-row case included, at the longest row's width or wider."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(*lead, nq, nk, generator=gen) < density
    longest = max(1, int(mask.sum(-1).max()) if mask.numel() else 1)
    W = min(nk, longest + extra)
    want, want_c = old_mask_to_table(mask, W)
    got, got_c = mask_to_table(mask, width=W)
    assert got.dtype == want.dtype and torch.equal(got, want) and torch.equal(got_c, want_c)
    got, got_c = packed_to_table(pack_bits(mask), nk, W)
    assert torch.equal(got, want) and torch.equal(got_c, want_c)
    if lead:
        full = torch.rand(lead, generator=gen) < 0.5
        got, got_c = packed_to_table(pack_bits(mask), nk, nk, full)
        want, want_c = old_mask_to_table(mask | full[..., None, None], nk)
        assert torch.equal(got, want) and torch.equal(got_c, want_c)


def _full_heads(bundle, bucket, cutoff=DENSE_CUTOFF):
    """What the runner marks: heads above the cutoff in layers that also have heads below it."""
    above = bundle.entry_densities()[bucket] > cutoff
    return above & (above.any(-1) & ~above.all(-1))[:, None]


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), block=st.sampled_from([(16, 16), (16, 32), (32, 16), (8, 8)]),
       dims=st.sampled_from([(3, 5, 7), (2, 6, 8), (4, 3, 11)]), mode=st.sampled_from(["streamed", "resident"]),
       cutoff=st.sampled_from([DENSE_CUTOFF, 0.3]))
def test_tables_equal_the_previous_scheme(seed, block, dims, mode, cutoff):
    """Every layer, plain and with full heads, in a scrambled order with repeats (a reused buffer must never show
    a stale layer): the same kept blocks per row, padding, width, counts and repetition plans as the tables the
    previous scheme built for the whole bucket (argsort, then with_full_heads). 105- and 132-token grids end in
    a partial block at every block size here."""
    bundle, grid, lists = random_bundle(seed, frames=dims[0], height=dims[1], width=dims[2], block_q=block[0],
                                        block_k=block[1])
    gen = torch.Generator().manual_seed(seed)
    for b in range(bundle.num_buckets):
        full = _full_heads(bundle, b, cutoff)
        old = old_bucket_layers(bundle, b, full)
        t = BucketTables(bundle, b, "cpu", full_heads=full, builder="torch", mode=mode)
        assert t.mode == mode
        visits = [(l, f) for l in range(bundle.num_layers) for f in (False, True)] * 2
        for i in torch.randperm(len(visits), generator=gen).tolist():
            l, f = visits[i]
            new = t.layer(l, full=f)
            plain, widened = old[l]
            assert_same_layer(new, widened if f and widened is not None else plain)
            if not f:  # and the skip lists the bundle was made from (their own tables, same masks)
                assert_same_layer(new, lists[b].layer(l))


def _expected(bundle, lists, bucket, layer, q, k, v, cutoff=DENSE_CUTOFF):
    """The runner's specified output: dense for heads above the cutoff, else the reference on the skip lists the
    bundle was made from."""
    above = bundle.entry_densities()[bucket, layer] > cutoff
    dense = dense_attention(q, k, v)
    if bool(above.all()):
        return dense
    out = sparse_attention_reference(q, k, v, lists[bucket].layer(layer))
    out[:, above] = dense[:, above]
    return out


@pytest.mark.parametrize("mode", ["streamed", "resident"])
def test_runner_output_unchanged(monkeypatch, mode):
    """The runner (reference path on the CPU) over two buckets and back, layers out of order and repeated, equals
    the reference on the bundle's original skip lists with dense heads filled in; every route is exercised."""
    monkeypatch.setattr(BT, "RESIDENT_BYTES", 1 << 40 if mode == "resident" else 0)
    bundle, grid, lists = random_bundle(3, L=4, H=3)
    runner = SparseRunner(bundle)
    gen = torch.Generator().manual_seed(4)
    B, H, N, D = 2, 3, grid.video_tokens, 16
    qh, kh, vh = (torch.randn(B, H, N, D, generator=gen) for _ in range(3))
    q, k, v = (t.transpose(1, 2).reshape(B, N, H * D) for t in (qh, kh, vh))
    routes = set()
    for sigma in (1.0, 0.1, 1.0):
        bucket = runner.begin_step(sigma, "cpu")
        assert runner._tables.mode == mode
        for layer in (3, 1, 2, 0, 1, 3):
            routes.add(runner.route(layer))
            out = runner(AttentionCall(q, k, v, "bld", H, layer, sigma, grid))
            want = _expected(bundle, lists, bucket, layer, qh, kh, vh)
            torch.testing.assert_close(out.view(B, N, H, D).transpose(1, 2), want, rtol=1e-5, atol=1e-5)
    assert routes == {"dense", "mixed", "sparse"}
    assert runner.held_bytes() > 0
    runner.end()
    assert runner.held_bytes() == 0


def test_previous_scheme_bytes_formula_matches_its_tensors():
    """The previous scheme's bytes per bucket (used for the 720p comparison below), checked against the tensors
    it built: every layer's [H, nq, W] int16 table and [H, nq] int32 counts, plus a full-width copy per mixed
    layer."""
    bundle, grid, lists = random_bundle(5, L=5, H=4)
    g = bundle.geometry
    for b in range(bundle.num_buckets):
        full = _full_heads(bundle, b)
        built = old_bucket_layers(bundle, b, full)
        tensors = {}
        for plain, widened in built:
            for lay in (plain, widened):
                if lay is not None:
                    for t in (lay.kv_indices, lay.kv_counts):
                        tensors[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        assert sum(tensors.values()) == _previous_bytes(bundle, b, full)
        assert int(full.any(-1).sum()) >= 1 and g.nq > 1


def _previous_bytes(bundle, bucket, full):
    g = bundle.geometry
    H = bundle.num_heads
    isz = 2 if g.nk <= 32767 else 4
    widths = bundle.layer_widths(bucket)
    total = sum(H * g.nq * (max(1, int(w)) * isz + 4) for w in widths)
    return total + int(full.any(-1).sum()) * H * g.nq * (g.nk * isz + 4)


def _wan720p_bundle(seed=0, distinct=12, dense_share=0.1):
    """Wan 14B at 720p: 40 layers x 40 heads, 75,600 tokens (21 x 45 x 80), 128-token blocks (591 x 591), two
    buckets of density ~0.4 with a tenth of the heads dense (so most layers are mixed). A dozen distinct masks
    are shared by the 3,200 entries: the device state does not depend on which masks repeat, and building 3,200
    distinct ones would cost the CPU seconds for nothing."""
    gen = torch.Generator().manual_seed(seed)
    grid = TokenGrid(frames=21, height=45, width=80)
    g = BlockGeometry(grid.video_tokens, 128, 128)
    assert (g.nq, g.nk) == (591, 591)
    masks = [(torch.rand(g.nq, g.nk, generator=gen) < 0.3 + 0.15 * torch.rand(1, generator=gen)) | g.diagonal()
             for _ in range(distinct - 1)] + [torch.ones(g.nq, g.nk, dtype=torch.bool)]
    packed = torch.stack([pack_bits(m) for m in masks])
    L, H, Bk = 40, 40, 2
    entry = torch.randint(0, distinct - 1, (Bk, L, H), generator=gen, dtype=torch.int32)
    entry[torch.rand(Bk, L, H, generator=gen) < dense_share] = distinct - 1
    return MaskBundle(signature=ModelSignature("wan21", L, H, 128, 5120), grid=grid, geometry=g,
                      calibrated_sigmas=[1.0, 0.5], step_bucket=[0, 1], packed_masks=packed, entry_mask=entry,
                      entry_rep=torch.full((Bk, L, H), -1, dtype=torch.int32),
                      rep_anchors=torch.zeros(0, 4, dtype=torch.long),
                      rep_row_anchor=torch.zeros(0, grid.frame_tokens, dtype=torch.long))


def test_held_bytes_at_wan_720p_stay_under_two_percent_of_the_weights():
    """The runner's device state for one bucket at the real Wan 14B 720p geometry, measured from the tensors it
    keeps after building tables (a sparse layer and a mixed layer's full-head variant, which is the widest):
    exactly the packed masks of the non-dense layers + the head flags + one table buffer + one counts table + the
    built layers' row tables,
    under 2 % of the 28 GB of bf16 weights, and a small fraction of what the previous scheme held (two buckets'
    tables and the full-width copies of the mixed layers)."""
    bundle = _wan720p_bundle()
    g = bundle.geometry
    L, H = bundle.num_layers, bundle.num_heads
    runner = SparseRunner(bundle)
    bucket = runner.begin_step(0.5, "cpu")
    tables = runner._tables  # the runner's own state, inspected
    assert tables.mode == "streamed"
    kinds = [runner.route(l) for l in range(L)]
    mixed = [l for l in range(L) if kinds[l] == "mixed"]
    sparse = [l for l in range(L) if kinds[l] == "sparse"]
    assert mixed and len(mixed) > L // 2
    tables.layer(sparse[0] if sparse else mixed[0])
    tables.layer(mixed[0], full=True)
    used = sum(k != "dense" for k in kinds)
    want = (used * H * g.nq * ((g.nk + 7) // 8)  # packed masks
            + L * H  # full-head flags (uint8)
            + H * g.nq * g.nk * 2  # the one table buffer, as wide as a full head's rows
            + H * g.nq * 4  # counts
            + 2 * H * 4)  # the two layers' row tables (rows per head left to an anchor broadcast: none here)
    assert tables.held_bytes() == want
    held = runner.held_bytes()
    assert held <= want + 2 * L * H * 8  # the mixed layers' routing rows (the reference path's dense heads)
    assert held <= BOUND, f"{held / 1e6:.0f} MB held, bound {BOUND / 1e6:.0f} MB"
    full0 = _full_heads(bundle, bucket)
    previous = _previous_bytes(bundle, 0, full0) + _previous_bytes(bundle, 1, torch.zeros_like(full0))
    assert previous > 1.5e9 and previous > 10 * held
    runner.end()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (stream-ordered builds, sync check)")
def test_runner_on_cuda_builds_tables_without_host_sync():
    """On a GPU: a new bucket's begin_step and its sparse / mixed calls (Triton builder + Triton attention, a
    repetitive head included) never make the host wait, and the outputs equal the reference."""
    bundle, grid, lists = random_bundle(8, L=4, H=3, frames=4, height=8, width=16, block_q=64, block_k=64,
                                        head_dim=64)
    runner = SparseRunner(bundle)
    gen = torch.Generator().manual_seed(1)
    B, H, N, D = 2, 3, grid.video_tokens, 64
    qh, kh, vh = (torch.randn(B, H, N, D, generator=gen).to("cuda", torch.bfloat16) for _ in range(3))
    layers = [1, 2, 3]  # mixed and sparse routes (layer 0 routes dense: cuDNN's own syncs are not ours)
    for sigma in (1.0, 0.1):  # compile every kernel variant first
        runner.begin_step(sigma, "cuda")
        for l in layers:
            runner(AttentionCall(qh, kh, vh, "bhld", H, l, sigma, grid))
    torch.cuda.synchronize()
    outs = {}
    torch.cuda.set_sync_debug_mode("error")
    try:
        for sigma in (1.0, 0.1):
            bucket = runner.begin_step(sigma, "cuda")
            for l in layers:
                outs[(bucket, l)] = runner(AttentionCall(qh, kh, vh, "bhld", H, l, sigma, grid))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert not runner.triton_failures
    for (bucket, l), out in outs.items():
        want = _expected(bundle, lists, bucket, l, qh.float(), kh.float(), vh.float())
        assert float((out.float() - want).norm() / want.norm()) < 1e-2
