"""Block-sparse flash-attention forward in Triton, reading a LayerSkipList.

Same function as kernels/reference.py `sparse_attention_reference` (video rows: listed video key blocks + all text
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
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ..masks.skiplists import LayerSkipList
from .layouts import from_bhld, to_bhld, token_spans
from .text_bias import as_text_bias

LOG2E = 1.4426950408889634


class TritonUnsupported(ValueError):
    """The call is valid but outside what the Triton kernel handles (dtype, head_dim, mask block size):
    callers fall back to another path; plain ValueErrors mean bad input."""


# ---------------------------------------------------------------------------------------------------------------
# device code
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _kv_desc(base, n_rows, stride_row, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    # One descriptor per (batch, head) base: TMA zero-fills rows past n_rows, so tails need no load mask.
    return tl.make_tensor_descriptor(base, shape=[n_rows, HEAD_DIM], strides=[stride_row, 1],
                                     block_shape=[BLOCK_N, HEAD_DIM])


@triton.jit
def _tile_source(DESC, base, n_rows, stride_row, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                 DESC_MODE: tl.constexpr):
    """What _load_tile reads one (batch, head)'s K or V through: the host descriptor (mode 2), an in-kernel
    descriptor of this (batch, head) (mode 1), or the plain base pointer (mode 0)."""
    if DESC_MODE == 2:
        return DESC
    elif DESC_MODE == 1:
        return _kv_desc(base, n_rows, stride_row, HEAD_DIM, BLOCK_N)
    else:
        return base


@triton.jit
def _load_tile(desc, base, b, h, start_n, n_rows, stride_row, offs_n, offs_d, DESC_MODE: tl.constexpr,
               MASK_ROWS: tl.constexpr):
    """[BLOCK_N, HEAD_DIM] rows start_n.. of one (batch, head). DESC_MODE 0: pointer loads; 1: in-kernel TMA
    descriptor of this (batch, head); 2: host TMA descriptor over the whole (B, H, L, D) tensor (zero fill past
    L, so tails need no load mask)."""
    if DESC_MODE == 2:
        t = desc.load([b, h, start_n, 0])
        t = t.reshape([t.shape[2], t.shape[3]])
    elif DESC_MODE == 1:
        t = desc.load([start_n, 0])
    else:
        rows = start_n + offs_n
        ptrs = base + rows.to(tl.int64)[:, None] * stride_row + offs_d[None, :]
        if MASK_ROWS:
            t = tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
        else:
            t = tl.load(ptrs)
    return t


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
        k = _load_tile(desc_k, k_base, b, h, start_n, key_end, skl, offs_n, offs_d, DESC_MODE, False)
        v = _load_tile(desc_v, v_base, b, h, start_n, key_end, svl, offs_n, offs_d, DESC_MODE, False)
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, qk_scale, offs_n, 0, False)
    start_n = key_start + n_full * BLOCK_N
    if start_n < key_end:
        k = _load_tile(desc_k, k_base, b, h, start_n, key_end, skl, offs_n, offs_d, DESC_MODE, True)
        v = _load_tile(desc_v, v_base, b, h, start_n, key_end, svl, offs_n, offs_d, DESC_MODE, True)
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, qk_scale, start_n + offs_n, key_end, True)
    return acc, l_i, m_i


@triton.jit
def _biased_scores(q, k, bias_row, cols, key_start, key_end, qk_scale):
    """Log2-domain scores of one text-key tile with the text bias (natural-log units, as the host mask) added;
    columns past key_end get -inf through the bias load. Shared by the attention and statistics kernels."""
    bias = tl.load(bias_row + (cols - key_start), mask=cols < key_end, other=float("-inf"))
    return tl.dot(q, tl.trans(k)) * qk_scale + (bias * 1.4426950408889634)[None, :]


@triton.jit
def _biased_keys(acc, l_i, m_i, q, desc_k, desc_v, k_base, v_base, b, h, key_start, key_end, skl, svl, qk_scale,
                 bias_row, offs_n, offs_d, BLOCK_N: tl.constexpr, DESC_MODE: tl.constexpr, STAGES: tl.constexpr):
    """Keys [key_start, key_end) (the text keys) with bias_row[j - key_start] added to their scores (natural-log
    units, as the host mask). Every tile is masked: text is a few hundred keys, so this costs nothing measurable.
    Columns past key_end get -inf through the bias load; the caller guarantees an earlier finite score per row
    (it visits the video keys first), so a fully padded tile cannot make exp2(-inf - -inf)."""
    for start_n in tl.range(key_start, key_end, BLOCK_N, num_stages=STAGES):
        cols = start_n + offs_n
        k = _load_tile(desc_k, k_base, b, h, start_n, key_end, skl, offs_n, offs_d, DESC_MODE, True)
        v = _load_tile(desc_v, v_base, b, h, start_n, key_end, svl, offs_n, offs_d, DESC_MODE, True)
        s = _biased_scores(q, k, bias_row, cols, key_start, key_end, qk_scale)
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
                      DESC_MODE: tl.constexpr, STAGES: tl.constexpr, WARP_SPEC: tl.constexpr = False,
                      HAS_BIAS: tl.constexpr = False):
    SUBQ: tl.constexpr = BLOCK_Q // BLOCK_M
    SUBK: tl.constexpr = BLOCK_K // BLOCK_N
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    qb = pid_m // SUBQ
    row0 = pid_m * BLOCK_M
    row_end = tl.minimum(row0 + BLOCK_M, NV)
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
        desc_k = _tile_source(DK, k_base, N, skl, HEAD_DIM, BLOCK_N, DESC_MODE)
        desc_v = _tile_source(DV, v_base, N, svl, HEAD_DIM, BLOCK_N, DESC_MODE)
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        idx_row = IDX + h64 * idx_sh + qb * idx_sq
        cnt = tl.load(CNT + h64 * cnt_sh + qb)
        n_blocks = cnt
        if TAIL_K:
            last = tl.load(idx_row + cnt - 1).to(tl.int32)
            n_blocks = cnt - (last == NK - 1).to(tl.int32)
        # Main loop: listed blocks that lie wholly inside the video part, each as SUBK kernel tiles.
        for j in tl.range(0, n_blocks * SUBK, num_stages=STAGES, warp_specialize=WARP_SPEC):
            kb = tl.load(idx_row + j // SUBK).to(tl.int32)
            start_n = VS + kb * BLOCK_K + (j % SUBK) * BLOCK_N
            k = _load_tile(desc_k, k_base, b, h, start_n, N, skl, offs_n, offs_d, DESC_MODE, False)
            v = _load_tile(desc_v, v_base, b, h, start_n, N, svl, offs_n, offs_d, DESC_MODE, False)
            acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, qk_scale, offs_n, 0, False)
        if TAIL_K:
            if n_blocks < cnt:
                # The partial last video block: video columns at or past NV are text (handled below) or past the
                # end of the sequence.
                for t in range(0, TAIL_TILES):
                    start_n = (NK - 1) * BLOCK_K + t * BLOCK_N
                    k = _load_tile(desc_k, k_base, b, h, VS + start_n, N, skl, offs_n, offs_d, DESC_MODE, True)
                    v = _load_tile(desc_v, v_base, b, h, VS + start_n, N, svl, offs_n, offs_d, DESC_MODE, True)
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
        desc_k = _tile_source(DK, k_base, N, skl, HEAD_DIM, BLOCK_N, DESC_MODE)
        desc_v = _tile_source(DV, v_base, N, svl, HEAD_DIM, BLOCK_N, DESC_MODE)
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
# tile configuration
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int
    stages: int
    tma: int  # K/V loads: 0 pointer loads, 1 in-kernel TMA descriptors, 2 host TMA descriptors (4-D, any strides)
    warp_spec: bool = False

    def as_dict(self) -> dict:
        return {"block_m": self.block_m, "block_n": self.block_n, "num_warps": self.num_warps,
                "stages": self.stages, "tma": self.tma, "warp_spec": self.warp_spec}


# Hopper table (head_dim -> tile), from the sweeps of bench/bench_kernels.py on the lent H100 (docs/BENCHMARKS.md,
# "## Kernels"; 32,760 tokens, 40 heads, bf16): 128x128 tiles, 8 warps (two consumer warpgroups of 64 rows),
# 3 stages, K/V through TMA: 559-564 TFLOP/s dense. Pointer loads: 474; 128x64/4 warps: 406; 64x128/4 warps: 476;
# 2 stages: 454; 4 stages: out of shared memory; warp specialisation: within noise. Host and in-kernel descriptors
# time the same; host ones need no scratch allocator, so they are the default. head_dim 64 was not measured.
_HOPPER = {128: TileConfig(128, 128, 8, 3, 2), 64: TileConfig(128, 128, 8, 3, 2)}
# Ampere / Ada: no TMA; the classic FA2 Triton shape.
_AMPERE = {128: TileConfig(128, 64, 4, 3, 0), 64: TileConfig(128, 64, 4, 3, 0)}
_OVERRIDE: dict = {}
# Host TMA descriptors are encoded on the host at every launch, which costs about 0.15 ms of host time: more than a
# small call's whole attention. Below this many (query, key) pairs per call the kernel builds its descriptors on the
# GPU instead (mode 1). H100, 8,192 tokens, B 2, H 4, D 64, blocks of 64 (bench/tiny_shape_timing.py --tma,
# docs/BENCHMARKS.md): host descriptors 0.352 / 0.168 / 0.160 ms at density 1.0 / 0.4 / 0.2 (a floor: the host),
# pointers 0.379 / 0.245 / 0.140 at 1.0 / 0.6 / 0.3, in-kernel descriptors 0.330 / 0.225 / 0.129. At Wan's sizes
# (>= 1e10 pairs per call) a call takes milliseconds and host and in-kernel descriptors time the same.
_TMA_MIN_PAIRS = 1 << 32


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two dividing n, at most cap."""
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def set_tile_override(cfg: Optional[TileConfig]):
    """Force a tile configuration (benchmarks sweep variants through this); None restores the table."""
    _OVERRIDE.clear()
    if cfg is not None:
        _OVERRIDE["cfg"] = cfg


