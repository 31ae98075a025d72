"""Row-subsampled block energy (CalibrationSettings.stats_row_stride): the reference, the Triton kernel under the
interpreter, the settings and the calibrator's plumbing, and planted-structure recovery at stride 4 (CPU, tiny)."""

import math
import os

import torch

if not torch.cuda.is_available():
    # Before the kernels' @triton.jit runs (it decides at decoration time). With a GPU the interpreter would also
    # catch the GPU tests of this session, so there the Triton comparison is tests/test_kernels_gpu.py's job.
    os.environ["TRITON_INTERPRET"] = "1"


import pytest  # noqa: E402

from calibatt.calibration import CalibrationSettings, Calibrator  # noqa: E402
from calibatt.calibration.selection import kept_mass, mean_block_mass, select_blocks  # noqa: E402
from calibatt.calibration.settings import STATS_ROW_STRIDE_DEFAULT  # noqa: E402
from synthetic import global_columns, planted_layer, sparse_error  # noqa: E402
from calibatt.kernels.call import AttentionCall  # noqa: E402
from calibatt.kernels.block_energy import block_energy  # noqa: E402
from calibatt.kernels.block_energy.naive import block_energy_reference, sampled_rows  # noqa: E402
from calibatt.masks import BlockGeometry, ModelSignature, TokenGrid  # noqa: E402
from calibatt.masks.packing import unpack_bits  # noqa: E402
from helpers_core import rel  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def old_block_energy(q, k, g, scale=None):
    """The block energy as it was before row subsampling existed (verbatim loop), for the bit-identity check."""
    B, H, N, D = q.shape
    Nv = g.num_tokens
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(H, g.nq, g.nk, dtype=torch.float32)
    kf = k.float()
    pad = g.nk * g.block_k - Nv
    for qb in range(g.nq):
        r0, r1 = qb * g.block_q, min((qb + 1) * g.block_q, Nv)
        s = torch.matmul(q[:, :, r0:r1].float(), kf.transpose(-1, -2)) * scale
        p = torch.exp(s - torch.logsumexp(s, dim=-1, keepdim=True))[..., :Nv]
        if pad:
            p = torch.nn.functional.pad(p, (0, pad))
        out[:, qb] += p.reshape(B, H, r1 - r0, g.nk, g.block_k).sum(dim=(0, 2, 4))
    return out


def rand_qk(B, H, N, D, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, N, D, generator=gen).to(dtype) for _ in range(2))


# ---- reference ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,block,n_text", [(150, 32, 7), (64, 16, 0), (37, 16, 3)])
def test_stride_one_is_bit_identical_to_the_old_reference(n, block, n_text):
    q, k = rand_qk(2, 2, n + n_text, 16, n)
    g = BlockGeometry(n, block, block)
    old = old_block_energy(q, k, g)
    assert torch.equal(block_energy_reference(q, k, g), old)
    assert torch.equal(block_energy_reference(q, k, g, row_stride=1, row_offset=3), old)  # offset ignored at 1
    assert torch.equal(block_energy(q, k, g, row_stride=1), old)  # CPU dispatch


def test_sampled_rows_cover_partial_blocks_with_at_least_one_row():
    assert sampled_rows(32, 4, 1) == (1, 8)
    assert sampled_rows(22, 4, 3) == (3, 5)  # rows 3, 7, 11, 15, 19
    assert sampled_rows(3, 8, 5) == (2, 1)  # a 3-row tail with offset 5: row 5 mod 3 = 2, one row
    assert sampled_rows(5, 4, 9) == (1, 1)  # offsets are taken mod the stride first: row 1 (5 is past)
    assert sampled_rows(6, 4, 9) == (1, 2)  # rows 1 and 5


