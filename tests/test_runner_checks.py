"""SparseRunner refuses every call its bundle does not fit, with a message naming the mismatch (library users call
it directly; the ComfyUI and diffusers hosts build correct calls, but nothing silently runs masks on the wrong
blocks if one does not)."""

import pytest
import torch

from calibatt.kernels.call import AttentionCall
from calibatt.kernels.runner import SparseRunner
from calibatt.masks import BundleError, TokenGrid
from helpers_core import make_bundle

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = TokenGrid(3, 6, 8)  # make_bundle's grid: 144 video tokens, 9 x 9 blocks of 16


def _call(grid=GRID, N=None, H=3, D=16, layer=0, layout="bhld", seed=0):
    gen = torch.Generator().manual_seed(seed)
    N = grid.total_tokens if N is None else N
    q, k, v = (torch.randn(1, H, N, D, generator=gen) for _ in range(3))
    if layout == "bld":
        q, k, v = (t.transpose(1, 2).reshape(1, N, H * D) for t in (q, k, v))
    return AttentionCall(q, k, v, layout, H, layer, 0.5, grid)


@pytest.fixture(scope="module")
def runner():
    return SparseRunner(make_bundle(L=2, H=3, grid=GRID), dense_cutoff=1.0)


def test_a_fitting_call_runs(runner):
    for layout in ("bhld", "bld"):
        for layer in (0, 1):
            assert torch.isfinite(runner(_call(layer=layer, layout=layout))).all()


@pytest.mark.parametrize("layer", [2, 40, -1, True, 1.0])
def test_layer_outside_the_bundle(runner, layer):
    # past the end was a bare IndexError; -1 silently used the last layer
    with pytest.raises(BundleError, match=r"layer .* but the bundle covers layers 0-1") as e:
        runner(_call(layer=layer))
    assert e.value.field == "layer"


def test_heads_and_head_dim(runner):
    with pytest.raises(BundleError, match="the call has 4 heads; the bundle was made for 3"):
        runner(_call(H=4))
    with pytest.raises(BundleError, match="head_dim 32; the bundle was made for 16"):
        runner(_call(D=32))


def test_grid_reshaped_or_larger(runner):
    # same 144 tokens, another frame shape: the masks' blocks would cover other tokens
    with pytest.raises(BundleError, match="6x8-token frame; this video has 8x6"):
        runner(_call(grid=TokenGrid(3, 8, 6)))
    with pytest.raises(BundleError, match="3 latent frames; this video has 4"):
        runner(_call(grid=TokenGrid(4, 6, 8)))
    with pytest.raises(BundleError, match=r"patch size \(1, 2, 2\); this model uses \(1, 1, 1\)"):
        runner(_call(grid=TokenGrid(3, 6, 8, patch=(1, 1, 1))))


def test_more_tokens_than_the_grid_says(runner):
    # A larger video passed with the bundle's grid: the extra video tokens used to run as if they were text.
    with pytest.raises(ValueError, match="has 192 tokens but its grid describes 144"):
        runner(_call(N=192))
    text = TokenGrid(3, 6, 8, text_tokens=5, text_position="end")
    with pytest.raises(ValueError, match="has 150 tokens but its grid describes 149"):
        runner(_call(grid=text, N=150))


def test_text_after_or_before_the_video_and_any_text_length(runner):
    # Masks cover the video tokens only: text of any length, on either side, fits.
    for grid in (TokenGrid(3, 6, 8, text_tokens=5, text_position="end"),
                 TokenGrid(3, 6, 8, text_tokens=9, text_position="start")):
        assert torch.isfinite(runner(_call(grid=grid))).all()


def test_mismatched_q_k_v(runner):
    call = _call()
    call.k = call.k[:, :, :-1]
    with pytest.raises(ValueError, match="q, k and v of one shape"):
        runner(call)


def test_precision_unsupported_is_the_one_8bit_check(monkeypatch):
    from calibatt.kernels import triton_common
    from calibatt.kernels.support import precision_unsupported
    cpu = torch.device("cpu")
    assert precision_unsupported("bf16", cpu, 16) is None
    assert "head_dim >= 32" in precision_unsupported("fp8", cpu, 16)
    monkeypatch.setattr(triton_common, "interpreting", lambda: True)  # the interpreter emulates every format
    assert precision_unsupported("fp8", cpu, 128) is None
    monkeypatch.setattr(triton_common, "interpreting", lambda: False)
    why = precision_unsupported("int8-qk", cpu, 128)
    assert "8-bit tensor cores" in why and "8.0" in why and "cpu" in why
    assert "8.9" in precision_unsupported("fp8-qk", cpu, 128)
