"""FP8 computed blocks (kernels/attention/triton_fp8.py) run by Triton's interpreter on the CPU, against the plain-
PyTorch reference: every output row written, text first and last with a padding bias, a repetitive head, a partial
last block, mask blocks wider than the tile; and the runner's precision option (the per-layer check against bf16,
the fallback over the bound). The interpreter's own e4m3 rounding is replaced by torch's (tests/triton_interp.py).
Accuracy at real shapes and the speed are measured on the GPU (test_kernels_gpu.py, bench/precision_kernels.py)."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels' @triton.jit runs (it decides at decoration time)

import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
from triton_interp import interpreted_kernels  # noqa: E402

TA, TS = interpreted_kernels()

from calibatt.kernels import runner as runner_module  # noqa: E402
from calibatt.kernels.attention.naive import sparse_attention_reference  # noqa: E402
from calibatt.kernels.call import AttentionCall  # noqa: E402
from calibatt.kernels.runner import SparseRunner  # noqa: E402
from calibatt.kernels.support import FP8_ERROR_BOUND  # noqa: E402
from helpers_core import make_bundle, padded_bias, rel, sparse_rep_layer, text_to_back, text_to_front  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.usefixtures("one_thread")]


@pytest.mark.parametrize("precision", ["fp8", "fp8-qk", "int8", "int8-qk"])
@pytest.mark.parametrize("text_first,bias,block,tma", [
    (False, False, (32, 32), 0),
    (False, True, (32, 64), 2),  # host TMA descriptors; a mask block of two tiles
    (True, True, (64, 32), 0),  # text first: video and text chunks start off any tile boundary
])
def test_fp8_matches_reference_within_e4m3_rounding(precision, text_first, bias, block, tma):
    gen = torch.Generator().manual_seed(sum(block) + tma + text_first)
    B, H, frames, Tf, D, T = 2, 3, 3, 37, 32, 19
    n = frames * Tf  # 111 tokens: the last mask block is partial
    layer = sparse_rep_layer(gen, H, frames, Tf, block)  # the last head repeats its anchor rows
    q, k, v = (torch.randn(B, H, n + T, D, generator=gen).half() for _ in range(3))
    k = k + 2.0 * torch.randn(1, H, 1, D, generator=gen).half()  # a shared key offset: the smoothing removes it
    tb = padded_bias(B, T, gen, shared=False, step=3) if bias else None
    kw = dict(text_bias=tb)
    qq, kk, vv = q, k, v
    if text_first:
        qq, kk, vv = (text_to_front(t, n, 2) for t in (q, k, v))
        kw["video_start"] = T
    tiles = TA.TileConfig(32, 32, 4, 2, tma)
    out = torch.full_like(qq, float("nan"))
    TA.sparse_attention_triton(qq, kk, vv, layer, out=out, tiles=tiles, precision=precision, **kw)
    assert not torch.isnan(out).any(), "some output element was never written"
    exact = TA.sparse_attention_triton(qq, kk, vv, layer, tiles=tiles, **kw)
    ref = sparse_attention_reference(qq.float(), kk.float(), vv.float(), layer, **kw)
    err = rel(out, ref)
    # e4m3 keeps 3 mantissa bits: a few % at head_dim 32 on random inputs (the GPU test bounds head_dim 128);
    # Q·K alone in e4m3 is more exact than with P·V too.
    assert err < {"fp8": 0.06, "fp8-qk": 0.045, "int8": 0.045, "int8-qk": 0.01}[precision], err
    assert rel(exact, ref) < 3e-3 and err > 10 * rel(exact, ref)  # it really ran in e4m3
    if text_first:  # the same answer as text last, up to the e4m3 rounding of a different chunking
        last = TA.sparse_attention_triton(q, k, v, layer, tiles=tiles, precision=precision, text_bias=tb)
        assert rel(text_to_back(out, n, 2), last) < 0.06


def test_fp8_rejects_what_it_cannot_run():
    gen = torch.Generator().manual_seed(1)
    layer = sparse_rep_layer(gen, 2, 2, 20, (16, 16))
    q = torch.randn(1, 2, 40, 16, generator=gen).half()
    with pytest.raises(TA.KernelUnsupported, match="head_dim >= 32"):
        TA.sparse_attention_triton(q, q, q, layer, precision="fp8")
    with pytest.raises(ValueError, match="precision must be one of"):
        TA.sparse_attention_triton(q, q, q, layer, precision="int4")
    with pytest.raises(ValueError, match="precision must be one of"):
        SparseRunner(make_bundle(L=1, H=2, block=16), precision="fp16")


def _runner_case(monkeypatch, precision):
    """A runner whose Triton path runs on the CPU (the interpreter stands in for the GPU), and one call per layer."""
    monkeypatch.setattr(SparseRunner, "_triton_ok", staticmethod(lambda q: q.dtype == torch.float16))
    monkeypatch.setattr(TA, "precision_unsupported", lambda precision, device, head_dim: None)
    bundle = make_bundle(L=2, H=3, block=16, repetition=True, seed=3, head_dim=32)
    grid = bundle.grid
    gen = torch.Generator().manual_seed(5)
    runner = SparseRunner(bundle, dense_cutoff=1.0, precision=precision)
    q, k, v = (torch.randn(2, 3, grid.video_tokens, 32, generator=gen).half() for _ in range(3))
    return runner, grid, q, k, v


def test_runner_checks_each_fp8_layer_once_against_bf16(monkeypatch):
    runner, grid, q, k, v = _runner_case(monkeypatch, "fp8")
    bf16, _, _, _, _ = _runner_case(monkeypatch, "bf16")
    sigma = 1.0
    for layer in (0, 1, 0):
        call = AttentionCall(q, k, v, "bhld", 3, layer, sigma, grid, scale=32 ** -0.5)
        out = runner(call)
        exact = bf16(AttentionCall(q, k, v, "bhld", 3, layer, sigma, grid, scale=32 ** -0.5))
        err = rel(out, exact)
        assert 1e-3 < err <= FP8_ERROR_BOUND, err  # e4m3, within the bound
    assert sorted(runner.fp8_errors) == [0, 1]
    assert all(0 < e <= FP8_ERROR_BOUND for e in runner.fp8_errors.values())
    runner.end()
    assert runner.fp8_errors == {}  # a new run checks again


def test_runner_checks_fp8_a_few_heads_at_a_time(monkeypatch):
    """The check against bf16 never computes a second whole-layer output (at Wan 14B 720p that and float copies
    were 8.7 GB): with a chunk of one head's bytes every bf16 call of the check covers one head, the repetitive head
    included, and the error is the whole layer's all the same."""
    from calibatt.kernels.attention import triton_fwd
    real = triton_fwd.sparse_attention_triton
    heads_seen = []

    def recording(q, k, v, layer, precision="bf16", **kw):
        if precision == "bf16":
            heads_seen.append(q.shape[1])
        return real(q, k, v, layer, precision=precision, **kw)
    monkeypatch.setattr(triton_fwd, "sparse_attention_triton", recording)
    runner, grid, q, k, v = _runner_case(monkeypatch, "fp8")
    whole, _, _, _, _ = _runner_case(monkeypatch, "fp8")
    bf16, _, _, _, _ = _runner_case(monkeypatch, "bf16")
    assert bool((runner.bundle.entry_rep[:, 0] >= 0).any())  # layer 0 has a repetitive head: the chunks split its plan
    runner.check_bytes = 1  # one head per chunk
    whole.check_bytes = 1 << 40  # every head at once
    call = AttentionCall(q, k, v, "bhld", 3, 0, 1.0, grid, scale=32 ** -0.5)
    out = runner(call)
    assert heads_seen == [1, 1, 1]
    heads_seen.clear()
    whole(call)
    assert heads_seen == [3]
    exact = bf16(call)
    assert runner.layer_precisions == {0: "fp8"}
    assert runner.fp8_errors[0] == pytest.approx(rel(out, exact), rel=1e-4)
    assert runner.fp8_errors[0] == pytest.approx(whole.fp8_errors[0], rel=1e-4)


