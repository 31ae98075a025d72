"""Size limits of a mask bundle, shared by the loader (which refuses files beyond them before allocating anything)
and by calibration (which checks them before sampling starts, so it never makes a bundle the loader refuses).

Derived from real sizes: Wan 2.1 14B at 720p is 40 layers x 40 heads, 75,600 video tokens = 591 x 591 blocks of 128
(43.7 KB per packed mask), 80,000 (step, layer, head) entries at 50 steps (3.5 GB if every entry were distinct);
HunyuanVideo 720p x 129 frames is 928 blocks a side. The caps leave several times that room.

Cost of loading (the loader's promise, docs/ARCHITECTURE.md): reading is linear in the file; decoding produces
D = distinct masks x nq x ceil(nk / 8) bytes, and a file may declare at most D <= max(DECODE_FLOOR_BYTES,
DECODE_RATIO x its compressed mask payload), never more than MAX_DECODED_BYTES. The writer pads its payload (zlib
level 0 for the most compressible masks) when real masks compress better than that, so every bundle it writes
loads. A crafted file therefore costs at most DECODE_RATIO times its own size (plus a 64 MiB floor) in memory and
decode time, instead of zlib's 1032x.
"""

from __future__ import annotations

from .errors import BundleError
from .packing import row_bytes

MAX_HEADER_BYTES = 32 << 20  # the JSON header; the per-entry density table dominates (~8 bytes per entry)
MAX_LAYERS = 256
MAX_HEADS = 256
MAX_HEAD_DIM = 1024
MAX_DIM = 1 << 16
MAX_BLOCK_SIZE = 1024  # tokens per block (the node offers 16-256)
MAX_BLOCKS = 4096  # blocks per side (real: 591 for Wan 720p, 928 for HunyuanVideo 720p x 129 frames)
# Heads x query blocks x key blocks of one layer: bounds the per-layer skip-list tables built at sampling time.
MAX_LAYER_BLOCKS = 1 << 28
# Calibrated sigmas: the node allows 1000 steps, and second-order samplers (heun, dpm_2, ...) evaluate the model at
# a second sigma per step; buckets <= calibrated sigmas.
MAX_STEPS = 4096
SIGMAS_PER_STEP = 2
MAX_ENTRIES = 1 << 20  # (bucket, layer, head) entries; Wan 14B at 50 steps has 80,000
MAX_ANCHORS = 256  # repetition anchors per frame
MAX_FRAME_TOKENS = 1 << 20
MAX_GRID_SIDE = 1 << 16  # frames, height or width in tokens
MAX_TEXT_TOKENS = 1 << 20
MAX_PATCH = 64  # latent voxels per token, per axis; also the VAE stride per axis
MAX_SIGMA = 1e6
MAX_DECODED_BYTES = 8 << 30
DECODE_FLOOR_BYTES = 64 << 20
DECODE_RATIO = 16
# zlib cannot expand a stream by more than 1032x (deflate's longest match, 258 bytes, costs at least 2 bits).
ZLIB_MAX_RATIO = 1032
ZLIB_MIN_STREAM = 8  # 2-byte header, an empty final block, 4-byte Adler-32


def zlib_bound(n: int) -> int:
    """Largest zlib stream of n bytes of input (zlib's compressBound): what level 0 (stored) never exceeds."""
    return n + (n >> 12) + (n >> 14) + (n >> 25) + 13


def decode_budget(payload_bytes: int) -> int:
    """Most decoded mask bytes a compressed payload of this size may declare."""
    return min(MAX_DECODED_BYTES, max(DECODE_FLOOR_BYTES, DECODE_RATIO * int(payload_bytes)))


def mask_bytes(nq: int, nk: int) -> int:
    return nq * row_bytes(nk)


def estimated_file_bytes(num_layers: int, num_heads: int, nq: int, nk: int, steps: int) -> int:
    """Disk space to ask for before a calibration: metadata and tables per entry, plus the masks at the ratio the
    writer pads to (real masks compress about that well: docs/BENCHMARKS.md, bundle size), plus a MiB."""
    entries = SIGMAS_PER_STEP * steps * num_layers * num_heads
    return entries * 24 + entries * mask_bytes(nq, nk) // DECODE_RATIO + (1 << 20)


def check_calibration_fits(num_layers: int, num_heads: int, video_tokens: int, block_q: int, block_k: int,
                           steps: int, frame_tokens: int, anchors: int = 1):
    """Raise BundleError (field, fix) if a calibration of this shape could produce a bundle beyond the limits:
    checked before sampling, so hours of calibration never end in a file the loader refuses. `steps` is the
    sampler's step count; up to SIGMAS_PER_STEP sigmas per step are assumed."""
    nq, nk = -(-video_tokens // max(1, block_q)), -(-video_tokens // max(1, block_k))
    sigmas = SIGMAS_PER_STEP * steps
    problems = []
    if not 1 <= block_q <= MAX_BLOCK_SIZE or not 1 <= block_k <= MAX_BLOCK_SIZE:
        problems.append(("blocks.block_q", f"block size {block_q}x{block_k} is outside [1, {MAX_BLOCK_SIZE}]",
                         "use block_size 128"))
    if nq > MAX_BLOCKS or nk > MAX_BLOCKS:
        problems.append(("blocks", f"{video_tokens} video tokens make {nq}x{nk} blocks of {block_q}x{block_k}, "
                                   f"more than {MAX_BLOCKS} a side",
                         "use a larger block_size or a smaller / shorter video"))
    if num_heads * nq * nk > MAX_LAYER_BLOCKS:
        problems.append(("blocks", f"{num_heads} heads x {nq} x {nk} blocks per layer exceed {MAX_LAYER_BLOCKS}",
                         "use a larger block_size or a smaller / shorter video"))
    if num_layers > MAX_LAYERS or num_heads > MAX_HEADS:
        problems.append(("model", f"{num_layers} layers x {num_heads} heads exceed {MAX_LAYERS} x {MAX_HEADS}",
                         "this model is larger than mask bundles support"))
    if not 1 <= sigmas <= MAX_STEPS:
        problems.append(("sigmas.calibrated", f"{steps} steps (up to {sigmas} sigmas) is outside [1, "
                                              f"{MAX_STEPS // SIGMAS_PER_STEP}] steps", "use fewer steps"))
    entries = sigmas * num_layers * num_heads
    if entries > MAX_ENTRIES:
        problems.append(("counts", f"up to {sigmas} sigmas x {num_layers} layers x {num_heads} heads = {entries} "
                                   f"entries, more than {MAX_ENTRIES}", "use fewer steps"))
    worst = entries * mask_bytes(nq, nk)
    if worst > MAX_DECODED_BYTES:
        problems.append(("counts", f"up to {worst / 2**30:.1f} GiB of masks ({entries} entries of "
                                   f"{mask_bytes(nq, nk)} bytes), more than {MAX_DECODED_BYTES >> 30} GiB",
                         "use fewer steps, a larger block_size or a smaller / shorter video"))
    if frame_tokens > MAX_FRAME_TOKENS:
        problems.append(("grid", f"{frame_tokens} tokens per frame exceed {MAX_FRAME_TOKENS}",
                         "use a smaller video"))
    if not 1 <= anchors <= MAX_ANCHORS:
        problems.append(("counts.anchors_per_frame", f"{anchors} anchors per frame is outside [1, {MAX_ANCHORS}]",
                         "use the default anchors (5)"))
    if problems:
        field, msg, fix = problems[0]
        raise BundleError("this calibration would make a mask bundle beyond the supported sizes: "
                          + "; ".join(p[1] for p in problems) + f"; {fix}", field=field)
