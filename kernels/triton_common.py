"""Triton pieces shared by the attention and block-energy kernels: K/V tile loads (pointers or TMA descriptors),
the video-row program's position and skip-list row (bf16 and 8-bit kernels), biased text-key scores, the tile table per GPU architecture, and the host-side argument helpers.

Public so that each kernel module imports what it uses from here instead of from another kernel's private names.
Imported only by the Triton modules (which the dispatchers import lazily), never by the package itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .support import KernelUnsupported
from .text_bias import as_text_bias

LOG2E = 1.4426950408889634


@triton.jit
def kv_desc(base, n_rows, stride_row, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    # One descriptor per (batch, head) base: TMA zero-fills rows past n_rows, so tails need no load mask.
    return tl.make_tensor_descriptor(base, shape=[n_rows, HEAD_DIM], strides=[stride_row, 1],
                                     block_shape=[BLOCK_N, HEAD_DIM])


@triton.jit
def tile_source(DESC, base, n_rows, stride_row, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                 DESC_MODE: tl.constexpr):
    """What load_tile reads one (batch, head)'s K or V through: the host descriptor (mode 2), an in-kernel
    descriptor of this (batch, head) (mode 1), or the plain base pointer (mode 0)."""
    if DESC_MODE == 2:
        return DESC
    elif DESC_MODE == 1:
        return kv_desc(base, n_rows, stride_row, HEAD_DIM, BLOCK_N)
    else:
        return base


@triton.jit
def load_tile(desc, base, b, h, start_n, n_rows, stride_row, offs_n, offs_d, DESC_MODE: tl.constexpr,
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
def video_program(H, NV, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr):
    """Where a video-row program of the sparse attention works: grid (query tiles, batch * heads), BLOCK_Q // BLOCK_M
    tiles per mask row. Returns batch, head, mask row, first video row and the end of its rows."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    row0 = pid_m * BLOCK_M
    return bh // H, bh % H, pid_m // (BLOCK_Q // BLOCK_M), row0, tl.minimum(row0 + BLOCK_M, NV)


@triton.jit
def listed_blocks(IDX, CNT, h64, qb, idx_sh, idx_sq, cnt_sh, NK, TAIL_K: tl.constexpr):
    """One mask row of a skip list: its index row, the count of listed key blocks, and how many of them the
    unmasked main loop takes. Indices ascend within a row, so with TAIL_K (the last video key block is partial) a
    listed last block is the row's last entry, and is left to the masked tail loop."""
    idx_row = IDX + h64 * idx_sh + qb * idx_sq
    cnt = tl.load(CNT + h64 * cnt_sh + qb)
    n_blocks = cnt
    if TAIL_K:
        last = tl.load(idx_row + cnt - 1).to(tl.int32)
        n_blocks = cnt - (last == NK - 1).to(tl.int32)
    return idx_row, cnt, n_blocks


@triton.jit
def biased_scores(q, k, bias_row, cols, key_start, key_end, qk_scale):
    """Log2-domain scores of one text-key tile with the text bias (natural-log units, as the host mask) added;
    columns past key_end get -inf through the bias load. Shared by the attention and statistics kernels."""
    bias = tl.load(bias_row + (cols - key_start), mask=cols < key_end, other=float("-inf"))
    return tl.dot(q, tl.trans(k)) * qk_scale + (bias * 1.4426950408889634)[None, :]




@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int
    stages: int
    tma: int  # K/V loads: 0 pointer loads, 1 in-kernel TMA descriptors, 2 host TMA descriptors (4-D, any strides)

    def as_dict(self) -> dict:
        return {"block_m": self.block_m, "block_n": self.block_n, "num_warps": self.num_warps,
                "stages": self.stages, "tma": self.tma}