@pytest.mark.parametrize("stride,offset", [(2, 0), (3, 2), (4, 1), (8, 5)])
def test_exact_when_the_rows_of_a_block_are_identical(stride, offset):
    """Every row of a query block has the same query, so any sample of it, rescaled, is the whole block (the
    partial last block of 3 rows with offsets past its length included)."""
    n, block, n_text, H, D = 35, 16, 5, 2, 16
    g = BlockGeometry(n, block, block)
    gen = torch.Generator().manual_seed(stride * 10 + offset)
    per_block = torch.randn(1, H, g.nq, D, generator=gen)
    q = torch.randn(1, H, n + n_text, D, generator=gen)
    q[:, :, :n] = per_block.repeat_interleave(block, dim=2)[:, :, :n]
    k = torch.randn(1, H, n + n_text, D, generator=gen)
    full = block_energy_reference(q, k, g)
    est = block_energy_reference(q, k, g, row_stride=stride, row_offset=offset)
    assert torch.allclose(est, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stride", [2, 4])
def test_mean_over_all_offsets_is_the_full_sum(stride):
    """Every row is sampled by exactly one offset: averaging the estimates over the offsets gives the exact sum on
    blocks whose row count the stride divides (unbiased under the rotation the calibrator applies)."""
    n, block = 64, 16  # 4 full blocks, no text: every row's mass over the video blocks is 1
    q, k = rand_qk(2, 2, n, 16, stride)
    g = BlockGeometry(n, block, block)
    full = block_energy_reference(q, k, g)
    mean = sum(block_energy_reference(q, k, g, row_stride=stride, row_offset=o) for o in range(stride)) / stride
    assert torch.allclose(mean, full, rtol=1e-5, atol=1e-6)
    single = block_energy_reference(q, k, g, row_stride=stride, row_offset=1)
    assert not torch.allclose(single, full, rtol=1e-3)  # random rows: one sample alone is not the sum
    assert torch.allclose(single.sum(-1), full.sum(-1), rtol=1e-5)  # yet each block still holds B x n rows


def test_close_to_full_on_planted_attention_at_moderate_noise():
    grid = TokenGrid(4, 8, 8)
    g = BlockGeometry(grid.video_tokens, 32, 32)
    q, k, _ = planted_layer(grid, ["local", "stripes", "repeat", "global"], 16, prompt=3, layer=0, sigma=1.0,
                            noise=0.35, beta=0.2)
    full = mean_block_mass(block_energy_reference(q, k, g, scale=1.0), g, 1)
    for stride in (2, 4):
        est = mean_block_mass(block_energy_reference(q, k, g, scale=1.0, row_stride=stride, row_offset=1), g, 1)
        assert rel(est, full) < 0.05 * stride, stride
        assert float((est - full).abs().max()) < 0.1


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "4"])
def test_bad_row_stride_is_a_clear_error(bad):
    q, k = rand_qk(1, 1, 32, 16, 0)
    g = BlockGeometry(32, 16, 16)
    with pytest.raises((ValueError, TypeError), match="row_stride"):
        block_energy(q, k, g, row_stride=bad)
    with pytest.raises(ValueError, match="row_offset"):
        block_energy_reference(q, k, g, row_stride=2, row_offset=-1)


# ---- settings -----------------------------------------------------------------------------------------------------
def test_settings_field_validated_and_round_trips():
    s = CalibrationSettings()
    assert s.stats_row_stride == STATS_ROW_STRIDE_DEFAULT >= 1
    s4 = CalibrationSettings(stats_row_stride=4)
    assert CalibrationSettings.from_dict(s4.to_dict()) == s4
    assert s4.to_dict()["stats_row_stride"] == 4
    old = s4.to_dict()
    del old["stats_row_stride"]  # settings written before the field existed load with the default
    assert CalibrationSettings.from_dict(old).stats_row_stride == STATS_ROW_STRIDE_DEFAULT
    for bad in (0, -1, 2.0, True, 65):
        with pytest.raises(ValueError, match="stats_row_stride"):
            CalibrationSettings(stats_row_stride=bad)


# ---- calibrator ---------------------------------------------------------------------------------------------------
GRID = TokenGrid(4, 8, 8)
KINDS = [["local", "stripes", "repeat", "global"], ["global", "repeat", "local", "stripes"]]
SIG = ModelSignature("generic", 2, 4, 16, 64)
SIGMAS = [10.0, 3.0, 1.0, 0.3, 0.1]
REPEAT = {(0, 2), (1, 1)}


