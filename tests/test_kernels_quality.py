"""Patch Model Attention's quality setting: a monotone trade from the calibrated bundle to fully dense."""

import pytest
import torch

from calibatt.kernels.call import AttentionCall
from calibatt.kernels.dense import dense_attention
from calibatt.kernels.runner import DENSE_CUTOFF, SparseRunner, quality_cutoff
from helpers_core import make_bundle


def test_cutoff_mapping():
    assert quality_cutoff(0.0) == DENSE_CUTOFF
    assert quality_cutoff(0.5) == 0.5
    assert quality_cutoff(1.0) == 0.0
    with pytest.raises(ValueError, match="quality must be in"):
        quality_cutoff(1.5)


def _run(bundle, quality, q, k, v):
    runner = SparseRunner(bundle, dense_cutoff=quality_cutoff(quality))
    sigma = bundle.calibrated_sigmas[1]
    runner.begin_step(sigma, "cpu")
    call = AttentionCall(q, k, v, "bhld", q.shape[1], 0, sigma, bundle.grid)
    routes = [runner.route(l) for l in range(bundle.num_layers)]
    return runner(call), routes


def test_quality_one_is_dense_and_quality_moves_heads_to_dense():
    torch.manual_seed(0)
    b = make_bundle(L=2, H=3, density=0.4, repetition=False)
    N = b.grid.video_tokens
    q, k, v = (torch.randn(1, 3, N, 16) for _ in range(3))
    dense = dense_attention(q, k, v)
    out0, routes0 = _run(b, 0.0, q, k, v)
    out1, routes1 = _run(b, 1.0, q, k, v)
    assert routes1 == ["dense", "dense"]
    assert torch.equal(out1, dense)
    assert "dense" not in routes0
    assert (out0 - dense).norm() / dense.norm() > 1e-3  # the calibrated masks do drop blocks
    # A middle setting sends some heads (the densest) to dense: error between the two extremes.
    dens = b.entry_densities()[b.bucket_for_sigma(b.calibrated_sigmas[1])]
    mid = 1.0 - float(dens[0].median())
    out_mid, routes_mid = _run(b, mid, q, k, v)
    e0, emid = ((o - dense).norm() for o in (out0, out_mid))
    assert routes_mid[0] in ("mixed", "dense")
    assert emid < e0
