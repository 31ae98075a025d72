"""The calibrator on CUDA: same statistics as on the CPU (float32: the reference path; bf16: the Triton block-energy
kernel), no host sync per call."""

import numpy as np
import pytest
import torch

from calibatt.calibration import CalibrationSettings, Calibrator
from calibatt.calibration.selection import kept_mass, mean_block_mass
from synthetic import planted_layer
from calibatt.kernels.call import AttentionCall
from calibatt.kernels.block_energy.naive import block_energy_reference
from calibatt.masks import BlockGeometry, ModelSignature, TokenGrid
from calibatt.masks.packing import unpack_bits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GRID = TokenGrid(4, 16, 16)  # 1024 tokens: 8 blocks of 128
SIG = ModelSignature("generic", 2, 4, 64, 256)
KINDS = ["local", "stripes", "repeat", "global"]
SIGMAS = [5.0, 1.0, 0.2]


def qkv(prompt, layer, sigma, dtype, device):
    q, k, v = planted_layer(GRID, KINDS, 64, prompt=prompt, layer=layer, sigma=sigma, beta=0.05)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def run(device, dtype, prompts=(0, 1, 2)):
    cal = Calibrator(SIG, GRID, CalibrationSettings(block_q=128, block_k=128, A=0.85, C=0.97, k=4.0),
                     background=False)
    for p in prompts:
        cal.begin_prompt(sample_sigmas=SIGMAS)
        for s in SIGMAS:
            for layer in range(2):
                q, k, v = qkv(p, layer, s, dtype, device)
                out = cal.observe(AttentionCall(q, k, v, "bhld", 4, layer, s, GRID, scale=1.0))
                assert out.device.type == device and out.dtype == dtype
        cal.end_prompt()
    return cal


def test_cuda_float32_matches_cpu():
    a, b = run("cuda", torch.float32).state(), run("cpu", torch.float32).state()
    agree = total = 0
    for key in b.counts:
        x, y = a.get_counts(*key), b.get_counts(*key)
        agree += int((x == y).sum())
        total += x.size
    assert agree / total > 0.995  # float32 sums in another order may flip a block at an exact tie
    for name in ("rep_err", "rep_frac", "drop"):
        for x, y in zip(getattr(a, name), getattr(b, name)):
            assert torch.allclose(x, y, rtol=1e-3, atol=1e-3), name


def test_cuda_bf16_triton_statistics_keep_the_eps_guarantee():
    cal = run("cuda", torch.bfloat16, prompts=(0,))
    g = BlockGeometry(GRID.video_tokens, 128, 128)
    for sigma, packed, _, rec in cal.step_masks():
        mask = unpack_bits(packed, g.nk)
        for layer in range(2):
            q, k, _ = qkv(0, layer, sigma, torch.bfloat16, "cpu")
            mass = mean_block_mass(block_energy_reference(q.double(), k.double(), g, scale=1.0).float(), g, 1)
            assert bool((kept_mass(mass, mask[layer]) >= rec.eps - 0.01).all())
    # Late step (eps 0.85): the planted repetitive head (2) wins on error; no other head repeats.
    rep = np.array(cal.step_masks()[-1][2].tolist(), dtype=bool)
    assert rep[:, 2].all() and not rep[:, [0, 1, 3]].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_observe_makes_no_host_sync_within_a_step(dtype):
    cal = Calibrator(SIG, GRID, CalibrationSettings(block_q=128, block_k=128, steps=2), background=False)
    cal.begin_prompt()
    calls = [AttentionCall(*qkv(0, layer, 1.0, dtype, "cuda"), "bhld", 4, layer, 1.0, GRID, scale=1.0)
             for layer in range(2)]
    cal.observe(calls[0])  # the first call of a step may drain the previous step (one sync per step)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cal.observe(calls[1])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cal.end_prompt()
    assert cal.state().num_prompts == 1