def pick_tiles(head_dim: int, block_q: int, block_k: int, device: torch.device) -> TileConfig:
    """Kernel tile for a mask block: the tile must sit inside one mask block (it reads one skip-list row), so
    BLOCK_M divides block_q and BLOCK_N divides block_k; tl.dot needs >= 16 on each side. Memoised: it runs at
    every call, and reading the device's properties each time was a measurable share of a small call's host time."""
    base = _OVERRIDE.get("cfg")
    interpret = _interpreting()
    key = (head_dim, block_q, block_k, str(device), interpret, base)
    hit = _PICKED.get(key)
    if hit is not None:
        return hit
    cfg = _pick_tiles(head_dim, block_q, block_k, device, base, interpret)
    _PICKED[key] = cfg
    return cfg


_PICKED: dict = {}


def _pick_tiles(head_dim, block_q, block_k, device, base, interpret) -> TileConfig:
    forced = base is not None  # an override (set_tile_override) is taken as given, warps included
    if not forced:
        cc = (0, 0) if interpret or device.type != "cuda" else torch.cuda.get_device_capability(device)
        table = _HOPPER if cc[0] == 9 else _AMPERE
        base = table.get(head_dim, TileConfig(64, 64, 4, 2, 0))
    bm = _pow2_divisor(block_q, base.block_m)
    bn = _pow2_divisor(block_k, base.block_n)
    if bm < 16 or bn < 16:
        raise TritonUnsupported(f"mask blocks {block_q}x{block_k} need a power-of-two divisor >= 16 for the "
                                "Triton kernel")
    if interpret:  # host descriptors run in the interpreter (tests force them); in-kernel ones need a GPU
        tma = 2 if base.tma == 2 else 0
    else:
        hopper = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
        tma = int(base.tma) if hopper else 0
    warps = base.num_warps if bm * bn >= 128 * 64 or forced else 4
    return TileConfig(bm, bn, warps, base.stages, tma, base.warp_spec and not interpret)


