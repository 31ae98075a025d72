"""SparseRunner dispatch: dense above the density cutoff (whole layer or single heads), sparse below it."""

import pathlib
import re

import pytest
import torch

from calibatt.kernels.call import AttentionCall
from calibatt.kernels.dense import dense_attention
from calibatt.kernels.attention.naive import sparse_attention_reference
from calibatt.kernels.runner import DENSE_CUTOFF, SparseRunner
from calibatt.masks import BlockGeometry, MaskBundle, ModelSignature, SkipLists, TokenGrid


def _bundle(seed=0):
    gen = torch.Generator().manual_seed(seed)
    grid = TokenGrid(frames=2, height=6, width=8)
    n = grid.video_tokens
    g = BlockGeometry(n, 16, 16)
    L, H = 3, 3
    m = torch.rand(L, H, g.nq, g.nk, generator=gen) < 0.2
    m[0] = True  # layer 0: every head dense
    m[1, 0] = True  # layer 1: head 0 dense, the others sparse
    sl = SkipLists.from_block_mask(m, g)
    sig = ModelSignature("wan21", L, H, 16, 16 * H)
    return MaskBundle.from_block_masks(sig, grid, g, [m], [1.0], [0]), grid, sl


def test_cutoff_is_the_measured_crossover():
    """DENSE_CUTOFF is the density where our kernel's time equals cuDNN dense, measured in docs/BENCHMARKS.md
    ("Dense cutoff"): the docs quote the code's value, and it lies within the crossovers measured there."""
    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md").read_text()
    section = text.split("### Dense cutoff", 1)[1].split("\n###", 1)[0]
    measurements, quote = section.split("`kernels/runner.py`", 1)
    quoted = re.search(r"DENSE_CUTOFF = ([0-9.]+)", quote)
    assert quoted and float(quoted.group(1)) == DENSE_CUTOFF, quote
    measured = [float(x) for x in re.findall(r"\b0\.\d{3}\b", measurements)]
    assert len(measured) == 6, measurements  # two resolutions x three runs
    assert min(measured) <= DENSE_CUTOFF <= max(measured), (measured, DENSE_CUTOFF)


def test_routes_follow_head_densities():
    bundle, grid, sl = _bundle()
    runner = SparseRunner(bundle)
    runner.begin_step(0.5, "cpu")
    dens = sl.head_densities()
    assert (dens[0] > DENSE_CUTOFF).all() and (dens[2] < DENSE_CUTOFF).all()
    assert [runner.route(l) for l in range(3)] == ["dense", "mixed", "sparse"]
    r1 = SparseRunner(bundle, dense_cutoff=1.0)
    r1.begin_step(0.5, "cpu")
    assert [r1.route(l) for l in range(3)] == ["sparse", "sparse", "sparse"]
    r0 = SparseRunner(bundle, dense_cutoff=0.0)  # every head is denser than 0: all dense
    r0.begin_step(0.5, "cpu")
    assert [r0.route(l) for l in range(3)] == ["dense", "dense", "dense"]
    with pytest.raises(ValueError, match="dense_cutoff"):
        SparseRunner(bundle, dense_cutoff=-0.1)


@pytest.mark.parametrize("layout", ["bhld", "bld"])
def test_outputs_per_route(layout):
    bundle, grid, sl = _bundle(1)
    runner = SparseRunner(bundle)
    gen = torch.Generator().manual_seed(2)
    B, H, N, D = 2, 3, grid.video_tokens, 16
    qh, kh, vh = (torch.randn(B, H, N, D, generator=gen) for _ in range(3))
    if layout == "bld":
        q, k, v = (t.transpose(1, 2).reshape(B, N, H * D) for t in (qh, kh, vh))
    else:
        q, k, v = qh, kh, vh
    dense = dense_attention(qh, kh, vh)
    for layer in range(3):
        call = AttentionCall(q, k, v, layout, H, layer, 0.5, grid)
        out = runner(call)
        assert out.shape == q.shape
        oh = out if layout == "bhld" else out.view(B, N, H, D).transpose(1, 2)
        sparse = sparse_attention_reference(qh, kh, vh, sl.layer(layer))
        if layer == 0:
            want = dense
        elif layer == 1:
            want = torch.cat([dense[:, :1], sparse[:, 1:]], 1)
        else:
            want = sparse
        torch.testing.assert_close(oh, want, rtol=1e-5, atol=1e-5)
    # the sparse layers really differ from dense: the routing is visible in the result
    assert not torch.allclose(sparse, dense, atol=1e-3)
    runner.end()