def layer_qkv(prompt, layer, sigma, **kw):
    return planted_layer(GRID, KINDS[layer], 16, prompt=prompt, layer=layer, sigma=sigma, **kw)


def calibrate(prompts, **kw):
    base = dict(block_q=16, block_k=16, A=0.85, C=0.97, k=4.0)
    base.update(kw)
    cal = Calibrator(SIG, GRID, CalibrationSettings(**base), background=False)
    for p in prompts:
        cal.begin_prompt(sample_sigmas=SIGMAS, key=f"p{p}")
        for s in SIGMAS:
            for layer in range(2):
                q, k, v = layer_qkv(p, layer, s)
                cal.observe(AttentionCall(q, k, v, "bhld", 4, layer, s, GRID, scale=1.0))
        cal.end_prompt()
    return cal


def test_observe_uses_the_stride_with_an_offset_rotating_per_step_and_layer():
    """One prompt, rho = 1: the vote is that prompt's own selection, which must be the selection on the strided
    estimate with offset (step index + layer) mod stride; and judged by the full-row mass it stays close to eps."""
    stride = 4
    cal = calibrate([5], rho=1.0, stats_row_stride=stride)
    g = cal.geometry
    worst = 0.0
    for t, (sigma, packed, _, rec) in enumerate(cal.step_masks()):
        voted = unpack_bits(packed, g.nk)
        for layer in range(2):
            q, k, _ = layer_qkv(5, layer, sigma)
            est = mean_block_mass(block_energy(q, k, g, scale=1.0, row_stride=stride,
                                               row_offset=(t + layer) % stride), g, 1)
            assert torch.equal(voted[layer], select_blocks(est, rec.eps) | g.diagonal()), (t, layer)
            full = mean_block_mass(block_energy(q, k, g, scale=1.0), g, 1)
            worst = max(worst, float((rec.eps - kept_mass(full, voted[layer])).max()))
    assert worst < 0.06  # measured 0.04 here (16-row blocks, 4 rows sampled); 0 would need every row