def _interpreting() -> bool:
    from triton import knobs
    return bool(knobs.runtime.interpret)


_ALLOCATOR_SET = {"done": False}


def _ensure_allocator():
    # In-kernel tensor descriptors need global scratch for the TMA descriptors; Triton asks this allocator.
    if not _ALLOCATOR_SET["done"]:
        def alloc(size: int, alignment: int, stream):
            return torch.empty(size, dtype=torch.int8, device="cuda")
        triton.set_allocator(alloc)
        _ALLOCATOR_SET["done"] = True


# ---------------------------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _RepPrep:
    heads: torch.Tensor  # [R] int32 head index of each repetitive head
    rows: torch.Tensor  # [R, F*K] int32 anchor row indices
    src: torch.Tensor  # [R, F*T] int64 index into the anchor rows
    covered: int  # F*T rows that the broadcast writes


def _prepare_repetition(skip: LayerSkipList, device) -> Optional[_RepPrep]:
    """Anchor-row tables of a layer; cached on the skip-list object (built once per bucket, not per call).
    Reading head_slot syncs once when the plan lives on the GPU; that happens when a bucket is first used."""
    rep = skip.repetition
    if rep is None:
        return None
    cache = getattr(skip, "_triton_rep", None)
    if cache is not None and cache[0] == str(device):
        return cache[1]
    slots = rep.head_slot.cpu()
    heads = [h for h in range(slots.numel()) if int(slots[h]) >= 0]
    if not heads:
        prep = None
    else:
        T = rep.frame_tokens
        frames = skip.geometry.num_tokens // T
        sl = torch.tensor([int(slots[h]) for h in heads], dtype=torch.long)
        anchors = rep.anchors.cpu()[sl]  # [R, K]
        Kn = anchors.shape[1]
        base = torch.arange(frames)[:, None] * T
        rows = (base[None] + anchors[:, None, :]).reshape(len(heads), frames * Kn)
        src = (torch.arange(frames)[:, None] * Kn)[None] + rep.row_anchor.cpu()[sl][:, None, :]
        src = src.reshape(len(heads), frames * T)
        prep = _RepPrep(torch.tensor(heads, dtype=torch.int32, device=device), rows.to(torch.int32).to(device),
                        src.to(device), frames * T)
    skip._triton_rep = (str(device), prep)
    return prep