def test_a_kernel_failure_runs_dense_from_then_on(monkeypatch):
    """A Triton compile or launch failure (an untested GPU) costs one warning; that call and every later call of
    the shape run dense attention, as the warning says, not the kernel again and not the slower reference."""
    import warnings

    from calibatt.kernels.attention import triton_fwd

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("PTX compile failed (simulated)")

    # The CPU stands in for a GPU: the runner believes the kernel can take the call, and the kernel then fails.
    monkeypatch.setattr(SparseRunner, "_triton_ok", lambda self, q: True)
    monkeypatch.setattr(triton_fwd, "sparse_attention_triton", broken)
    bundle, grid, sl = _bundle(1)
    runner = SparseRunner(bundle)
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, grid.video_tokens, 16, generator=gen) for _ in range(3))
    call = AttentionCall(q, k, v, "bhld", 3, 2, 0.5, grid)
    dense = dense_attention(q, k, v)
    assert not torch.allclose(sparse_attention_reference(q, k, v, sl.layer(2)), dense, atol=1e-3)
    with pytest.warns(RuntimeWarning, match="failed"):
        first = runner(call)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = runner(call)
    torch.testing.assert_close(first, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, dense, rtol=1e-5, atol=1e-5)
    assert len(calls) == 1 and runner.triton_failures


def _two_bucket_bundle():
    """Two sigma buckets (sigma 1.0 -> bucket 0, 0.5 -> bucket 1) with different masks."""
    gen = torch.Generator().manual_seed(3)
    grid = TokenGrid(frames=2, height=6, width=8)
    g = BlockGeometry(grid.video_tokens, 16, 16)
    L, H = 2, 2
    masks = [torch.rand(L, H, g.nq, g.nk, generator=gen) < 0.3 for _ in range(2)]
    lists = [SkipLists.from_block_mask(m, g) for m in masks]
    sig = ModelSignature("wan21", L, H, 16, 16 * H)
    return MaskBundle.from_block_masks(sig, grid, g, masks, [1.0, 0.5], [0, 1]), grid, lists


def test_only_the_current_buckets_skip_lists_stay_resident():
    """A bucket change lets go of the previous bucket's tables, so one bucket's are held on the compute device at a
    time (the runner builds its own per-call tables from the bucket's packed masks; the bundle caches nothing for
    it); the end of sampling releases that one too."""
    bundle, grid, lists = _two_bucket_bundle()
    runner = SparseRunner(bundle, dense_cutoff=1.0)
    assert runner.begin_step(1.0, "cpu") == 0
    assert runner.held == (0, "cpu") and runner.held_bytes() > 0
    first = runner._tables
    assert runner.begin_step(0.9, "cpu") == 0 and runner._tables is first  # same bucket: nothing rebuilt
    assert runner.begin_step(0.5, "cpu") == 1
    assert runner.held == (1, "cpu") and runner._tables is not first
    assert torch.equal(runner._tables.layer(1).block_mask(), lists[1].layer(1).block_mask())
    assert bundle.resident() == []
    runner.end()
    assert runner.held is None and runner.held_bytes() == 0 and bundle.resident() == []


def test_calls_on_another_device_remake_the_skip_lists_there():
    """A model whose calls move between devices (partial loading, a model split over GPUs) gets the current bucket's
    tables rebuilt on the call's device and the old device's released; the step's dense-window decision stands.
    Two devices on a CPU-only machine: "cpu" and "meta" (shapes and dtypes only, no data), which every op here
    supports; the output on meta shows the call ran against tables on its own device."""
    bundle, grid, lists = _two_bucket_bundle()
    runner = SparseRunner(bundle, dense_cutoff=1.0)
    runner.begin_step(0.5, "cpu", step_fraction=0.5)
    B, H, N, D = 1, 2, grid.video_tokens, 16
    q = torch.randn(B, H, N, D, device="meta")
    out = runner(AttentionCall(q, q, q, "bhld", H, 1, 0.5, grid))
    assert out.device.type == "meta" and out.shape == q.shape
    assert runner.held == (1, "meta")
    assert runner._tables.layer(1).kv_indices.device.type == "meta"
    assert runner.route(1) == "sparse"
    # Back on the CPU: rebuilt there, numerically the reference for that bucket.
    gen = torch.Generator().manual_seed(4)
    qc, kc, vc = (torch.randn(B, H, N, D, generator=gen) for _ in range(3))
    out = runner(AttentionCall(qc, kc, vc, "bhld", H, 1, 0.5, grid))
    assert runner.held == (1, "cpu") and runner._tables.layer(1).kv_indices.device.type == "cpu"
    torch.testing.assert_close(out, sparse_attention_reference(qc, kc, vc, lists[1].layer(1)), rtol=1e-5, atol=1e-5)
    # A dense window set by begin_step survives the device change.
    dense_runner = SparseRunner(bundle, dense_first=1.0)
    dense_runner.begin_step(0.5, "cpu", step_fraction=0.0)
    dense_runner(AttentionCall(q, q, q, "bhld", H, 1, 0.5, grid))
    out = dense_runner(AttentionCall(qc, kc, vc, "bhld", H, 1, 0.5, grid))
    torch.testing.assert_close(out, dense_attention(qc, kc, vc), rtol=1e-5, atol=1e-5)
    runner.end()
    dense_runner.end()
