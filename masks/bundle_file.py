"""Mask bundle files, format version 1: safetensors tensors + JSON metadata, no pickle.

Distinct masks are stored bit-packed; each is XORed with a parent (the same layer and head's mask in the
previous bucket, where there is one) and zlib-compressed, since neighbouring buckets differ in few blocks.
Loading checks the header, every tensor's dtype and shape against the metadata, every index range and every
decoded mask before a bundle is returned; any problem is a BundleError naming the file, field and fix.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from ..version import __version__
from .atomic import atomic_write_bytes
from .bundle import FORMAT, FORMAT_VERSION, MaskBundle
from .errors import BundleError
from .geometry import KNOWN_FAMILIES, ModelSignature, TokenGrid
from .packing import padding_bits_clear, row_bytes, row_counts
from .skiplists import BlockGeometry

# Caps that no real bundle reaches; they keep a hostile file from making us allocate absurd amounts.
MAX_HEADER_BYTES = 64 << 20
MAX_LAYERS = 512
MAX_HEADS = 512
MAX_BLOCKS = 16384  # per side (a 720p Wan latent has 591 blocks of 128)
MAX_BUCKETS = 4096
MAX_STEPS = 10000
MAX_UNIQUE = 2_000_000
MAX_DECODED_BYTES = 8 << 30
MAX_ANCHORS = 256
MAX_FRAME_TOKENS = 1 << 20

_TENSORS = {
    # name: (safetensors dtype, torch dtype)
    "mask_payload": ("U8", torch.uint8),
    "mask_offsets": ("I64", torch.int64),
    "mask_parent": ("I32", torch.int32),
    "entry_mask": ("I32", torch.int32),
    "entry_rep": ("I32", torch.int32),
    "rep_anchors": ("I32", torch.int32),
    "rep_row_anchor": ("U8", torch.uint8),
}

_FIX_RECREATE = "re-create it with Calibrate Sparse Attention or download it again"


# ---------------------------------------------------------------------------------------------------- save
def _parent_candidates(bundle: MaskBundle):
    """Per distinct mask, earlier masks likely to differ from it in few blocks: the same (layer, head) in the
    previous bucket (late steps change little) and the neighbouring head of the same bucket and layer."""
    U = bundle.num_unique_masks
    cands = [set() for _ in range(U)]
    em = bundle.entry_mask.tolist()
    for b, layers in enumerate(em):
        for l, heads in enumerate(layers):
            for h, m in enumerate(heads):
                for p in ((em[b - 1][l][h],) if b > 0 else ()) + ((heads[h - 1],) if h > 0 else ()):
                    if p < m:  # parents precede children, so decoding is one forward pass
                        cands[m].add(p)
    return cands


def _encode_masks(bundle: MaskBundle):
    """Per distinct mask: zlib of its packed bits, or of their XOR with a parent where that is smaller."""
    U = bundle.num_unique_masks
    parent = torch.full((U,), -1, dtype=torch.int32)
    cands = _parent_candidates(bundle)
    chunks, offsets = [], [0]
    packed = bundle.packed_masks.numpy()
    for m in range(U):
        best = zlib.compress(packed[m].tobytes(), 6)
        for p in sorted(cands[m]):
            c = zlib.compress((packed[m] ^ packed[p]).tobytes(), 6)
            if len(c) < len(best):
                best, parent[m] = c, p
        chunks.append(best)
        offsets.append(offsets[-1] + len(chunks[-1]))
    payload = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8) if offsets[-1] else \
        torch.zeros(0, dtype=torch.uint8)
    return payload, torch.tensor(offsets, dtype=torch.int64), parent


def _metadata(bundle: MaskBundle) -> dict:
    dens = bundle.entry_densities()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "producer": {"package": "calibatt", "version": __version__},
        "model": {**bundle.signature.to_dict(), "fingerprint": bundle.signature.fingerprint()},
        "grid": bundle.grid.to_dict(),
        "blocks": bundle.geometry.to_dict(),
        "sigmas": {"calibrated": list(bundle.calibrated_sigmas), "step_bucket": list(bundle.step_bucket),
                   "ranges": [[[lo, hi if math.isfinite(hi) else None] for lo, hi in r]
                              for r in bundle.sigma_ranges()]},
        "settings": bundle.settings,
        "counts": {"buckets": bundle.num_buckets, "layers": bundle.num_layers, "heads": bundle.num_heads,
                   "unique_masks": bundle.num_unique_masks, "repetition_plans": int(bundle.rep_anchors.shape[0]),
                   "anchors_per_frame": int(bundle.rep_anchors.shape[1])},
        "density": round(float(dens.mean()), 6),
        "densities": [[[round(float(x), 5) for x in row] for row in layer] for layer in dens.tolist()],
    }


def save_bundle(bundle: MaskBundle, path) -> Path:
    """Write atomically: a temp file in the same folder, fsync, then rename over `path`."""
    from safetensors.torch import save as st_save

    path = Path(path)
    payload, offsets, parent = _encode_masks(bundle)
    tensors = {
        "mask_payload": payload,
        "mask_offsets": offsets,
        "mask_parent": parent,
        "entry_mask": bundle.entry_mask.to(torch.int32).contiguous(),
        "entry_rep": bundle.entry_rep.to(torch.int32).contiguous(),
        "rep_anchors": bundle.rep_anchors.to(torch.int32).contiguous(),
        "rep_row_anchor": bundle.rep_row_anchor.to(torch.uint8).contiguous(),
    }
    meta = _metadata(bundle)
    blob = st_save(tensors, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION),
                                      "calibatt": json.dumps(meta, separators=(",", ":"))})
    atomic_write_bytes(path, blob)
    bundle.path = str(path)
    return path


# ---------------------------------------------------------------------------------------------------- load
def _fail(path, field, msg, fix=_FIX_RECREATE):
    raise BundleError(f"{msg}; {fix}" if fix else msg, path=path, field=field)


def _read_header(path: Path, data: bytes):
    if len(data) < 8:
        _fail(path, "header", f"file is {len(data)} bytes, too short to be a safetensors mask bundle "
                              "(truncated download?)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or n > len(data) - 8:
        _fail(path, "header", f"header length {n} is larger than the file allows ({len(data) - 8} bytes left): "
                              "the file is truncated or not a safetensors file")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        _fail(path, "header", f"header is not valid JSON ({e.__class__.__name__}): not a safetensors mask bundle")
    if not isinstance(header, dict):
        _fail(path, "header", "header is not a JSON object: not a safetensors mask bundle")
    return header, 8 + n


def _check_metadata(path, header):
    st_meta = header.get("__metadata__")
    if not isinstance(st_meta, dict) or st_meta.get("format") != FORMAT:
        got = st_meta.get("format") if isinstance(st_meta, dict) else None
        _fail(path, "format", f"format is {got!r}, not '{FORMAT}': this safetensors file is not a mask bundle "
                              "(a model checkpoint?)", "put only mask bundles in models/sparse_attention/")
    try:
        version = int(st_meta.get("format_version", "x"))
    except ValueError:
        _fail(path, "format_version", f"format_version {st_meta.get('format_version')!r} is not an integer")
    if version > FORMAT_VERSION:
        _fail(path, "format_version", f"bundle format version {version} is newer than this package reads "
                                      f"({FORMAT_VERSION})", "update the calibatt custom nodes")
    if version < 1:
        _fail(path, "format_version", f"format_version {version} is invalid")
    try:
        meta = json.loads(st_meta.get("calibatt", ""))
    except json.JSONDecodeError as e:
        _fail(path, "calibatt", f"bundle metadata is not valid JSON ({e})")
    if not isinstance(meta, dict):
        _fail(path, "calibatt", "bundle metadata is not a JSON object")
    if meta.get("format") != FORMAT or meta.get("format_version") != version:
        _fail(path, "calibatt.format", "format fields of the header and the bundle metadata disagree")
    return meta


def _int_field(path, meta, dotted, lo, hi):
    cur = meta
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            _fail(path, dotted, "missing")
        cur = cur[part]
    if isinstance(cur, bool) or not isinstance(cur, int):
        _fail(path, dotted, f"must be an integer, got {cur!r}")
    if not (lo <= cur <= hi):
        _fail(path, dotted, f"{cur} is outside the allowed range [{lo}, {hi}]")
    return cur


def _check_tensor_headers(path, header, data_start, file_size, expected_shapes):
    names = {k for k in header if k != "__metadata__"}
    if names != set(_TENSORS):
        missing, extra = set(_TENSORS) - names, names - set(_TENSORS)
        _fail(path, "tensors", f"tensor set differs from format {FORMAT_VERSION}: missing {sorted(missing)}, "
                               f"unexpected {sorted(extra)}")
    for name, (dt, _) in _TENSORS.items():
        info = header[name]
        if not isinstance(info, dict) or info.get("dtype") != dt:
            _fail(path, name, f"dtype must be {dt}, got {info.get('dtype') if isinstance(info, dict) else info!r}")
        shape = info.get("shape")
        want = expected_shapes[name]
        if not isinstance(shape, list) or len(shape) != len(want) or any(
                w is not None and s != w for s, w in zip(shape, want)):
            _fail(path, name, f"shape {shape} does not match the metadata (expected "
                              f"{[w if w is not None else '*' for w in want]})")
        off = info.get("data_offsets")
        if (not isinstance(off, list) or len(off) != 2 or not all(isinstance(x, int) for x in off)
                or off[0] < 0 or off[1] < off[0] or data_start + off[1] > file_size):
            _fail(path, name, f"data_offsets {off} point outside the file (truncated?)")
        n = 1
        for s in shape:
            n *= s
        if off[1] - off[0] != n * {"U8": 1, "I32": 4, "I64": 8}[dt]:
            _fail(path, name, f"byte length {off[1] - off[0]} does not match shape {shape}")


def load_bundle(path) -> MaskBundle:
    """Read and fully validate a bundle file; raise BundleError naming file, field and fix on any problem."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BundleError("file not found; put bundles in ComfyUI/models/sparse_attention/", path=path, field="path")
    except OSError as e:
        raise BundleError(f"cannot read file ({e.strerror})", path=path, field="path")
    header, data_start = _read_header(path, data)
    meta = _check_metadata(path, header)

    L = _int_field(path, meta, "counts.layers", 1, MAX_LAYERS)
    H = _int_field(path, meta, "counts.heads", 1, MAX_HEADS)
    B = _int_field(path, meta, "counts.buckets", 1, MAX_BUCKETS)
    U = _int_field(path, meta, "counts.unique_masks", 1, min(MAX_UNIQUE, B * L * H))
    R = _int_field(path, meta, "counts.repetition_plans", 0, B * L * H)
    K = _int_field(path, meta, "counts.anchors_per_frame", 1, MAX_ANCHORS)
    num_tokens = _int_field(path, meta, "blocks.num_tokens", 1, MAX_BLOCKS * 4096)
    bq = _int_field(path, meta, "blocks.block_q", 1, 4096)
    bk = _int_field(path, meta, "blocks.block_k", 1, 4096)
    geometry = BlockGeometry(num_tokens, bq, bk)
    if geometry.nq > MAX_BLOCKS or geometry.nk > MAX_BLOCKS:
        _fail(path, "blocks", f"{geometry.nq}x{geometry.nk} blocks exceeds the cap of {MAX_BLOCKS} per side")
    if meta["blocks"].get("nq", geometry.nq) != geometry.nq or meta["blocks"].get("nk", geometry.nk) != geometry.nk:
        _fail(path, "blocks.nq", "block counts disagree with num_tokens / block sizes")
    try:
        signature = ModelSignature.from_dict(meta["model"])
        grid = TokenGrid.from_dict(meta["grid"])
    except BundleError as e:
        raise BundleError(f"{e}; {_FIX_RECREATE}", path=path, field="grid") from None
    except (KeyError, TypeError, ValueError) as e:
        _fail(path, "model", f"model or grid metadata is incomplete ({e!r})")
    if signature.family not in KNOWN_FAMILIES:
        _fail(path, "model.family", f"unknown model family '{signature.family}' (known: {', '.join(KNOWN_FAMILIES)})",
              "update the calibatt custom nodes")
    if (signature.num_layers, signature.num_heads) != (L, H):
        _fail(path, "model", f"model says {signature.num_layers} layers x {signature.num_heads} heads but the "
                             f"masks cover {L} x {H}")
    if grid.video_tokens != num_tokens:
        _fail(path, "grid", f"grid has {grid.video_tokens} video tokens but blocks.num_tokens is {num_tokens}")
    if grid.frame_tokens > MAX_FRAME_TOKENS:
        _fail(path, "grid", f"frame of {grid.frame_tokens} tokens exceeds the cap {MAX_FRAME_TOKENS}")
    if U * geometry.nq * row_bytes(geometry.nk) > MAX_DECODED_BYTES:
        _fail(path, "counts.unique_masks", f"{U} masks would decode to more than {MAX_DECODED_BYTES >> 30} GiB")

    sig = meta.get("sigmas") if isinstance(meta.get("sigmas"), dict) else {}
    calibrated, step_bucket = sig.get("calibrated"), sig.get("step_bucket")
    if (not isinstance(calibrated, list) or not isinstance(step_bucket, list) or len(calibrated) > MAX_STEPS
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in calibrated)
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in step_bucket)):
        _fail(path, "sigmas", "sigmas.calibrated must be a list of numbers and sigmas.step_bucket a list of integers")

    _check_tensor_headers(path, header, data_start, len(data), {
        "mask_payload": [None], "mask_offsets": [U + 1], "mask_parent": [U], "entry_mask": [B, L, H],
        "entry_rep": [B, L, H], "rep_anchors": [R, K], "rep_row_anchor": [R, grid.frame_tokens]})
    try:
        from safetensors.torch import load as st_load
        t = st_load(data)
    except Exception as e:  # the library's own parse errors: wrap, never leak a stack trace to the user
        _fail(path, "tensors", f"safetensors could not read the tensors ({e})")

    offsets, parent = t["mask_offsets"], t["mask_parent"]
    P = t["mask_payload"].numel()
    if int(offsets[0]) != 0 or int(offsets[-1]) != P or bool((offsets[1:] < offsets[:-1]).any()):
        _fail(path, "mask_offsets", "offsets must start at 0, never decrease and end at the payload length")
    if bool(((parent < -1) | (parent >= torch.arange(U, dtype=torch.int32))).any()):
        _fail(path, "mask_parent", "every parent must be -1 or an earlier mask")
    for name in ("entry_mask",):
        e = t[name]
        if bool(((e < 0) | (e >= U)).any()):
            _fail(path, name, f"mask ids must be in [0, {U})")
    er = t["entry_rep"]
    if bool(((er < -1) | (er >= R)).any()):
        _fail(path, "entry_rep", f"repetition ids must be -1 or in [0, {R})")

    nq, rb = geometry.nq, row_bytes(geometry.nk)
    size = nq * rb
    payload = t["mask_payload"].numpy().tobytes()
    packed_np = np.empty((U, nq, rb), dtype=np.uint8)
    offs = offsets.tolist()
    par = parent.tolist()
    for m in range(U):
        d = zlib.decompressobj()
        try:
            raw = d.decompress(payload[offs[m]:offs[m + 1]], size + 1)
        except zlib.error as e:
            _fail(path, "mask_payload", f"mask {m} does not decompress ({e})")
        if len(raw) != size or not d.eof:
            _fail(path, "mask_payload", f"mask {m} decodes to {len(raw)} bytes, expected {size} ({nq} rows)")
        cur = np.frombuffer(raw, dtype=np.uint8).reshape(nq, rb)
        if par[m] >= 0:
            cur = cur ^ packed_np[par[m]]
        packed_np[m] = cur
    packed = torch.from_numpy(packed_np)
    if not padding_bits_clear(packed, geometry.nk):
        _fail(path, "mask_payload", "bits beyond the last key block are set")
    empty = row_counts(packed) == 0
    if bool(empty.any()):
        m, r = empty.nonzero()[0].tolist()
        _fail(path, "mask_payload", f"mask {m} has an empty row (query block {r} would attend to nothing)")

    anchors = t["rep_anchors"].long()
    rows = t["rep_row_anchor"].long()
    if R and (int(anchors.min()) < 0 or int(anchors.max()) >= grid.frame_tokens):
        _fail(path, "rep_anchors", f"anchor rows must be in [0, {grid.frame_tokens})")
    if R and int(rows.max()) >= K:
        _fail(path, "rep_row_anchor", f"anchor slots must be in [0, {K})")

    try:
        bundle = MaskBundle(signature=signature, grid=grid, geometry=geometry, calibrated_sigmas=calibrated,
                            step_bucket=step_bucket, packed_masks=packed, entry_mask=t["entry_mask"],
                            entry_rep=t["entry_rep"], rep_anchors=anchors, rep_row_anchor=rows,
                            settings=dict(meta.get("settings") or {}),
                            producer=dict(meta.get("producer") or {}), path=str(path))
    except BundleError as e:
        raise BundleError(f"{e}; {_FIX_RECREATE}", path=path, field=e.field) from None

    dens = meta.get("densities")
    if not isinstance(dens, list):
        _fail(path, "densities", "per-entry densities missing")
    try:
        stored = torch.tensor(dens, dtype=torch.float64)
    except (TypeError, ValueError):
        _fail(path, "densities", "per-entry densities are not a [buckets][layers][heads] array of numbers")
    if tuple(stored.shape) != (B, L, H) or bool(((stored - bundle.entry_densities()).abs() > 1e-4).any()):
        _fail(path, "densities", "stored per-entry densities disagree with the masks (file edited or corrupted)")
    return bundle