def _skip_rows(skip: LayerSkipList, rep: Optional[_RepPrep], H: int, device) -> torch.Tensor:
    """[H] int32: video rows per head that the sparse launch leaves to the anchor broadcast (0 for most heads).
    Cached on the skip-list object like the repetition tables: a fresh tensor per call was a kernel launch per
    call, and at the tiny model's size the host's launch work, not the GPU, bounds a call."""
    cache = getattr(skip, "_triton_skip_rows", None)
    if cache is not None and cache[0] == str(device):
        return cache[1]
    rows = torch.zeros(H, dtype=torch.int32, device=device)  # built on the device: a host copy would sync
    if rep is not None:
        rows[rep.heads.long()] = rep.covered
    skip._triton_skip_rows = (str(device), rows)
    return rows


def _tma_ok(t: torch.Tensor) -> bool:
    # TMA wants a 16-byte aligned base and 16-byte multiples for every stride but the last.
    return t.data_ptr() % 16 == 0 and all((st * t.element_size()) % 16 == 0 for st in t.stride()[:-1])


def _descs(kh: torch.Tensor, vh: torch.Tensor, block_n: int, mode: int):
    """Host TMA descriptors over the (B, H, L, D) views (any strides: both layouts), or the tensors themselves as
    placeholders when the kernel does not read descriptors."""
    if mode != 2:
        return kh, vh
    from triton.tools.tensor_descriptor import TensorDescriptor
    D = kh.shape[-1]
    return tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_n, D]) for t in (kh, vh))