def test_runner_runs_a_layer_over_the_bound_in_bf16(monkeypatch):
    runner, grid, q, k, v = _runner_case(monkeypatch, "fp8")
    bf16, _, _, _, _ = _runner_case(monkeypatch, "bf16")
    monkeypatch.setattr(runner_module, "FP8_ERROR_BOUND", 1e-6)  # every layer fails it
    call = AttentionCall(q, k, v, "bhld", 3, 1, 1.0, grid, scale=32 ** -0.5)
    want = bf16(call)
    with pytest.warns(RuntimeWarning, match=r"fp8 .*, fp8-qk .* runs bf16 from now on"):
        first = runner(call)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per layer and run, not per call
        second = runner(call)
    torch.testing.assert_close(first, want, rtol=0, atol=0)
    torch.testing.assert_close(second, want, rtol=0, atol=0)
    assert runner.layer_precisions == {1: "bf16"}


def test_runner_tries_qk_only_before_bf16(monkeypatch):
    """A layer whose 8-bit P·V is over the bound (made so here: the fp8 path's output is perturbed by 10%) but whose
    Q·K-only variant is within it runs fp8-qk: the speed of 8-bit Q·K is kept, not thrown away for bf16."""
    from calibatt.kernels.attention import triton_fwd
    real = triton_fwd.sparse_attention_triton

    def worse_pv(q, k, v, layer, precision="bf16", **kw):
        out = real(q, k, v, layer, precision=precision, **kw)
        if precision == "fp8":
            out = out + 0.1 * out.float().norm() / out.numel() ** 0.5 * torch.randn_like(out)
        return out
    monkeypatch.setattr(triton_fwd, "sparse_attention_triton", worse_pv)
    runner, grid, q, k, v = _runner_case(monkeypatch, "fp8")
    qk_only, _, _, _, _ = _runner_case(monkeypatch, "fp8-qk")
    bf16, _, _, _, _ = _runner_case(monkeypatch, "bf16")
    call = AttentionCall(q, k, v, "bhld", 3, 0, 1.0, grid, scale=32 ** -0.5)
    with pytest.warns(RuntimeWarning, match=r"layer 0 is fp8 0\.\d+, fp8-qk 0\.\d+ .* runs fp8-qk from now on"):
        first = runner(call)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = runner(call)
    want = qk_only(call)
    torch.testing.assert_close(first, want, rtol=0, atol=0)
    torch.testing.assert_close(second, want, rtol=0, atol=0)
    assert runner.layer_precisions == {0: "fp8-qk"}
    assert 0 < runner.fp8_errors[0] <= FP8_ERROR_BOUND
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same fallback on another layer: not reported again this run
        runner(AttentionCall(q, k, v, "bhld", 3, 1, 1.0, grid, scale=32 ** -0.5))
    assert runner.layer_precisions == {0: "fp8-qk", 1: "fp8-qk"}
    assert rel(first, bf16(call)) > 1e-4  # really the 8-bit path, not bf16
    runner.end()
    assert runner.layer_precisions == {}
    with pytest.warns(RuntimeWarning, match="runs fp8-qk from now on"):  # a new run reports its first fallback
        runner(AttentionCall(q, k, v, "bhld", 3, 1, 1.0, grid, scale=32 ** -0.5))


def test_runner_without_fp8_hardware_runs_bf16_with_one_warning(monkeypatch):
    runner, grid, q, k, v = _runner_case(monkeypatch, "fp8")
    bf16, _, _, _, _ = _runner_case(monkeypatch, "bf16")
    monkeypatch.setattr(TA, "precision_unsupported",
                        lambda precision, device, head_dim: "no 8-bit tensor cores (this test says so)")
    call = AttentionCall(q, k, v, "bhld", 3, 0, 1.0, grid, scale=32 ** -0.5)
    with pytest.warns(RuntimeWarning, match="not available"):
        out = runner(call)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = runner(call)
    want = bf16(call)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(again, want, rtol=0, atol=0)
    assert runner.triton_failures  # recorded on the runner