def test_stride4_recovers_planted_structure_and_holds_out_like_stride1():
    cals = {s: calibrate(range(4), stats_row_stride=s) for s in (1, 4)}
    bundles = {s: c.finish() for s, c in cals.items()}
    g = cals[4].geometry
    b4 = bundles[4]
    eps_min = min(b4.settings["eps_per_step"])
    col_blocks = sorted(set((global_columns(GRID) // g.block_k).tolist()))
    for sigma in SIGMAS:
        masks = b4.skip_lists(b4.bucket_for_sigma(sigma)).block_mask()
        for layer in range(2):
            q, k, _ = layer_qkv(0, layer, sigma, noise=0.0)
            must = mean_block_mass(block_energy(q, k, g, scale=1.0), g, 1) > (1.0 - eps_min) + 0.05
            assert int(must.sum()) > 3 * g.nq
            assert bool((masks[layer] | ~must).all()), f"planted block dropped at sigma {sigma}, layer {layer}"
            gh = KINDS[layer].index("global")
            assert bool(masks[layer, gh][:, col_blocks].all())
    for b in range(b4.num_buckets):
        assert {tuple(x) for x in (b4.entry_rep[b] >= 0).nonzero().tolist()} == REPEAT

    def held_out_error(bundle, prompt=17):
        return sparse_error(bundle, layer_qkv, prompt, SIGMAS, 2)

    e1, e4 = held_out_error(bundles[1]), held_out_error(bundles[4])
    assert 0.0 < e4 <= 1.1 * e1, (e4, e1)
    assert abs(b4.density - bundles[1].density) < 0.05


# ---- Triton kernel under the interpreter --------------------------------------------------------------------------
def _interpreted_kernels():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the Triton strided statistics are compared on it by tests/test_kernels_gpu.py")
    pytest.importorskip("triton")
    from triton_interp import interpreted_kernels
    return interpreted_kernels()


# (n, n_text, block_q, block_k, stride, offset, tile override, group): the default interpreter tile is 32 rows on
# 32-row blocks, so stride 2 puts 2 blocks in one tile (SEG 2), stride 4 four; 16x16 tiles on 64-row blocks at stride 2
# give 2 programs per block (SUBQ 2); tma 2 runs the host-descriptor loads; 35 tokens leave a 3-row tail that the
# offset 5 overshoots (as does 5 on the 4-row tail of 100 tokens in 32-row blocks).
STRIDE_CASES = [
    (100, 5, 32, 16, 2, 1, None, 16),
    (100, 5, 32, 16, 4, 3, None, 4),
    (100, 0, 32, 32, 8, 5, (16, 16, 0), 4),
    (90, 4, 64, 32, 2, 0, (16, 16, 0), 1),
    (90, 4, 64, 32, 4, 1, (16, 16, 2), 4),
    (35, 3, 16, 16, 8, 5, None, 16),
    (37, 0, 16, 16, 3, 2, None, 1),
]


@pytest.mark.parametrize("n,n_text,bq,bk,stride,offset,tile,group", STRIDE_CASES)
def test_triton_strided_matches_reference(n, n_text, bq, bk, stride, offset, tile, group):
    TA, TS = _interpreted_kernels()
    H, D = 2, 16
    q, k = rand_qk(2, H, n + n_text, D, n + stride + offset, torch.float16)
    if tile is not None and tile[2] == 2:
        q, k = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k))  # (B, L, H, D) storage, as Wan's
    g = BlockGeometry(n, bq, bk)
    init = torch.rand(H, g.nq, g.nk, generator=torch.Generator().manual_seed(1))  # accumulated into
    tiles = None if tile is None else TA.TileConfig(tile[0], tile[1], 4, 2, tile[2])
    out = TS.block_energy_triton(q, k, g, out=init.clone(), row_stride=stride, row_offset=offset, tiles=tiles,
                                 group=group)
    ref = block_energy_reference(q.float(), k.float(), g, out=init.clone(), row_stride=stride, row_offset=offset)
    assert rel(out - init, ref - init) < 1e-4
    full = block_energy_reference(q.float(), k.float(), g)
    assert rel(out - init, full) > 1e-3  # it really sampled (random rows differ)


# ---- Triton kernel on a GPU -------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the Triton kernel runs there)")
@pytest.mark.parametrize("stride,offset,dtype", [(2, 1, torch.bfloat16), (4, 3, torch.bfloat16), (8, 5, torch.float16),
                                                 (3, 2, torch.bfloat16)])
def test_triton_strided_matches_reference_on_gpu(stride, offset, dtype):
    """Wan 480p shape per head (32,760 video tokens: a partial last 128-block, 118 text tokens), D = 128."""
    H, D, n, n_text = 4, 128, 32760, 118
    g = BlockGeometry(n, 128, 128)
    gen = torch.Generator(device="cuda").manual_seed(stride)
    q, k = (torch.randn(2, H, n + n_text, D, device="cuda", dtype=dtype, generator=gen) for _ in range(2))
    init = torch.rand(H, g.nq, g.nk, device="cuda", generator=gen)
    out = block_energy(q, k, g, out=init.clone(), row_stride=stride, row_offset=offset)  # CUDA bf16 -> Triton
    ref = block_energy_reference(q, k, g, out=init.clone(), row_stride=stride, row_offset=offset)
    assert rel(out - init, ref - init) < 1e-2
    full = block_energy_reference(q, k, g)
    # Each sampled row's video mass is at most 1, rescaled to the block's row count.
    rows = torch.clamp(torch.arange(g.nq, device="cuda") * 128 + 128, max=n) - torch.arange(g.nq, device="cuda") * 128
    per_row = (out - init).sum(-1) / (2 * rows)
    assert float(per_row.max()) <= 1.0 + 1e-3 and math.isfinite(float(per_row.min()))
    assert rel(out - init, full) < 0.5  # an estimate of the same sums, not something else
