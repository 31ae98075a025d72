"""Calibration under Ulysses sequence parallelism (parallel/calibration.py) through the real yunchang over gloo:
each rank calibrates the heads it holds (dense outputs returned through yunchang's all-to-all), the statistics are
merged once, and the merged statistics and the bundle made from them equal those of one process observing every
head. 5 heads on 2 ranks (3 + 2, one padding slot), text tokens after the video, two prompts, CFG-style positive
rows."""

import dist_harness  # noqa: F401  (first: makes `calibatt` importable in the spawned ranks)

import numpy as np
import pytest
import torch

pytest.importorskip("yunchang", reason="yunchang (xDiT's USP engine) is not installed: make setup installs it")

from calibatt.calibration import CalibrationSettings, Calibrator, calibrate  # noqa: E402
from synthetic import planted_layer  # noqa: E402
from calibatt.kernels.call import AttentionCall  # noqa: E402
from calibatt.masks import ModelSignature, TokenGrid  # noqa: E402
from calibatt.parallel import SequenceParallelCalibration  # noqa: E402

GRID = TokenGrid(2, 8, 8, text_tokens=8, text_position="end")  # 128 video + 8 text tokens
KINDS = [["local", "stripes", "repeat", "global", "local"], ["repeat", "global", "local", "stripes", "local"]]
SIG = ModelSignature("generic", 2, 5, 16, 80)
SIGMAS = [10.0, 1.0, 0.1]
PROMPTS = 2


def settings():
    return CalibrationSettings(block_q=16, block_k=16, A=0.85, C=0.97, k=4.0, stats_row_stride=1)


def calls(prompt):
    """Per step and layer: (sigma, layer, q, k, v) as (B=2, N, H, D), batch row 1 the positive prompt."""
    for s in SIGMAS:
        for layer in range(2):
            pos = planted_layer(GRID, KINDS[layer], 16, prompt=prompt, layer=layer, sigma=s)
            neg = planted_layer(GRID, KINDS[layer], 16, prompt=prompt + 100, layer=layer, sigma=s)
            yield s, layer, *(torch.cat([n, p]).transpose(1, 2).contiguous() for n, p in zip(neg, pos))


def one_process():
    cal = Calibrator(SIG, GRID, settings(), background=False)
    for p in range(PROMPTS):
        cal.begin_prompt(sample_sigmas=SIGMAS, key=f"p{p}")
        for s, layer, q, k, v in calls(p):
            cal.observe(AttentionCall(*(t.transpose(1, 2) for t in (q, k, v)), "bhld", 5, layer, s, GRID,
                                      positive_rows=[1], scale=0.25))
        cal.end_prompt()
    return cal


def _worker(rank, world):
    from yunchang import LongContextAttention, set_seq_parallel_pg
    from yunchang.globals import PROCESS_GROUP
    from yunchang.kernels import AttnType

    set_seq_parallel_pg(world, 1, rank, world)
    module = LongContextAttention(ring_impl_type="basic_pytorch", attn_type=AttnType.TORCH_MATH)
    sp = SequenceParallelCalibration(SIG, GRID, settings(), ulysses_group=PROCESS_GROUP.ULYSSES_PG)
    sp.install(module)
    assert sp.local_signature.num_heads == (3 if rank == 0 else 2)
    N = GRID.total_tokens
    S = N // world
    sl = slice(rank * S, (rank + 1) * S)
    def run_prompt(p, cal):  # what a host does for one prompt: one denoising, every call through the calibrator
        assert cal is sp
        sp.set_schedule(SIGMAS)
        for s, layer, q, k, v in calls(p):
            out = sp.attention(module, q[:, sl], k[:, sl], v[:, sl], layer=layer, sigma=s, grid=GRID,
                               positive_rows=[1], scale=0.25)
            dense = torch.softmax(q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2) * 0.25, -1) \
                @ v.transpose(1, 2)
            err = float((out - dense.transpose(1, 2)[:, sl]).abs().max())
            assert err < 1e-5, f"rank {rank}: dense output off by {err}"

    # driven by calibrate() as every host is; finish() inside it is the collective merge
    bundle = calibrate(run_prompt, range(PROMPTS), sp, keys=[f"p{p}" for p in range(PROMPTS)])
    merged = sp.merged_stats()

    ref = one_process()
    want = ref.state()
    assert merged.num_prompts == want.num_prompts and merged.prompt_keys == want.prompt_keys
    assert [s.to_dict() for s in merged.steps] == [s.to_dict() for s in want.steps]
    for sid in range(len(want.steps)):
        assert torch.equal(merged.observed[sid], want.observed[sid])
        for layer in range(2):
            a, b = merged.get_counts(sid, layer), want.get_counts(sid, layer)
            assert np.array_equal(a, b), f"rank {rank}: vote counters differ at step {sid} layer {layer}"
        for name in ("rep_err", "rep_frac", "drop"):
            assert torch.allclose(getattr(merged, name)[sid], getattr(want, name)[sid], rtol=1e-5, atol=1e-7), name

    cal = Calibrator(SIG, GRID, settings(), background=False)
    cal.merge(merged)
    got_b, want_b = cal.finish(), ref.finish()
    assert got_b.num_buckets == want_b.num_buckets
    for b in range(want_b.num_buckets):
        assert torch.equal(got_b.bucket_masks(b), want_b.bucket_masks(b))
        pa, pb = got_b.repetition_plan(b), want_b.repetition_plan(b)
        assert (pa is None) == (pb is None)
        if pa is not None:
            assert torch.equal(pa.head_slot, pb.head_slot)
    assert got_b.content_hash() == want_b.content_hash()
    assert bundle.content_hash() == want_b.content_hash()  # calibrate()'s bundle, made by the ranks' finish()


def test_ulysses_calibration_merged_once_equals_one_process():
    dist_harness.run_ranks(_worker, 2)