# Hopper table (head_dim -> tile), from the sweeps of bench/bench_kernels.py on an H100 (docs/BENCHMARKS.md,
# "## Kernels"; 32,760 tokens, 40 heads, bf16): 128x128 tiles, 8 warps (two consumer warpgroups of 64 rows),
# 3 stages, K/V through TMA: 559-564 TFLOP/s dense. Pointer loads: 474; 128x64/4 warps: 406; 64x128/4 warps: 476;
# 2 stages: 454; 4 stages: out of shared memory; warp specialisation: within noise. Host and in-kernel descriptors
# time the same; host ones need no scratch allocator, so they are the default. head_dim 64 (LTX-Video's 32 heads x
# 64, 32,760 tokens, B 2, bf16; H200, bench/precision_kernels.py, docs/BENCHMARKS.md "FP8 and head_dim 64"): 128x128
# tiles with ONE warpgroup (4 warps), 3 stages, TMA: 1.08x / 1.06x cuDNN's TFLOP/s at density 1.0 / 0.38; the
# head_dim 128 tile (8 warps) 0.88x; 128x64 / 4 warps 1.00x / 0.99x; 2 stages 0.76x.
_HOPPER = {128: TileConfig(128, 128, 8, 3, 2), 64: TileConfig(128, 128, 4, 3, 2)}
# Ampere / Ada: no TMA; the classic FA2 Triton shape.
_AMPERE = {128: TileConfig(128, 64, 4, 3, 0), 64: TileConfig(128, 64, 4, 3, 0)}


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two dividing n, at most cap."""
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def pick_tiles(head_dim: int, block_q: int, block_k: int, device: torch.device,
               base: Optional[TileConfig] = None) -> TileConfig:
    """Kernel tile for a mask block: the tile must sit inside one mask block (it reads one skip-list row), so
    BLOCK_M divides block_q and BLOCK_N divides block_k; tl.dot needs >= 16 on each side. `base` (benchmarks
    sweep variants through it) is taken as given, warps included, else the per-architecture table decides.
    Memoised: it runs at every call, and reading the device's properties each time was a measurable share of a
    small call's host time."""
    interpret = interpreting()
    key = (head_dim, block_q, block_k, str(device), interpret, base)
    hit = _PICKED.get(key)
    if hit is not None:
        return hit
    cfg = _pick_tiles(head_dim, block_q, block_k, device, base, interpret)
    _PICKED[key] = cfg
    return cfg


_PICKED: dict = {}


def _pick_tiles(head_dim, block_q, block_k, device, base, interpret) -> TileConfig:
    forced = base is not None  # a tile passed in is taken as given, warps included
    if not forced:
        cc = (0, 0) if interpret or device.type != "cuda" else torch.cuda.get_device_capability(device)
        table = _HOPPER if cc[0] == 9 else _AMPERE
        base = table.get(head_dim, TileConfig(64, 64, 4, 2, 0))
    bm = _pow2_divisor(block_q, base.block_m)
    bn = _pow2_divisor(block_k, base.block_n)
    if bm < 16 or bn < 16:
        raise KernelUnsupported(f"mask blocks {block_q}x{block_k} need a power-of-two divisor >= 16 for the "
                                "Triton kernel")
    if interpret:  # host descriptors run in the interpreter (tests force them); in-kernel ones need a GPU
        tma = 2 if base.tma == 2 else 0
    else:
        hopper = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
        tma = int(base.tma) if hopper else 0
    warps = base.num_warps if bm * bn >= 128 * 64 or forced else 4
    return TileConfig(bm, bn, warps, base.stages, tma)


def interpreting() -> bool:
    from triton import knobs
    return bool(knobs.runtime.interpret)


_ALLOCATOR_SET = {"done": False}


def ensure_allocator():
    # In-kernel tensor descriptors need global scratch for the TMA descriptors; Triton asks this allocator.
    if not _ALLOCATOR_SET["done"]:
        def alloc(size: int, alignment: int, stream):
            return torch.empty(size, dtype=torch.int8, device="cuda")
        triton.set_allocator(alloc)
        _ALLOCATOR_SET["done"] = True


def tma_ok(t: torch.Tensor) -> bool:
    # TMA wants a 16-byte aligned base and 16-byte multiples for every stride but the last.
    return t.data_ptr() % 16 == 0 and all((st * t.element_size()) % 16 == 0 for st in t.stride()[:-1])


def host_descs(kh: torch.Tensor, vh: torch.Tensor, block_n: int, mode: int):
    """Host TMA descriptors over the (B, H, L, D) views (any strides: both layouts), or the tensors themselves as
    placeholders when the kernel does not read descriptors."""
    if mode != 2:
        return kh, vh
    from triton.tools.tensor_descriptor import TensorDescriptor
    D = kh.shape[-1]
    return tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_n, D]) for t in (kh, vh))


def bias_arg(text_bias: Optional[torch.Tensor], batch: int, text_tokens: int, device):
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
