"""Block-energy statistics in Triton (calibration): same contract as stats_reference.block_energy_reference.

Two launches, never an N x N matrix:
  1. row log-sum-exp (log2 domain) of every video query row over ALL keys, text included -> [B*H, Nv] float32;
  2. per (query tile, batch*head): for every video key block, the sum over the tile's rows and the block's columns
     of exp2(s - lse), atomically added into the caller's [H, nq, nk] float32 buffer (the batch and the query
     tiles of one mask block meet there; atomics keep it one launch, at the cost of float rounding order).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ..masks.skiplists import BlockGeometry
from .triton_attention import (LOG2E, TritonUnsupported, _descs, _ensure_allocator, _kv_desc, _load_tile, _tma_ok,
                               pick_tiles)


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
def _row_lse(Q, K, DK, LSE, sqb, sqh, sql, skb, skh, skl, H, N, NV, qk_scale,
             HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             DESC_MODE: tl.constexpr, STAGES: tl.constexpr, GROUP: tl.constexpr = 1):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < NV
    q = tl.load(Q + b64 * sqb + h64 * sqh + offs_m.to(tl.int64)[:, None] * sql + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    k_base = K + b64 * skb + h64 * skh
    if DESC_MODE == 2:
        desc_k = DK
    elif DESC_MODE == 1:
        desc_k = _kv_desc(k_base, N, skl, HEAD_DIM, BLOCK_N)
    else:
        desc_k = k_base
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    n_full = N // BLOCK_N
    for j in tl.range(0, n_full, num_stages=STAGES):
        k = _load_tile(desc_k, k_base, b, h, j * BLOCK_N, N, skl, offs_n, offs_d, DESC_MODE, False)
        l_i, m_i = _lse_step(l_i, m_i, q, k, qk_scale, offs_n, 0, False)
    start_n = n_full * BLOCK_N
    if start_n < N:
        k = _load_tile(desc_k, k_base, b, h, start_n, N, skl, offs_n, offs_d, DESC_MODE, True)
        l_i, m_i = _lse_step(l_i, m_i, q, k, qk_scale, start_n + offs_n, N, True)
    tl.store(LSE + bh.to(tl.int64) * NV + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)


@triton.jit
def _block_mass(Q, K, DK, LSE, OUT, sqb, sqh, sql, skb, skh, skl, so_h, so_q, H, N, NV, NK, TAIL_TILES, qk_scale,
                BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_K: tl.constexpr,
                DESC_MODE: tl.constexpr, STAGES: tl.constexpr, GROUP: tl.constexpr = 16):
    SUBQ: tl.constexpr = BLOCK_Q // BLOCK_M
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
    row_ok = offs_m < NV
    q = tl.load(Q + b64 * sqb + h64 * sqh + offs_m.to(tl.int64)[:, None] * sql + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    # Rows past the video part get lse = +inf, so their probabilities are exactly 0.
    lse = tl.load(LSE + bh.to(tl.int64) * NV + offs_m, mask=row_ok, other=float("inf"))
    k_base = K + b64 * skb + h64 * skh
    if DESC_MODE == 2:
        desc_k = DK
    elif DESC_MODE == 1:
        desc_k = _kv_desc(k_base, N, skl, HEAD_DIM, BLOCK_N)
    else:
        desc_k = k_base
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
            k = _load_tile(desc_k, k_base, b, h, kb * BLOCK_K + s * BLOCK_N, N, skl, offs_n, offs_d, DESC_MODE, False)
            qk = tl.dot(q, tl.trans(k))
            rows_sum += tl.sum(tl.math.exp2(qk * qk_scale - lse[:, None]), 1)
        if GROUP == 1:
            tl.atomic_add(out_row + kb, tl.sum(rows_sum, 0))
        else:
            slot = kb % GROUP
            acc2 = tl.where((cols_g == slot)[None, :], acc2 + rows_sum[:, None], acc2)
            if slot == GROUP - 1:
                tl.atomic_add(out_row + (kb - (GROUP - 1)) + cols_g, tl.sum(acc2, 0))
                acc2 = tl.zeros([BLOCK_M, GROUP], dtype=tl.float32)
    if GROUP > 1:
        rem = n_full % GROUP
        if rem > 0:
            tl.atomic_add(out_row + (n_full - rem) + cols_g, tl.sum(acc2, 0), mask=cols_g < rem)
    if TAIL_K:
        rows_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        for t in range(0, TAIL_TILES):
            start_n = (NK - 1) * BLOCK_K + t * BLOCK_N
            k = _load_tile(desc_k, k_base, b, h, start_n, N, skl, offs_n, offs_d, DESC_MODE, True)
            qk = tl.dot(q, tl.trans(k))
            p = tl.math.exp2(qk * qk_scale - lse[:, None])
            p = tl.where(((start_n + offs_n) < NV)[None, :], p, 0.0)
            rows_sum += tl.sum(p, 1)
        tl.atomic_add(out_row + NK - 1, tl.sum(rows_sum, 0))


# Key blocks per cross-warp reduction in the block-sum pass. H100, 32,760 tokens, 40 heads (bench/bench_kernels.py,
# docs/BENCHMARKS.md "## Kernels"): group 1 -> 1.76x one cuDNN dense forward, 8 -> 1.47x, 16 -> 1.45x.
STATS_GROUP = {"group": 16}


def block_energy_triton(q: torch.Tensor, k: torch.Tensor, geometry: BlockGeometry, *, scale: Optional[float] = None,
                        out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q, k: (B, H, N, D) float16/bfloat16 (any strides with a unit last stride). out [H, nq, nk] float32 is
    accumulated into (created as zeros when None)."""
    B, H, N, D = q.shape
    g = geometry
    Nv = g.num_tokens
    if N < Nv or k.shape != q.shape:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must match and cover {Nv} video tokens")
    if D not in (16, 32, 64, 128):
        raise TritonUnsupported(f"head_dim {D} is not supported by the Triton statistics kernel (16, 32, 64 or 128)")
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype:
        raise TritonUnsupported(f"the Triton statistics kernel takes float16 or bfloat16 q and k, got "
                                f"{q.dtype}/{k.dtype}")
    if out is None:
        out = torch.zeros(H, g.nq, g.nk, dtype=torch.float32, device=q.device)
    if out.shape != (H, g.nq, g.nk) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be contiguous float32 [{H}, {g.nq}, {g.nk}], got {out.dtype} {tuple(out.shape)}")
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qk_scale = scale * LOG2E
    cfg = pick_tiles(D, g.block_q, g.block_k, q.device)
    mode = cfg.tma if _tma_ok(k) else 0
    if mode == 1:
        _ensure_allocator()
    lse = torch.empty(B * H, Nv, dtype=torch.float32, device=q.device)
    dense_cfg = pick_tiles(D, 128, 128, q.device)
    dk = _descs(k, k, dense_cfg.block_n, mode)[0]
    _row_lse[(triton.cdiv(Nv, dense_cfg.block_m), B * H)](
        q, k, dk, lse, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), H, N, Nv, qk_scale,
        HEAD_DIM=D, BLOCK_M=dense_cfg.block_m, BLOCK_N=dense_cfg.block_n, DESC_MODE=mode, STAGES=dense_cfg.stages,
        num_warps=dense_cfg.num_warps)
    tail_k = Nv % g.block_k != 0
    tail_tiles = triton.cdiv(Nv - (g.nk - 1) * g.block_k, cfg.block_n)
    dk = dk if cfg.block_n == dense_cfg.block_n else _descs(k, k, cfg.block_n, mode)[0]
    _block_mass[(g.nq * (g.block_q // cfg.block_m), B * H)](
        q, k, dk, lse, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1), H, N, Nv, g.nk, tail_tiles, qk_scale,
        BLOCK_Q=g.block_q, BLOCK_K=g.block_k, HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        TAIL_K=tail_k, DESC_MODE=mode, STAGES=cfg.stages, GROUP=STATS_GROUP["group"],
        num_warps=cfg.num_warps)
    return out
