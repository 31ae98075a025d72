"""FP8 (e4m3) computed blocks for the video-row launch of the sparse attention (Hopper and Ada; opt-in).

Same skip lists, same three launches as triton_fwd.py; only the video rows' launch changes (text rows and anchor
rows are a small share of the work and stay bf16):
  - Q·K in e4m3 with float32 accumulation. Q is quantized in the kernel, one scale per query row (a program keeps
    its Q tile for its whole key loop, so this costs nothing). K is quantized once per call by `quantize_kv`, one
    scale per chunk of BLOCK_N keys (the kernel's key tile: video keys in chunks from the first video token, text
    keys in chunks from the first text token, so every loaded tile has exactly one scale), after subtracting the
    mean key of its (batch, head) (SageAttention's smoothing: q·(k - m) = q·k - q·m shifts every score of a row by
    the same amount, which softmax ignores, and it removes the shared offset that would waste e4m3's range).
    The e4m3 copies are stored by chunk, not by sequence position (chunk c at rows c * BLOCK_N, zero-padded), so
    every tile load is whole and aligned: TMA wants 16-byte aligned box starts, and a text chunk that starts at an
    odd token would not be.
  - P·V optionally in e4m3 too (precision "fp8"): P in [0, 1] is scaled by 448 (e4m3's largest finite value), V has
    one scale per channel and (batch, head), so both scales factor out of the sum and are applied once at the end.
    FP8 wgmma wants both operands K-major, so quantize_kv writes V transposed ((B, H, D, N), keys contiguous).
    Precision "fp8-qk" keeps P·V in bf16 on the original V.
The online softmax, the running max and the row sums stay float32, as in the bf16 kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_common import listed_blocks, load_tile, tile_source, video_program

E4M3_MAX = 448.0


# ---------------------------------------------------------------------------------------------------------------
# device code
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _round_int8(x):
    # Round half away from zero; |x| <= 127 by construction (the scale is the block's max / 127).
    return tl.where(x >= 0, tl.floor(x + 0.5), -tl.floor(-x + 0.5)).to(tl.int8)


@triton.jit
def _quant_kv(K, V, KM, VSC, K8, KS, V8T,
              skb, skh, skl, svb, svh, svl, k8b, k8h, k8l, v8b, v8h, v8d, ks_bh,
              H, N, NV, VS, TS, NVC,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PV_FP8: tl.constexpr, QK_INT8: tl.constexpr):
    """One program per (key chunk, batch*head): chunk c < NVC holds video keys VS + c*BLOCK_N.., the others text keys
    TS + (c - NVC)*BLOCK_N..; writes the chunk's smoothed e4m3 keys (rows c*BLOCK_N..) and scale, and (PV_FP8) its
    e4m3 values transposed (columns c*BLOCK_N..)."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if c < NVC:
        start = VS + c * BLOCK_N
        end = VS + NV
    else:
        start = TS + (c - NVC) * BLOCK_N
        end = TS + N - NV
    rows = start + offs_n
    ok = rows < end
    r64 = rows.to(tl.int64)
    dst = (c * BLOCK_N + offs_n).to(tl.int64)  # the chunk's slot: padded rows are written as zeros
    k = tl.load(K + b * skb + h * skh + r64[:, None] * skl + offs_d[None, :], mask=ok[:, None], other=0.0)
    km = tl.load(KM + bh * HEAD_DIM + offs_d)
    k = tl.where(ok[:, None], k.to(tl.float32) - km[None, :], 0.0)
    ks = tl.maximum(tl.max(tl.max(tl.abs(k), 1), 0), 1e-30)
    if QK_INT8:
        ks = ks / 127.0
        k8 = _round_int8(k / ks)
    else:
        ks = ks / 448.0
        k8 = (k / ks).to(tl.float8e4nv)
    tl.store(K8 + b * k8b + h * k8h + dst[:, None] * k8l + offs_d[None, :], k8)
    tl.store(KS + bh * ks_bh + c, ks)
    if PV_FP8:
        v = tl.load(V + b * svb + h * svh + r64[:, None] * svl + offs_d[None, :], mask=ok[:, None], other=0.0)
        vsc = tl.load(VSC + bh * HEAD_DIM + offs_d)
        v8 = (v.to(tl.float32) / vsc[None, :]).to(tl.float8e4nv)
        tl.store(V8T + b * v8b + h * v8h + offs_d[None, :].to(tl.int64) * v8d + dst[:, None], v8)


