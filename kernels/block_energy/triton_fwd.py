"""Block-energy statistics in Triton (calibration): same contract as naive.block_energy_reference.

Two launches, never an N x N matrix:
  1. row log-sum-exp (log2 domain) of every video query row over ALL keys, text included -> [B*H, Nv] float32
     (with a text bias, kernels/text_bias.py, added to the text keys' scores: padded text keys leave the
     normaliser; a constexpr branch, so the path without a bias is unchanged);
  2. per (query tile, batch*head): for every video key block, the sum over the tile's rows and the block's columns
     of exp2(s - lse), atomically added into the caller's [H, nq, nk] float32 buffer (the batch and the query
     tiles of one mask block meet there; atomics keep it one launch, at the cost of float rounding order).

Row subsampling (row_stride s > 1; semantics in naive.py): both launches run over "virtual" rows, VB per
query block (the next power of two >= ceil(block_q / s)); virtual row i of block qb reads the real row
qb * block_q + o + i * s, so both passes shrink by about s. The rescaling n / (rows used) is folded into the stored
log-sum-exp (lse - log2 w), which costs the block-sum pass nothing. When VB is smaller than the kernel tile, one tile
spans SEG = BLOCK_M / VB query blocks and its row sums are reduced per block before the atomics.

Text after or before the video: rows, LSE entries and key blocks count video tokens from 0; both launches add the
video's first sequence index VS when they load q and k, and the biased text keys are [TS, TS + N - NV). No copy.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ...masks.skiplists import BlockGeometry
from ..layouts import token_spans
from ..support import check_triton
from ..triton_common import (LOG2E, TileConfig, bias_arg, biased_scores, ensure_allocator, host_descs, load_tile,
                             pick_tiles, tile_source, tma_ok)
from .naive import check_row_stride


@triton.jit
def _lse_step(l_i, m_i, q, k, qk_scale, cols, col_limit, MASK_COLS: tl.constexpr):
    qk = tl.dot(q, tl.trans(k))
    if MASK_COLS:
        qk = tl.where((cols < col_limit)[None, :], qk, float("-inf"))
    m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
    l_i = l_i * tl.math.exp2(m_i - m_ij) + tl.sum(p, 1)
    return l_i, m_ij


@triton.jit
def _strided_rows(v, NV, NQ, ROW_OFF, BLOCK_Q, STRIDE: tl.constexpr, VB: tl.constexpr):
    """Virtual rows v -> (real row, valid, log2 of the block's rescale n / rows used). ROW_OFF < STRIDE."""
    qb = v // VB
    i = v % VB
    start = qb * BLOCK_Q
    n = tl.minimum(NV - start, BLOCK_Q)  # <= 0 past the last block
    n1 = tl.maximum(n, 1)
    o = ROW_OFF % n1  # a partial last block shorter than the offset still keeps one row
    local = o + i * STRIDE
    ok = (qb < NQ) & (local < n)
    used = (n1 - o + STRIDE - 1) // STRIDE
    log2w = tl.math.log2(n1.to(tl.float32) / used.to(tl.float32))
    return start + local, ok, log2w


@triton.jit
def _row_lse(Q, K, DK, LSE, TB, sqb, sqh, sql, skb, skh, skl, stb, H, N, NV, VS, TS, qk_scale, NQ, ROW_OFF, BLOCK_Q,
             NLSE,
             HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             DESC_MODE: tl.constexpr, STAGES: tl.constexpr, GROUP: tl.constexpr = 1,
             STRIDE: tl.constexpr = 1, VB: tl.constexpr = 1, HAS_BIAS: tl.constexpr = False):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if STRIDE == 1:
        rows = offs_m
        row_ok = offs_m < NV
    else:
        rows, row_ok, log2w = _strided_rows(offs_m, NV, NQ, ROW_OFF, BLOCK_Q, STRIDE, VB)
    q = tl.load(Q + b64 * sqb + h64 * sqh + (VS + rows).to(tl.int64)[:, None] * sql + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    k_base = K + b64 * skb + h64 * skh
    desc_k = tile_source(DK, k_base, N, skl, HEAD_DIM, BLOCK_N, DESC_MODE)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Without a bias one loop covers video and text keys, in memory order; with one, the video keys
    # [VS, VS + NV) first (a finite maximum before any padded text key), then the text keys.
    key_start = 0
    key_end = N
    if HAS_BIAS:
        key_start = VS
        key_end = VS + NV
    n_full = (key_end - key_start) // BLOCK_N
    for j in tl.range(0, n_full, num_stages=STAGES):
        k = load_tile(desc_k, k_base, b, h, key_start + j * BLOCK_N, key_end, skl, offs_n, offs_d, DESC_MODE,
                       False)
        l_i, m_i = _lse_step(l_i, m_i, q, k, qk_scale, offs_n, 0, False)
    start_n = key_start + n_full * BLOCK_N
    if start_n < key_end:
        k = load_tile(desc_k, k_base, b, h, start_n, key_end, skl, offs_n, offs_d, DESC_MODE, True)
        l_i, m_i = _lse_step(l_i, m_i, q, k, qk_scale, start_n + offs_n, key_end, True)
    if HAS_BIAS:
        bias_row = TB + b64 * stb
        for start_t in tl.range(TS, TS + N - NV, BLOCK_N, num_stages=STAGES):
            cols = start_t + offs_n
            k = load_tile(desc_k, k_base, b, h, start_t, TS + N - NV, skl, offs_n, offs_d, DESC_MODE, True)
            s = biased_scores(q, k, bias_row, cols, TS, TS + N - NV, qk_scale)
            m_ij = tl.maximum(m_i, tl.max(s, 1))
            l_i = l_i * tl.math.exp2(m_i - m_ij) + tl.sum(tl.math.exp2(s - m_ij[:, None]), 1)
            m_i = m_ij
    if STRIDE == 1:
        tl.store(LSE + bh.to(tl.int64) * NV + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)
    else:
        # Unused virtual rows get +inf, so the block-sum pass gives them exactly 0 without a mask.
        tl.store(LSE + bh.to(tl.int64) * NLSE + offs_m,
                 tl.where(row_ok, m_i + tl.math.log2(l_i) - log2w, float("inf")))


@triton.jit
def _block_mass(Q, K, DK, LSE, OUT, sqb, sqh, sql, skb, skh, skl, so_h, so_q, H, N, NV, VS, NK, TAIL_TILES, qk_scale,
                NQ, ROW_OFF, NLSE,
                BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_K: tl.constexpr,
                DESC_MODE: tl.constexpr, STAGES: tl.constexpr, GROUP: tl.constexpr = 16,
                STRIDE: tl.constexpr = 1, VB: tl.constexpr = 1, SEG: tl.constexpr = 1, SUBQ: tl.constexpr = 1):
    # SUBQ: programs per mask block (block_q // BLOCK_M rows at STRIDE 1, VB // BLOCK_M virtual rows otherwise);
    # SEG > 1: one program holds SEG blocks' VB virtual rows.
    SUBK: tl.constexpr = BLOCK_K // BLOCK_N
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    qb = pid_m // SUBQ
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if STRIDE == 1:
        row_ok = offs_m < NV
        q = tl.load(Q + b64 * sqb + h64 * sqh + (VS + offs_m).to(tl.int64)[:, None] * sql + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        # Rows past the video part get lse = +inf, so their probabilities are exactly 0.
        lse = tl.load(LSE + bh.to(tl.int64) * NV + offs_m, mask=row_ok, other=float("inf"))
    else:
        rows, row_ok, _ = _strided_rows(offs_m, NV, NQ, ROW_OFF, BLOCK_Q, STRIDE, VB)
        q = tl.load(Q + b64 * sqb + h64 * sqh + (VS + rows).to(tl.int64)[:, None] * sql + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + bh.to(tl.int64) * NLSE + offs_m)  # +inf on unused rows, rescale folded in
        if SEG > 1:
            qb = pid_m * SEG
            segs = tl.arange(0, SEG)
            seg_ok = (qb + segs) < NQ
            out_seg = OUT + h * so_h + (qb + segs) * so_q
    k_base = K + b64 * skb + h64 * skh
    desc_k = tile_source(DK, k_base, N, skl, HEAD_DIM, BLOCK_N, DESC_MODE)
    out_row = OUT + h * so_h + qb * so_q
    n_full = NK
    if TAIL_K:
        n_full = NK - 1
    # With GROUP > 1 the row sums of GROUP consecutive key blocks collect in a [BLOCK_M, GROUP] register tile and
    # cross the warps (a shared-memory reduction with a barrier) once per group instead of once per block.
    cols_g = tl.arange(0, GROUP)
    acc2 = tl.zeros([BLOCK_M, GROUP], dtype=tl.float32)
    for kb in tl.range(0, n_full, num_stages=STAGES):
        rows_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        for s in tl.static_range(SUBK):
            k = load_tile(desc_k, k_base, b, h, VS + kb * BLOCK_K + s * BLOCK_N, N, skl, offs_n, offs_d, DESC_MODE,
                           False)
            qk = tl.dot(q, tl.trans(k))
            rows_sum += tl.sum(tl.math.exp2(qk * qk_scale - lse[:, None]), 1)
        if GROUP == 1:
            if SEG == 1:
                tl.atomic_add(out_row + kb, tl.sum(rows_sum, 0))
            else:
                tl.atomic_add(out_seg + kb, tl.sum(tl.reshape(rows_sum, [SEG, VB]), 1), mask=seg_ok)
        else:
            slot = kb % GROUP
            acc2 = tl.where((cols_g == slot)[None, :], acc2 + rows_sum[:, None], acc2)
            if slot == GROUP - 1:
                if SEG == 1:
                    tl.atomic_add(out_row + (kb - (GROUP - 1)) + cols_g, tl.sum(acc2, 0))
                else:
                    tl.atomic_add(out_seg[:, None] + (kb - (GROUP - 1)) + cols_g[None, :],
                                  tl.sum(tl.reshape(acc2, [SEG, VB, GROUP]), 1), mask=seg_ok[:, None])
                acc2 = tl.zeros([BLOCK_M, GROUP], dtype=tl.float32)
    if GROUP > 1:
        rem = n_full % GROUP
        if rem > 0:
            if SEG == 1:
                tl.atomic_add(out_row + (n_full - rem) + cols_g, tl.sum(acc2, 0), mask=cols_g < rem)
            else:
                tl.atomic_add(out_seg[:, None] + (n_full - rem) + cols_g[None, :],
                              tl.sum(tl.reshape(acc2, [SEG, VB, GROUP]), 1),
                              mask=seg_ok[:, None] & (cols_g < rem)[None, :])
    if TAIL_K:
        rows_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        for t in range(0, TAIL_TILES):
            start_n = (NK - 1) * BLOCK_K + t * BLOCK_N
            k = load_tile(desc_k, k_base, b, h, VS + start_n, N, skl, offs_n, offs_d, DESC_MODE, True)
            qk = tl.dot(q, tl.trans(k))
            p = tl.math.exp2(qk * qk_scale - lse[:, None])
            p = tl.where(((start_n + offs_n) < NV)[None, :], p, 0.0)
            rows_sum += tl.sum(p, 1)
        if SEG == 1:
            tl.atomic_add(out_row + NK - 1, tl.sum(rows_sum, 0))
        else:
            tl.atomic_add(out_seg + NK - 1, tl.sum(tl.reshape(rows_sum, [SEG, VB]), 1), mask=seg_ok)


# Key blocks per cross-warp reduction in the block-sum pass. H100, 32,760 tokens, 40 heads (bench/bench_kernels.py,
# docs/BENCHMARKS.md "## Kernels"): group 1 -> 1.76x one cuDNN dense forward, 8 -> 1.47x, 16 -> 1.45x.
STATS_GROUP = 16


def block_energy_triton(q: torch.Tensor, k: torch.Tensor, geometry: BlockGeometry, *, scale: Optional[float] = None,
                        out: Optional[torch.Tensor] = None, row_stride: int = 1,
                        row_offset: int = 0, text_bias: Optional[torch.Tensor] = None,
                        video_start: int = 0, group: int = STATS_GROUP,
                        tiles: Optional[TileConfig] = None) -> torch.Tensor:
    """q, k: (B, H, N, D) float16/bfloat16 (any strides with a unit last stride). out [H, nq, nk] float32 is
    accumulated into (created as zeros when None). row_stride / row_offset: estimate from a strided subsample of
    each query block's rows (naive.block_energy_reference). text_bias: (T,), (1, T) or (B, T) additive bias
    on the text keys' scores (kernels/text_bias.py). video_start: 0 (text after the video) or the text token count
    (text first; kernels/layouts.py token_spans). group: key blocks per cross-warp reduction of the block-sum pass
    (benchmarks sweep it). tiles: a tile configuration taken as given (benchmarks, tests), else the table's.
    """
    row_stride, row_offset = check_row_stride(row_stride, row_offset)
    B, H, N, D = q.shape
    g = geometry
    Nv = g.num_tokens
    if N < Nv or k.shape != q.shape:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must match and cover {Nv} video tokens")
    vs, ts, Nt = token_spans(N, Nv, video_start)
    check_triton(q, k, need_cuda=False)
    if out is None:
        out = torch.zeros(H, g.nq, g.nk, dtype=torch.float32, device=q.device)
    if out.shape != (H, g.nq, g.nk) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be contiguous float32 [{H}, {g.nq}, {g.nk}], got {out.dtype} {tuple(out.shape)}")
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    tb, stb = bias_arg(text_bias, B, Nt, q.device)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qk_scale = scale * LOG2E
    cfg = pick_tiles(D, g.block_q, g.block_k, q.device, tiles)
    mode = cfg.tma if tma_ok(k) else 0
    if mode == 1:
        ensure_allocator()
    dense_cfg = pick_tiles(D, 128, 128, q.device, tiles)
    if row_stride == 1:
        vb = seg = 1
        subq = g.block_q // cfg.block_m
        n_lse = Nv
        lse_programs = triton.cdiv(Nv, dense_cfg.block_m)
        mass_programs = g.nq * (g.block_q // cfg.block_m)
    else:
        vb = triton.next_power_of_2(triton.cdiv(g.block_q, row_stride))
        seg = max(cfg.block_m // vb, 1)
        subq = max(vb // cfg.block_m, 1)
        rows_v = g.nq * vb  # virtual rows; padded so that every program of either pass reads inside the buffer
        n_lse = triton.cdiv(rows_v, max(dense_cfg.block_m, cfg.block_m)) * max(dense_cfg.block_m, cfg.block_m)
        lse_programs = n_lse // dense_cfg.block_m
        mass_programs = triton.cdiv(rows_v, cfg.block_m)
    off = row_offset % row_stride
    lse = torch.empty(B * H, n_lse, dtype=torch.float32, device=q.device)
    dk = host_descs(k, k, dense_cfg.block_n, mode)[0]
    _row_lse[(lse_programs, B * H)](
        q, k, dk, lse, lse if tb is None else tb, q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), stb, H, N, Nv, vs, ts, qk_scale, g.nq, off, g.block_q, n_lse,
        HEAD_DIM=D, BLOCK_M=dense_cfg.block_m, BLOCK_N=dense_cfg.block_n, DESC_MODE=mode, STAGES=dense_cfg.stages,
        STRIDE=row_stride, VB=vb, HAS_BIAS=tb is not None, num_warps=dense_cfg.num_warps)
    tail_k = Nv % g.block_k != 0
    tail_tiles = triton.cdiv(Nv - (g.nk - 1) * g.block_k, cfg.block_n)
    dk = dk if cfg.block_n == dense_cfg.block_n else host_descs(k, k, cfg.block_n, mode)[0]
    _block_mass[(mass_programs, B * H)](
        q, k, dk, lse, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1), H, N, Nv, vs, g.nk, tail_tiles, qk_scale, g.nq, off, n_lse,
        BLOCK_Q=g.block_q, BLOCK_K=g.block_k, HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        TAIL_K=tail_k, DESC_MODE=mode, STAGES=cfg.stages, GROUP=group,
        STRIDE=row_stride, VB=vb, SEG=seg, SUBQ=subq, num_warps=cfg.num_warps)
    return out
