"""Block-sparse flash-attention forward in Triton, reading a LayerSkipList.

Same function as kernels/attention/naive.py `sparse_attention_reference` (video rows: listed video key blocks + all text
keys; text rows: dense; repetitive heads: anchor rows dense, other rows copy their anchor). Three launches, none
of which syncs with the host:
  1. video query rows: one program per (query tile, batch*head); it walks the key blocks listed for its mask row
     (both QK^T and PV of unlisted blocks are skipped), then the text keys;
  2. text query rows (only when there are text tokens): dense over every key;
  3. anchor rows of repetitive heads (only when the layer has a repetition plan): dense over every key, rows
     gathered through a table; torch then broadcasts each anchor's output to the rows it stands for.
q, k, v and the output are read and written through their strides, so (B, L, H*D) and (B, H, L, D) tensors are
used in place. The text tokens sit after the video or before it: every launch takes the video's first sequence
index (VS, a row and key offset; skip lists number video tokens from 0) and the text key range [TS, TS + N - NV),
so text-first sequences run without a copy. Video keys are always visited before text keys, whatever their memory
order, so every row has a finite running maximum before a padded (-inf) text tile. Skip-list indices must be
ascending within a row (mask_to_table writes them so): the only partial video key block (the last one) is then the
last listed and is peeled off the unmasked main loop.
An optional text bias (kernels/text_bias.py: a key-padding mask over the text keys, (Bb, T) float32, batch stride 0
when shared) is added to the text keys' scores in all three launches; it is a constexpr branch (HAS_BIAS), so the
path without a bias compiles to the same code as before.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ...masks.skiplists import LayerSkipList
from ..layouts import from_bhld, to_bhld, token_spans
from ..support import PRECISIONS, QUANTIZED, KernelUnsupported, check_triton, precision_unsupported
from .triton_fp8 import quantize_kv, sparse_video_fp8_fwd, v_descriptor
from ..triton_common import (LOG2E, TileConfig, bias_arg, biased_scores, ensure_allocator, host_descs,
                             interpreting, listed_blocks, load_tile, pick_tiles, tile_source, tma_ok,
                             video_program)


# ---------------------------------------------------------------------------------------------------------------
# device code
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _softmax_step(acc, l_i, m_i, q, k, v, qk_scale, cols, col_limit, MASK_COLS: tl.constexpr):
    # Online softmax in the log2 domain (scale folded into qk_scale), float32 accumulators.
    qk = tl.dot(q, tl.trans(k))
    if MASK_COLS:
        qk = tl.where((cols < col_limit)[None, :], qk, float("-inf"))
    m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_ij


@triton.jit
def _dense_keys(acc, l_i, m_i, q, desc_k, desc_v, k_base, v_base, b, h, key_start, key_end, skl, svl, qk_scale,
                offs_n, offs_d, BLOCK_N: tl.constexpr, DESC_MODE: tl.constexpr, STAGES: tl.constexpr):
    """Keys [key_start, key_end): whole tiles unmasked, then one masked tail tile."""
    n_full = (key_end - key_start) // BLOCK_N
    for j in tl.range(0, n_full, num_stages=STAGES):
        start_n = key_start + j * BLOCK_N
        k = load_tile(desc_k, k_base, b, h, start_n, key_end, skl, offs_n, offs_d, DESC_MODE, False)
        v = load_tile(desc_v, v_base, b, h, start_n, key_end, svl, offs_n, offs_d, DESC_MODE, False)
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, qk_scale, offs_n, 0, False)
    start_n = key_start + n_full * BLOCK_N
    if start_n < key_end:
        k = load_tile(desc_k, k_base, b, h, start_n, key_end, skl, offs_n, offs_d, DESC_MODE, True)
        v = load_tile(desc_v, v_base, b, h, start_n, key_end, svl, offs_n, offs_d, DESC_MODE, True)
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, qk_scale, start_n + offs_n, key_end, True)
    return acc, l_i, m_i


@triton.jit
def _biased_keys(acc, l_i, m_i, q, desc_k, desc_v, k_base, v_base, b, h, key_start, key_end, skl, svl, qk_scale,
                 bias_row, offs_n, offs_d, BLOCK_N: tl.constexpr, DESC_MODE: tl.constexpr, STAGES: tl.constexpr):
    """Keys [key_start, key_end) (the text keys) with bias_row[j - key_start] added to their scores (natural-log
    units, as the host mask). Every tile is masked: text is a few hundred keys, so this costs nothing measurable.
    Columns past key_end get -inf through the bias load; the caller guarantees an earlier finite score per row
    (it visits the video keys first), so a fully padded tile cannot make exp2(-inf - -inf)."""
    for start_n in tl.range(key_start, key_end, BLOCK_N, num_stages=STAGES):
        cols = start_n + offs_n
        k = load_tile(desc_k, k_base, b, h, start_n, key_end, skl, offs_n, offs_d, DESC_MODE, True)
        v = load_tile(desc_v, v_base, b, h, start_n, key_end, svl, offs_n, offs_d, DESC_MODE, True)
        s = biased_scores(q, k, bias_row, cols, key_start, key_end, qk_scale)
        m_ij = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _sparse_video_fwd(Q, K, V, O, DK, DV, IDX, CNT, SKIP_ROWS, TB,
                      sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol,
                      idx_sh, idx_sq, cnt_sh, stb,
                      H, N, NV, VS, TS, NK, TAIL_TILES, qk_scale,
                      BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_K: tl.constexpr, HAS_TEXT: tl.constexpr,
                      DESC_MODE: tl.constexpr, STAGES: tl.constexpr,
                      HAS_BIAS: tl.constexpr = False):
    SUBK: tl.constexpr = BLOCK_K // BLOCK_N
    b, h, qb, row0, row_end = video_program(H, NV, BLOCK_Q, BLOCK_M)
    # Rows that another path writes (anchor broadcast of a repetitive head, dense-routed heads) are skipped.
    skip_rows = tl.load(SKIP_ROWS + h)
    if row_end > skip_rows:
        offs_m = row0 + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        q_base = Q + b64 * sqb + h64 * sqh
        k_base = K + b64 * skb + h64 * skh
        v_base = V + b64 * svb + h64 * svh
        o_base = O + b64 * sob + h64 * soh
        row_ok = offs_m < NV
        # offs_m and key columns count video tokens from 0; VS moves them to their sequence positions.
        seq_m = (VS + offs_m).to(tl.int64)
        q = tl.load(q_base + seq_m[:, None] * sql + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        desc_k = tile_source(DK, k_base, N, skl, HEAD_DIM, BLOCK_N, DESC_MODE)
        desc_v = tile_source(DV, v_base, N, svl, HEAD_DIM, BLOCK_N, DESC_MODE)
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        idx_row, cnt, n_blocks = listed_blocks(IDX, CNT, h64, qb, idx_sh, idx_sq, cnt_sh, NK, TAIL_K)
        # Main loop: listed blocks that lie wholly inside the video part, each as SUBK kernel tiles.
        for j in tl.range(0, n_blocks * SUBK, num_stages=STAGES):
            kb = tl.load(idx_row + j // SUBK).to(tl.int32)
            start_n = VS + kb * BLOCK_K + (j % SUBK) * BLOCK_N
            k = load_tile(desc_k, k_base, b, h, start_n, N, skl, offs_n, offs_d, DESC_MODE, False)
            v = load_tile(desc_v, v_base, b, h, start_n, N, svl, offs_n, offs_d, DESC_MODE, False)
            acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, qk_scale, offs_n, 0, False)
        if TAIL_K:
            if n_blocks < cnt:
                # The partial last video block: video columns at or past NV are text (handled below) or past the
                # end of the sequence.
                for t in range(0, TAIL_TILES):
                    start_n = (NK - 1) * BLOCK_K + t * BLOCK_N
                    k = load_tile(desc_k, k_base, b, h, VS + start_n, N, skl, offs_n, offs_d, DESC_MODE, True)
                    v = load_tile(desc_v, v_base, b, h, VS + start_n, N, svl, offs_n, offs_d, DESC_MODE, True)
                    acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, qk_scale, start_n + offs_n, NV, True)
        if HAS_TEXT:
            if HAS_BIAS:
                acc, l_i, m_i = _biased_keys(acc, l_i, m_i, q, desc_k, desc_v, k_base, v_base, b, h, TS,
                                             TS + N - NV, skl, svl, qk_scale, TB + b64 * stb, offs_n, offs_d,
                                             BLOCK_N, DESC_MODE, STAGES)
            else:
                acc, l_i, m_i = _dense_keys(acc, l_i, m_i, q, desc_k, desc_v, k_base, v_base, b, h, TS,
                                            TS + N - NV, skl, svl, qk_scale, offs_n, offs_d, BLOCK_N, DESC_MODE,
                                            STAGES)
        out = acc / l_i[:, None]
        tl.store(o_base + seq_m[:, None] * sol + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=row_ok[:, None])


@triton.jit
def _dense_rows_fwd(Q, K, V, O, DK, DV, ROWS, HEADS, SKIP_ROWS, TB,
                    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol,
                    rows_sr, stb, H, R, N, NV, VS, TS, ROW0, NROWS, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    GATHER: tl.constexpr, DESC_MODE: tl.constexpr, STAGES: tl.constexpr,
                    HAS_BIAS: tl.constexpr = False):
    """Rows attending every key. GATHER=False: sequence rows ROW0 + [0, NROWS) of every head (text rows), output in
    place. GATHER=True: program axis 1 is batch*R; video rows ROWS[r, :NROWS] (counted from the first video token,
    at sequence index VS) of head HEADS[r]; output [B, R, NROWS, D].
    HAS_BIAS: the video keys [VS, VS + NV) first (so every row has a finite score), then the text keys
    [TS, TS + N - NV) with the text bias TB[b]."""
    pid_m = tl.program_id(0)
    bx = tl.program_id(1)
    offs_i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_i < NROWS
    if GATHER:
        b = bx // R
        r = bx % R
        h = tl.load(HEADS + r)
        rows = VS + tl.load(ROWS + r.to(tl.int64) * rows_sr + offs_i, mask=row_ok, other=0)
        run = True
    else:
        b = bx // H
        h = bx % H
        rows = ROW0 + offs_i
        run = tl.load(SKIP_ROWS + h) < N
    if run:
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        q_base = Q + b64 * sqb + h64 * sqh
        k_base = K + b64 * skb + h64 * skh
        v_base = V + b64 * svb + h64 * svh
        q = tl.load(q_base + rows.to(tl.int64)[:, None] * sql + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        desc_k = tile_source(DK, k_base, N, skl, HEAD_DIM, BLOCK_N, DESC_MODE)
        desc_v = tile_source(DV, v_base, N, svl, HEAD_DIM, BLOCK_N, DESC_MODE)
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        if HAS_BIAS:
            acc, l_i, m_i = _dense_keys(acc, l_i, m_i, q, desc_k, desc_v, k_base, v_base, b, h, VS, VS + NV, skl,
                                        svl, qk_scale, offs_n, offs_d, BLOCK_N, DESC_MODE, STAGES)
            acc, l_i, m_i = _biased_keys(acc, l_i, m_i, q, desc_k, desc_v, k_base, v_base, b, h, TS, TS + N - NV,
                                         skl, svl, qk_scale, TB + b64 * stb, offs_n, offs_d, BLOCK_N, DESC_MODE,
                                         STAGES)
        else:
            acc, l_i, m_i = _dense_keys(acc, l_i, m_i, q, desc_k, desc_v, k_base, v_base, b, h, 0, N, skl, svl,
                                        qk_scale, offs_n, offs_d, BLOCK_N, DESC_MODE, STAGES)
        out = (acc / l_i[:, None]).to(O.dtype.element_ty)
        if GATHER:
            o_ptrs = O + bx.to(tl.int64) * sob + offs_i.to(tl.int64)[:, None] * sol + offs_d[None, :]
        else:
            o_ptrs = O + b64 * sob + h64 * soh + rows.to(tl.int64)[:, None] * sol + offs_d[None, :]
        tl.store(o_ptrs, out, mask=row_ok[:, None])


# ---------------------------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------------------------
# Host TMA descriptors are encoded on the host at every launch, which costs about 0.15 ms of host time: more than a
# small call's whole attention. Below this many (query, key) pairs per call the kernel builds its descriptors on the
# GPU instead (mode 1). H100, 8,192 tokens, B 2, H 4, D 64, blocks of 64 (bench/tiny_shape_timing.py --tma,
# docs/BENCHMARKS.md): host descriptors 0.352 / 0.168 / 0.160 ms at density 1.0 / 0.4 / 0.2 (a floor: the host),
# pointers 0.379 / 0.245 / 0.140 at 1.0 / 0.6 / 0.3, in-kernel descriptors 0.330 / 0.225 / 0.129. At Wan's sizes
# (>= 1e10 pairs per call) a call takes milliseconds and host and in-kernel descriptors time the same.
_TMA_MIN_PAIRS = 1 << 32


def sparse_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, skip: LayerSkipList, *,
                            layout: str = "bhld", heads: Optional[int] = None, scale: Optional[float] = None,
                            skip_heads: Optional[torch.Tensor] = None,
                            out: Optional[torch.Tensor] = None,
                            text_bias: Optional[torch.Tensor] = None, video_start: int = 0,
                            tiles: Optional[TileConfig] = None, precision: str = "bf16") -> torch.Tensor:
    """Triton block-sparse attention; same contract as sparse_attention_reference.

    skip_heads: optional [H] bool on q's device; heads marked True are left unwritten here (the caller fills
    them, e.g. from a dense kernel). out: optional result buffer in the call's layout and q's shape; by default
    the output has q's memory order (a (B, L, H*D) call gets (B, L, H*D) back without a copy).
    text_bias: (T,), (1, T) or (B, T) additive bias on the text keys' scores (kernels/text_bias.py).
    video_start: 0 (text after the video) or the text token count (text first; kernels/layouts.py token_spans).
    tiles: a tile configuration taken as given (benchmarks sweep variants through it); None picks from the table.
    precision: "bf16" (q, k, v as given) or a kernels/support.py QUANTIZED name: the video rows' Q·K in 8 bits (e4m3
    "fp8*", int8 "int8*"), P·V in e4m3 too or in bf16 ("*-qk"); kernels/attention/triton_fp8.py. Needs head_dim >= 32
    and the GPU's 8-bit tensor cores (KernelUnsupported otherwise)."""
    qh, kh, vh = (to_bhld(t, layout, heads) for t in (q, k, v))
    B, H, N, D = qh.shape
    g = skip.geometry
    Nv = g.num_tokens
    if N < Nv or kh.shape[2] != N or vh.shape[2] != N:
        raise ValueError(f"sequence of {N} tokens (keys {kh.shape[2]}) does not cover the {Nv} masked tokens")
    vs, ts, Nt = token_spans(N, Nv, video_start)
    if skip.num_heads != H:
        raise ValueError(f"skip list has {skip.num_heads} heads, the call has {H}")
    check_triton(qh, kh, vh, need_cuda=False)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    why = precision_unsupported(precision, qh.device, D)
    if why is not None:
        raise KernelUnsupported(f"8-bit computed blocks cannot run this call: {why}")
    qh, kh, vh = (t if t.stride(-1) == 1 else t.contiguous() for t in (qh, kh, vh))
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dev = qh.device
    tb, stb = bias_arg(text_bias, B, Nt, dev)
    cfg = pick_tiles(D, g.block_q, g.block_k, dev, tiles)
    mode = cfg.tma if all(tma_ok(t) for t in (kh, vh)) else 0
    if mode == 2 and tiles is None and B * H * Nv * N < _TMA_MIN_PAIRS and not interpreting():
        mode = 1
    if mode == 1:
        ensure_allocator()
    dk, dv = host_descs(kh, vh, cfg.block_n, mode)

    if out is None:
        out = torch.empty_like(qh)  # keeps q's memory order when q is a dense permutation (the "bld" view)
    else:
        if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
            raise ValueError(f"out must match q: {tuple(q.shape)} {q.dtype} on {q.device}, got "
                             f"{tuple(out.shape)} {out.dtype} on {out.device}")
        out = to_bhld(out, layout, heads)
        if out.stride(-1) != 1:
            raise ValueError("out must have a unit stride along head_dim")
    if skip.kv_indices.device != dev or skip.rows.skip_rows.device != dev:
        # A copy here would be a host-to-device transfer (and, for a repetition plan, a read-back) on every call.
        raise ValueError(f"the skip list's tables are on {skip.kv_indices.device}, the call's tensors on {dev}: move "
                         f"the list to the device once with LayerSkipList.to(device) (the runner's tables already "
                         f"live there)")
    rows = skip.rows
    skip_rows = rows.skip_rows
    if skip_heads is not None:
        skip_rows = torch.where(skip_heads.to(dev), torch.full_like(skip_rows, N + 1), skip_rows)

    idx, cnt = skip.kv_indices, skip.kv_counts
    if cnt.stride(-1) != 1:
        cnt = cnt.contiguous()
    if idx.stride(-1) != 1:
        idx = idx.contiguous()
    qk_scale = scale * LOG2E
    tail_k = Nv % g.block_k != 0
    tail_tiles = triton.cdiv(Nv - (g.nk - 1) * g.block_k, cfg.block_n)
    grid = (g.nq * (g.block_q // cfg.block_m), B * H)
    tb_ptr = skip_rows if tb is None else tb  # never read without HAS_BIAS
    if precision == "bf16":
        _sparse_video_fwd[grid](
            qh, kh, vh, out, dk, dv, idx, cnt, skip_rows, tb_ptr,
            qh.stride(0), qh.stride(1), qh.stride(2), kh.stride(0), kh.stride(1), kh.stride(2),
            vh.stride(0), vh.stride(1), vh.stride(2), out.stride(0), out.stride(1), out.stride(2),
            idx.stride(0), idx.stride(1), cnt.stride(0), stb,
            H, N, Nv, vs, ts, g.nk, tail_tiles, qk_scale,
            BLOCK_Q=g.block_q, BLOCK_K=g.block_k, HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            TAIL_K=tail_k, HAS_TEXT=Nt > 0, DESC_MODE=mode, STAGES=cfg.stages,
            HAS_BIAS=tb is not None, num_warps=cfg.num_warps)
    else:
        _fp8_video_rows(qh, kh, vh, out, idx, cnt, skip_rows, tb, stb, g, cfg, mode, vs, ts, qk_scale, grid,
                        *QUANTIZED[precision])
    dense_cfg = pick_tiles(D, 128, 128, dev, tiles)
    dm = dense_cfg.block_m
    if Nt or rows.anchor_heads is not None:
        ddk, ddv = (dk, dv) if dense_cfg.block_n == cfg.block_n else host_descs(kh, vh, dense_cfg.block_n, mode)
    if Nt:
        _dense_rows_fwd[(triton.cdiv(Nt, dm), B * H)](
            qh, kh, vh, out, ddk, ddv, skip_rows, skip_rows, skip_rows, tb_ptr,
            qh.stride(0), qh.stride(1), qh.stride(2), kh.stride(0), kh.stride(1), kh.stride(2),
            vh.stride(0), vh.stride(1), vh.stride(2), out.stride(0), out.stride(1), out.stride(2),
            0, stb, H, 1, N, Nv, vs, ts, ts, Nt, qk_scale,
            HEAD_DIM=D, BLOCK_M=dm, BLOCK_N=dense_cfg.block_n, GATHER=False, DESC_MODE=mode,
            STAGES=dense_cfg.stages, HAS_BIAS=tb is not None, num_warps=dense_cfg.num_warps)
    if rows.anchor_heads is not None:
        R, FK = rows.anchor_rows.shape
        a_out = torch.empty(B, R, FK, D, dtype=qh.dtype, device=dev)
        _dense_rows_fwd[(triton.cdiv(FK, dm), B * R)](
            qh, kh, vh, a_out, ddk, ddv, rows.anchor_rows, rows.anchor_heads, skip_rows, tb_ptr,
            qh.stride(0), qh.stride(1), qh.stride(2), kh.stride(0), kh.stride(1), kh.stride(2),
            vh.stride(0), vh.stride(1), vh.stride(2), a_out.stride(1), 0, a_out.stride(2),
            rows.anchor_rows.stride(0), stb, H, R, N, Nv, vs, ts, 0, FK, qk_scale,
            HEAD_DIM=D, BLOCK_M=dm, BLOCK_N=dense_cfg.block_n, GATHER=True, DESC_MODE=mode,
            STAGES=dense_cfg.stages, HAS_BIAS=tb is not None, num_warps=dense_cfg.num_warps)
        # Broadcast: each head's F*T video rows take their anchor's output (gather on the GPU, no host sync),
        # frame by frame: the per-frame anchor slot is broadcast over frames (an expanded index, no F*T table).
        # Heads in skip_heads get this too; the caller overwrites them afterwards.
        F_, T_ = rows.frames, rows.row_anchor.shape[2]
        a5 = a_out.view(B, R, F_, FK // F_, D)
        bcast = torch.gather(a5, 3, rows.row_anchor[None].expand(B, R, F_, T_, D))
        out[:, rows.anchor_heads.long(), vs:vs + rows.covered] = bcast.view(B, R, rows.covered, D)
    return from_bhld(out, layout)


def _fp8_video_rows(qh, kh, vh, out, idx, cnt, skip_rows, tb, stb, g, cfg, mode, vs, ts, qk_scale, grid, qk_int8,
                    pv_fp8):
    """The video rows' launch with e4m3 computed blocks (kernels/attention/triton_fp8.py): K (and V) quantized
    once for the call, Q per row in the kernel. Host descriptors where the bf16 launch would use them; pointer loads
    for small calls (in-kernel descriptors are not wired for the transposed values)."""
    B, H, N, D = qh.shape
    Nv = g.num_tokens
    mode = 2 if mode == 2 else 0
    k8, ks, vq, v_scale, nvc = quantize_kv(kh, vh, video_tokens=Nv, video_start=vs, text_start=ts,
                                           block_n=cfg.block_n, pv_fp8=pv_fp8, qk_int8=qk_int8)
    dk = host_descs(k8, k8, cfg.block_n, mode)[0]
    dv = v_descriptor(vq, cfg.block_n, pv_fp8, mode)
    tail_tiles = triton.cdiv(Nv - (g.nk - 1) * g.block_k, cfg.block_n)
    sparse_video_fp8_fwd[grid](
        qh, k8, vq, out, dk, dv, ks, ks if v_scale is None else v_scale, idx, cnt, skip_rows,
        skip_rows if tb is None else tb,
        qh.stride(0), qh.stride(1), qh.stride(2), k8.stride(0), k8.stride(1), k8.stride(2),
        vq.stride(0), vq.stride(1), vq.stride(2), out.stride(0), out.stride(1), out.stride(2),
        idx.stride(0), idx.stride(1), cnt.stride(0), stb, ks.stride(0),
        H, N, Nv, vs, ts, g.nk, nvc, k8.shape[2], tail_tiles, qk_scale,
        BLOCK_Q=g.block_q, BLOCK_K=g.block_k, HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        TAIL_K=Nv % g.block_k != 0, HAS_TEXT=N > Nv, DESC_MODE=mode, STAGES=cfg.stages, HAS_BIAS=tb is not None,
        PV_FP8=pv_fp8, QK_INT8=qk_int8, num_warps=cfg.num_warps)