@triton.jit
def _load_v(desc, base, b, h, chunk, start_n, n_rows, stride, offs_n, offs_d, DESC_MODE: tl.constexpr,
            MASK_ROWS: tl.constexpr, PV_FP8: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_N, HEAD_DIM] values of one key tile: the bf16 tile at sequence position start_n (as triton_fwd), or
    with PV_FP8 the transposed e4m3 chunk read as [HEAD_DIM, BLOCK_N] (keys contiguous) and viewed transposed,
    which is the K-major operand layout FP8 wgmma needs."""
    if PV_FP8:
        col = chunk * BLOCK_N
        if DESC_MODE == 2:
            t = desc.load([b, h, 0, col])
            t = t.reshape([t.shape[2], t.shape[3]])
        else:
            t = tl.load(base + offs_d.to(tl.int64)[:, None] * stride + (col + offs_n)[None, :])
        return tl.trans(t)
    else:
        return load_tile(desc, base, b, h, start_n, n_rows, stride, offs_n, offs_d, DESC_MODE, MASK_ROWS)


@triton.jit
def _step(acc, l_i, m_i, q8, k8, v, c, cols, limit, bias_row, key_start, MASK_COLS: tl.constexpr,
          HAS_BIAS: tl.constexpr, QK_INT8: tl.constexpr, PV_FP8: tl.constexpr):
    """One online-softmax step over a key tile, in the log2 domain; c [BLOCK_M] is the row's scale times the key
    chunk's (the softmax scale and log2(e) folded in). Without a bias the scale is applied inside the exponent's
    fused multiply-add, as the bf16 kernel does. With PV_FP8 the probabilities come out of exp2 already scaled by
    448 (e4m3's largest value; log2(448) is folded into the subtracted max), and the row sums carry the same factor,
    so it cancels in acc / l_i."""
    if QK_INT8:
        qk = tl.dot(q8, tl.trans(k8), out_dtype=tl.int32).to(tl.float32)
    else:
        qk = tl.dot(q8, tl.trans(k8))
    if PV_FP8:
        shift = 8.807354922057604  # log2(448)
    else:
        shift = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_row + (cols - key_start), mask=cols < limit, other=float("-inf"))
        s = qk * c[:, None] + (bias * 1.4426950408889634)[None, :]
        m_ij = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - (m_ij - shift)[:, None])
    else:
        if MASK_COLS:
            qk = tl.where((cols < limit)[None, :], qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * c)
        p = tl.math.exp2(qk * c[:, None] - (m_ij - shift)[:, None])
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if PV_FP8:
        acc = tl.dot(p.to(tl.float8e4nv), v, acc)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_ij


@triton.jit
def sparse_video_fp8_fwd(Q, K8, V, O, DK, DV, KS, VSC, IDX, CNT, SKIP_ROWS, TB,
                          sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol,
                          idx_sh, idx_sq, cnt_sh, stb, ks_bh,
                          H, N, NV, VS, TS, NK, NVC, NC, TAIL_TILES, qk_scale,
                          BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_K: tl.constexpr,
                          HAS_TEXT: tl.constexpr, DESC_MODE: tl.constexpr, STAGES: tl.constexpr,
                          HAS_BIAS: tl.constexpr, PV_FP8: tl.constexpr, QK_INT8: tl.constexpr):
    """triton_fwd._sparse_video_fwd with e4m3 Q·K (and P·V with PV_FP8). K8 (and with PV_FP8 the transposed values)
    are stored by chunk (NC rows = chunks * BLOCK_N); V's strides (svb, svh, svl) are those of the transposed e4m3
    values with PV_FP8 (svl: the stride between channels)."""
    SUBK: tl.constexpr = BLOCK_K // BLOCK_N
    b, h, qb, row0, row_end = video_program(H, NV, BLOCK_Q, BLOCK_M)
    bh = tl.program_id(1)
    skip_rows = tl.load(SKIP_ROWS + h)
    if row_end > skip_rows:
        offs_m = row0 + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        k_base = K8 + b64 * skb + h64 * skh
        v_base = V + b64 * svb + h64 * svh
        o_base = O + b64 * sob + h64 * soh
        ks_row = KS + bh * ks_bh
        row_ok = offs_m < NV
        seq_m = (VS + offs_m).to(tl.int64)
        q = tl.load(Q + b64 * sqb + h64 * sqh + seq_m[:, None] * sql + offs_d[None, :], mask=row_ok[:, None],
                    other=0.0).to(tl.float32)
        q_scale = tl.maximum(tl.max(tl.abs(q), 1), 1e-30)
        if QK_INT8:
            q_scale = q_scale / 127.0
            q8 = _round_int8(q / q_scale[:, None])
        else:
            q_scale = q_scale / 448.0
            q8 = (q / q_scale[:, None]).to(tl.float8e4nv)
        row_scale = q_scale * qk_scale
        desc_k = tile_source(DK, k_base, NC, skl, HEAD_DIM, BLOCK_N, DESC_MODE)
        desc_v = DV
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        idx_row, cnt, n_blocks = listed_blocks(IDX, CNT, h64, qb, idx_sh, idx_sq, cnt_sh, NK, TAIL_K)
        for j in tl.range(0, n_blocks * SUBK, num_stages=STAGES):
            kb = tl.load(idx_row + j // SUBK).to(tl.int32)
            chunk = kb * SUBK + (j % SUBK)
            start_n = VS + chunk * BLOCK_N
            k = load_tile(desc_k, k_base, b, h, chunk * BLOCK_N, NC, skl, offs_n, offs_d, DESC_MODE, False)
            v = _load_v(desc_v, v_base, b, h, chunk, start_n, N, svl, offs_n, offs_d, DESC_MODE, False, PV_FP8,
                        BLOCK_N)
            c = tl.maximum(row_scale * tl.load(ks_row + chunk), 1e-30)
            acc, l_i, m_i = _step(acc, l_i, m_i, q8, k, v, c, offs_n, 0, TB, 0, False, False, QK_INT8, PV_FP8)
        if TAIL_K:
            if n_blocks < cnt:
                for t in range(0, TAIL_TILES):
                    chunk = (NK - 1) * SUBK + t
                    start_n = chunk * BLOCK_N
                    k = load_tile(desc_k, k_base, b, h, start_n, NC, skl, offs_n, offs_d, DESC_MODE, False)
                    v = _load_v(desc_v, v_base, b, h, chunk, VS + start_n, N, svl, offs_n, offs_d, DESC_MODE, True,
                                PV_FP8, BLOCK_N)
                    c = tl.maximum(row_scale * tl.load(ks_row + chunk), 1e-30)
                    acc, l_i, m_i = _step(acc, l_i, m_i, q8, k, v, c, start_n + offs_n, NV, TB, 0, True, False,
                                          QK_INT8, PV_FP8)
        if HAS_TEXT:
            text_end = TS + N - NV
            for start_n in tl.range(TS, text_end, BLOCK_N, num_stages=STAGES):
                chunk = NVC + (start_n - TS) // BLOCK_N
                cols = start_n + offs_n
                k = load_tile(desc_k, k_base, b, h, chunk * BLOCK_N, NC, skl, offs_n, offs_d, DESC_MODE, False)
                v = _load_v(desc_v, v_base, b, h, chunk, start_n, text_end, svl, offs_n, offs_d, DESC_MODE, True,
                            PV_FP8, BLOCK_N)
                c = tl.maximum(row_scale * tl.load(ks_row + chunk), 1e-30)
                # The bias is in natural-log units, as the host mask; columns past the text get -inf.
                acc, l_i, m_i = _step(acc, l_i, m_i, q8, k, v, c, cols, text_end, TB + b64 * stb, TS, True, HAS_BIAS,
                                      QK_INT8, PV_FP8)
        out = acc / l_i[:, None]
        if PV_FP8:
            out = out * tl.load(VSC + bh * HEAD_DIM + offs_d)[None, :]
        tl.store(o_base + seq_m[:, None] * sol + offs_d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None])


# ---------------------------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------------------------
def quantize_kv(kh: torch.Tensor, vh: torch.Tensor, *, video_tokens: int, video_start: int, text_start: int,
                block_n: int, pv_fp8: bool, qk_int8: bool):
    """(k8, k_scales, v_for_the_kernel, v_scales, video_chunks): smoothed e4m3 keys (B, H, chunks * block_n, D) with
    one scale per key chunk ([B*H, chunks] float32), and the values (the bf16 ones, or with pv_fp8 e4m3 transposed
    to (B, H, D, chunks * block_n) with one scale per channel, [B*H, D] float32). Two torch reductions (the mean key, the values' range per channel) and one
    launch; no host sync."""
    B, H, N, D = kh.shape
    dev = kh.device
    nvc = triton.cdiv(video_tokens, block_n)
    chunks = nvc + triton.cdiv(N - video_tokens, block_n)
    k_mean = torch.mean(kh, dim=2, dtype=torch.float32).contiguous()  # [B, H, D]
    k8 = torch.empty(B, H, chunks * block_n, D, dtype=torch.int8 if qk_int8 else torch.float8_e4m3fn, device=dev)
    ks = torch.empty(B * H, chunks, dtype=torch.float32, device=dev)
    if pv_fp8:
        lo, hi = torch.aminmax(vh, dim=2)
        v_scale = (torch.maximum(lo.float().abs(), hi.float().abs()).clamp_min(1e-30) / E4M3_MAX).contiguous()
        v8t = torch.empty(B, H, D, chunks * block_n, dtype=torch.float8_e4m3fn, device=dev)
    else:
        v_scale, v8t = k_mean, vh  # placeholders the kernel does not read
    _quant_kv[(chunks, B * H)](
        kh, vh, k_mean, v_scale, k8, ks, v8t,
        kh.stride(0), kh.stride(1), kh.stride(2), vh.stride(0), vh.stride(1), vh.stride(2),
        k8.stride(0), k8.stride(1), k8.stride(2), v8t.stride(0), v8t.stride(1), v8t.stride(2), ks.stride(0),
        H, N, video_tokens, video_start, text_start, nvc,
        HEAD_DIM=D, BLOCK_N=block_n, PV_FP8=pv_fp8, QK_INT8=qk_int8, num_warps=4)
    return k8, ks, (v8t if pv_fp8 else vh), (v_scale if pv_fp8 else None), nvc


def v_descriptor(v: torch.Tensor, block_n: int, pv_fp8: bool, mode: int):
    """The host TMA descriptor of the values the fp8 kernel reads (mode 2), else the tensor."""
    if mode != 2:
        return v
    from triton.tools.tensor_descriptor import TensorDescriptor
    D = v.shape[2] if pv_fp8 else v.shape[-1]
    block = [1, 1, D, block_n] if pv_fp8 else [1, 1, block_n, D]
    return TensorDescriptor(v, list(v.shape), list(v.stride()), block)