def _bias_arg(text_bias: Optional[torch.Tensor], batch: int, text_tokens: int, device):
    """(float32 (Bb, T) tensor with a unit last stride, batch stride) for the kernels, or (None, 0). A bias shared
    by the batch gets stride 0, so no (B, T) copy is made. Shape checks only: no host sync."""
    tb = as_text_bias(text_bias, batch, text_tokens)
    if tb is None:
        return None, 0
    if tb.device != device:
        raise ValueError(f"text_bias is on {tb.device}, q on {device}: pass the bias on q's device")
    if tb.stride(-1) != 1:
        tb = tb.contiguous()
    return tb, (0 if tb.shape[0] == 1 else tb.stride(0))


def sparse_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, skip: LayerSkipList, *,
                            layout: str = "bhld", heads: Optional[int] = None, scale: Optional[float] = None,
                            skip_heads: Optional[torch.Tensor] = None,
                            out: Optional[torch.Tensor] = None,
                            text_bias: Optional[torch.Tensor] = None, video_start: int = 0) -> torch.Tensor:
    """Triton block-sparse attention; same contract as sparse_attention_reference.

    skip_heads: optional [H] bool on q's device; heads marked True are left unwritten here (the caller fills
    them, e.g. from a dense kernel). out: optional result buffer in the call's layout and q's shape; by default
    the output has q's memory order (a (B, L, H*D) call gets (B, L, H*D) back without a copy).
    text_bias: (T,), (1, T) or (B, T) additive bias on the text keys' scores (kernels/text_bias.py).
    video_start: 0 (text after the video) or the text token count (text first; kernels/layouts.py token_spans)."""
    qh, kh, vh = (to_bhld(t, layout, heads) for t in (q, k, v))
    B, H, N, D = qh.shape
    g = skip.geometry
    Nv = g.num_tokens
    if N < Nv or kh.shape[2] != N or vh.shape[2] != N:
        raise ValueError(f"sequence of {N} tokens (keys {kh.shape[2]}) does not cover the {Nv} masked tokens")
    vs, ts, Nt = token_spans(N, Nv, video_start)
    if skip.num_heads != H:
        raise ValueError(f"skip list has {skip.num_heads} heads, the call has {H}")
    if D not in (16, 32, 64, 128) or kh.shape[-1] != D or vh.shape[-1] != D:
        raise TritonUnsupported(f"head_dim {D} is not supported by the Triton kernel (16, 32, 64 or 128)")
    if qh.dtype not in (torch.float16, torch.bfloat16) or kh.dtype != qh.dtype or vh.dtype != qh.dtype:
        raise TritonUnsupported(f"the Triton kernel takes float16 or bfloat16 q, k, v, got "
                                f"{qh.dtype}/{kh.dtype}/{vh.dtype}")
    qh, kh, vh = (t if t.stride(-1) == 1 else t.contiguous() for t in (qh, kh, vh))
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dev = qh.device
    tb, stb = _bias_arg(text_bias, B, Nt, dev)
    cfg = pick_tiles(D, g.block_q, g.block_k, dev)
    mode = cfg.tma if all(_tma_ok(t) for t in (kh, vh)) else 0
    if mode == 2 and "cfg" not in _OVERRIDE and B * H * Nv * N < _TMA_MIN_PAIRS and not _interpreting():
        mode = 1
    if mode == 1:
        _ensure_allocator()
    dk, dv = _descs(kh, vh, cfg.block_n, mode)

    if out is None:
        out = torch.empty_like(qh)  # keeps q's memory order when q is a dense permutation (the "bld" view)
    else:
        if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
            raise ValueError(f"out must match q: {tuple(q.shape)} {q.dtype} on {q.device}, got "
                             f"{tuple(out.shape)} {out.dtype} on {out.device}")
        out = to_bhld(out, layout, heads)
        if out.stride(-1) != 1:
            raise ValueError("out must have a unit stride along head_dim")
    rep = _prepare_repetition(skip, dev)
    skip_rows = _skip_rows(skip, rep, H, dev)
    if skip_heads is not None:
        skip_rows = torch.where(skip_heads.to(dev), torch.full_like(skip_rows, N + 1), skip_rows)

    idx, cnt = skip.kv_indices, skip.kv_counts
    if idx.device != dev:
        idx, cnt = idx.to(dev), cnt.to(dev)
    if cnt.stride(-1) != 1:
        cnt = cnt.contiguous()
    if idx.stride(-1) != 1:
        idx = idx.contiguous()
    qk_scale = scale * LOG2E
    tail_k = Nv % g.block_k != 0
    tail_tiles = triton.cdiv(Nv - (g.nk - 1) * g.block_k, cfg.block_n)
    grid = (g.nq * (g.block_q // cfg.block_m), B * H)
    tb_ptr = skip_rows if tb is None else tb  # never read without HAS_BIAS
    _sparse_video_fwd[grid](
        qh, kh, vh, out, dk, dv, idx, cnt, skip_rows, tb_ptr,
        qh.stride(0), qh.stride(1), qh.stride(2), kh.stride(0), kh.stride(1), kh.stride(2),
        vh.stride(0), vh.stride(1), vh.stride(2), out.stride(0), out.stride(1), out.stride(2),
        idx.stride(0), idx.stride(1), cnt.stride(0), stb,
        H, N, Nv, vs, ts, g.nk, tail_tiles, qk_scale,
        BLOCK_Q=g.block_q, BLOCK_K=g.block_k, HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        TAIL_K=tail_k, HAS_TEXT=Nt > 0, DESC_MODE=mode, STAGES=cfg.stages, WARP_SPEC=cfg.warp_spec,
        HAS_BIAS=tb is not None, num_warps=cfg.num_warps)
    dense_cfg = pick_tiles(D, 128, 128, dev)
    dm = dense_cfg.block_m
    if Nt or rep is not None:
        ddk, ddv = (dk, dv) if dense_cfg.block_n == cfg.block_n else _descs(kh, vh, dense_cfg.block_n, mode)
    if Nt:
        _dense_rows_fwd[(triton.cdiv(Nt, dm), B * H)](
            qh, kh, vh, out, ddk, ddv, skip_rows, skip_rows, skip_rows, tb_ptr,
            qh.stride(0), qh.stride(1), qh.stride(2), kh.stride(0), kh.stride(1), kh.stride(2),
            vh.stride(0), vh.stride(1), vh.stride(2), out.stride(0), out.stride(1), out.stride(2),
            0, stb, H, 1, N, Nv, vs, ts, ts, Nt, qk_scale,
            HEAD_DIM=D, BLOCK_M=dm, BLOCK_N=dense_cfg.block_n, GATHER=False, DESC_MODE=mode,
            STAGES=dense_cfg.stages, HAS_BIAS=tb is not None, num_warps=dense_cfg.num_warps)
    if rep is not None:
        R, FK = rep.rows.shape
        a_out = torch.empty(B, R, FK, D, dtype=qh.dtype, device=dev)
        _dense_rows_fwd[(triton.cdiv(FK, dm), B * R)](
            qh, kh, vh, a_out, ddk, ddv, rep.rows, rep.heads, skip_rows, tb_ptr,
            qh.stride(0), qh.stride(1), qh.stride(2), kh.stride(0), kh.stride(1), kh.stride(2),
            vh.stride(0), vh.stride(1), vh.stride(2), a_out.stride(1), 0, a_out.stride(2),
            rep.rows.stride(0), stb, H, R, N, Nv, vs, ts, 0, FK, qk_scale,
            HEAD_DIM=D, BLOCK_M=dm, BLOCK_N=dense_cfg.block_n, GATHER=True, DESC_MODE=mode,
            STAGES=dense_cfg.stages, HAS_BIAS=tb is not None, num_warps=dense_cfg.num_warps)
        # Broadcast: each head's F*T video rows take their anchor's output (gather on the GPU, no host sync).
        # Heads in skip_heads get this too; the caller overwrites them afterwards.
        bcast = torch.gather(a_out, 2, rep.src[None, :, :, None].expand(B, R, rep.covered, D))
        out[:, rep.heads.long(), vs:vs + rep.covered] = bcast
    return from_bhld(out, layout)
