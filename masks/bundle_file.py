"""Mask bundle files, format version 1: safetensors tensors + JSON metadata, no pickle.

Distinct masks are stored bit-packed; each is XORed with a parent (the same layer and head's mask in the
previous bucket, or the neighbouring head, where that is smaller) and zlib-compressed, since neighbouring buckets
differ in few blocks. Loading checks the header, the metadata schema (bundle_schema.py), every tensor's dtype,
shape and byte range, the decode budget (bundle_limits.py), every index and every decoded mask before a bundle is
returned; any problem is a BundleError naming the file, field and fix. Saving writes only what loading accepts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from ..version import __version__
from . import bundle_limits as lim
from .atomic import atomic_write_bytes
from .bundle import FORMAT, FORMAT_VERSION, MaskBundle
from .bundle_schema import DIGEST_PREFIX, FIX_RECREATE, BundleMeta, fail, parse_json, read_metadata
from .errors import BundleError
from .packing import row_bytes, row_counts
from .skiplists import BlockGeometry

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
_DTYPES = {"U8": np.dtype("u1"), "I32": np.dtype("<i4"), "I64": np.dtype("<i8")}


def content_digest(doc: str, arrays: dict) -> str:
    """Digest of the metadata document and every tensor (name, shape, little-endian bytes): any edit that keeps
    the file well-formed and self-consistent (a block size, a grid reshaped with the same token count, a swapped
    mask id) still changes it. Files without one (written before it existed) load on their other checks."""
    h = hashlib.blake2b(digest_size=16)
    h.update(doc.encode("utf-8", "surrogatepass"))
    for name in _TENSORS:
        a = arrays[name]
        h.update(b"\0" + name.encode() + np.asarray(a.shape, dtype="<i8").tobytes())
        h.update(np.ascontiguousarray(a, dtype=_DTYPES[_TENSORS[name][0]]).reshape(-1).view(np.uint8))
    return DIGEST_PREFIX + h.hexdigest()


# ---------------------------------------------------------------------------------------------------- save
def _first_use(ids: np.ndarray, key) -> tuple:
    """Renumber ids (>= 0; -1 = none) by first use, merging ids whose key(id) is equal -> (new ids, kept old ids)."""
    flat = ids.ravel()
    used = flat >= 0
    old, first = np.unique(flat[used], return_index=True)
    order = old[np.argsort(first, kind="stable")]
    remap = np.full(int(old.max()) + 1 if old.size else 1, -1, dtype=np.int64)
    by_key, kept = {}, []
    for o in order.tolist():
        k = key(o)
        n = by_key.get(k)
        if n is None:
            n = by_key[k] = len(kept)
            kept.append(o)
        remap[o] = n
    out = np.full(flat.shape, -1, dtype=np.int32)
    out[used] = remap[flat[used]]
    return out.reshape(ids.shape), kept


def _canonical(bundle: MaskBundle):
    """(packed [U, nq, rb] uint8, entry_mask, entry_rep, rep_anchors, rep_row_anchor) with every stored mask and
    plan distinct and used, numbered by first use: the form the loader requires, whatever built the bundle."""
    packed = bundle.packed_masks.numpy()
    em, keep = _first_use(bundle.entry_mask.to(torch.int64).numpy(), lambda m: packed[m].tobytes())
    anchors, rows = bundle.rep_anchors.to(torch.int64).numpy(), bundle.rep_row_anchor.to(torch.int64).numpy()
    er, rkeep = _first_use(bundle.entry_rep.to(torch.int64).numpy(),
                           lambda r: anchors[r].tobytes() + b"|" + rows[r].tobytes())
    K = anchors.shape[1]
    return (np.ascontiguousarray(packed[keep]), torch.from_numpy(em), torch.from_numpy(er),
            torch.from_numpy(anchors[rkeep].reshape(-1, K).astype(np.int32)),
            torch.from_numpy(rows[rkeep].reshape(-1, rows.shape[1]).astype(np.uint8)))


def _parent_candidates(em: list, U: int):
    """Per distinct mask, earlier masks likely to differ from it in few blocks: the same (layer, head) in the
    previous bucket (late steps change little) and the neighbouring head of the same bucket and layer."""
    cands = [set() for _ in range(U)]
    for b, layers in enumerate(em):
        for l, heads in enumerate(layers):
            for h, m in enumerate(heads):
                for p in ((em[b - 1][l][h],) if b > 0 else ()) + ((heads[h - 1],) if h > 0 else ()):
                    if p < m:  # parents precede children, so decoding is one forward pass
                        cands[m].add(p)
    return cands


def _encode_masks(packed: np.ndarray, entry_mask: torch.Tensor):
    """Per distinct mask: zlib of its packed bits, or of their XOR with a parent where that is smaller. When the
    masks compress better than the loader's decode budget allows (lim.DECODE_RATIO), the most compressible ones
    are stored uncompressed (zlib level 0) until the payload is large enough: the file grows, loading never fails."""
    U = packed.shape[0]
    size = packed[0].nbytes
    parent = np.full(U, -1, dtype=np.int32)
    cands = _parent_candidates(entry_mask.tolist(), U)
    chunks = []
    for m in range(U):
        best = zlib.compress(packed[m].tobytes(), 6)
        for p in sorted(cands[m]):
            c = zlib.compress((packed[m] ^ packed[p]).tobytes(), 6)
            if len(c) < len(best):
                best, parent[m] = c, p
        chunks.append(best)
    total = sum(len(c) for c in chunks)
    need = U * size
    if need > lim.decode_budget(total):
        for m in sorted(range(U), key=lambda i: len(chunks[i])):
            if need <= lim.decode_budget(total):
                break
            src = packed[m] if parent[m] < 0 else packed[m] ^ packed[parent[m]]
            stored = zlib.compress(src.tobytes(), 0)
            total += len(stored) - len(chunks[m])
            chunks[m] = stored
    offsets = np.zeros(U + 1, dtype=np.int64)
    np.cumsum([len(c) for c in chunks], out=offsets[1:])
    payload = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8) if total else \
        torch.zeros(0, dtype=torch.uint8)
    return payload, torch.from_numpy(offsets), torch.from_numpy(parent)


def _metadata(bundle: MaskBundle, counts: dict) -> dict:
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
        "counts": counts,
        "density": round(float(dens.mean()), 6),
        "densities": [[[round(float(x), 5) for x in row] for row in layer] for layer in dens.tolist()],
    }


def save_bundle(bundle: MaskBundle, path) -> Path:
    """Write atomically (a temp file in the same folder, fsync, rename, fsync of the folder). The file is checked
    with the loader's own rules first: what cannot be loaded is never written (BundleError, nothing on disk)."""
    from safetensors.torch import save as st_save

    path = Path(path)
    packed, entry_mask, entry_rep, anchors, rows = _canonical(bundle)
    try:
        check_masks(packed, bundle.geometry, path)
    except BundleError as e:
        raise _not_saved(e) from None
    payload, offsets, parent = _encode_masks(packed, entry_mask)
    tensors = {"mask_payload": payload, "mask_offsets": offsets, "mask_parent": parent, "entry_mask": entry_mask,
               "entry_rep": entry_rep, "rep_anchors": anchors, "rep_row_anchor": rows}
    counts = {"buckets": bundle.num_buckets, "layers": bundle.num_layers, "heads": bundle.num_heads,
              "unique_masks": int(packed.shape[0]), "repetition_plans": int(anchors.shape[0]),
              "anchors_per_frame": int(anchors.shape[1])}
    try:
        doc = json.dumps(_metadata(bundle, counts), separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise BundleError(f"the bundle's metadata cannot be written as JSON ({e}); settings must hold plain "
                          "finite numbers, strings, lists and objects", path=path, field="settings") from None
    st_meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "calibatt": doc,
               "digest": content_digest(doc, {k: v.numpy() for k, v in tensors.items()})}
    header = {"__metadata__": st_meta, **{k: {"dtype": _TENSORS[k][0], "shape": list(v.shape),
                                               "data_offsets": [0, 0]} for k, v in tensors.items()}}
    try:
        meta = read_metadata(path, header)  # the loader's schema, before anything touches the disk
        _check_decode_budget(path, meta, [payload.numel()])
    except BundleError as e:
        raise _not_saved(e) from None
    blob = st_save(tensors, metadata=st_meta)
    atomic_write_bytes(path, blob)
    bundle.path = str(path)
    return path


def _not_saved(e: BundleError) -> BundleError:
    return BundleError(f"not saved: the loader would refuse this bundle: {e.message}", path=e.path, field=e.field)


# ---------------------------------------------------------------------------------------------------- load
def _fail(path, field, msg, fix=FIX_RECREATE):
    raise BundleError(f"{msg}; {fix}" if fix else msg, path=path, field=field)  # bundle_schema.fail's form


def load_bundle(path) -> MaskBundle:
    """Read and fully validate a bundle file; raise BundleError naming file, field and fix on any problem.

    Order: header length, header JSON, the metadata schema (bundle_schema), tensor headers against the file size
    and the metadata, the decode budget (bundle_limits), then the body. Nothing is allocated from a declared size
    before it has been checked against the file's actual size and the limits."""
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO (or a device) must not wait for a writer; fstat then refuses it.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                _fail(path, "path", "is not a regular file",
                      "put mask bundle files in ComfyUI/models/sparse_attention/")
            header, data_start = _read_header(path, fh, st.st_size)
            meta = read_metadata(path, header)
            layout = _check_tensor_headers(path, header, st.st_size - data_start, meta)
            _check_decode_budget(path, meta, layout["mask_payload"][2])
            body = fh.read(st.st_size - data_start)
            if len(body) != st.st_size - data_start:
                _fail(path, "tensors", "the file changed size while it was read")
    except FileNotFoundError:
        raise BundleError("file not found; put bundles in ComfyUI/models/sparse_attention/", path=path,
                          field="path") from None
    except IsADirectoryError:
        raise BundleError("is a folder, not a bundle file", path=path, field="path") from None
    except OSError as e:
        raise BundleError(f"cannot read file ({e.strerror or e})", path=path, field="path") from None
    return _build(path, meta, layout, body)


def _read_header(path: Path, fh, size: int):
    head = fh.read(8)
    if len(head) < 8:
        _fail(path, "header", f"file is {len(head)} bytes, too short to be a safetensors mask bundle "
                              "(truncated download?)")
    (n,) = struct.unpack("<Q", head)
    if n > lim.MAX_HEADER_BYTES or n > size - 8:
        _fail(path, "header", f"header length {n} is larger than the file allows ({max(0, size - 8)} bytes left, "
                              f"at most {lim.MAX_HEADER_BYTES}): the file is truncated or not a safetensors file")
    raw = fh.read(n)
    if len(raw) != n:
        _fail(path, "header", "the file ended inside the header (truncated, or changed while read)")
    header = parse_json(raw, path, "header", "the safetensors header")
    if not isinstance(header, dict):
        _fail(path, "header", "header is not a JSON object: not a safetensors mask bundle")
    return header, 8 + n


def _expected_shapes(meta: BundleMeta) -> dict:
    return {"mask_payload": [None], "mask_offsets": [meta.unique_masks + 1], "mask_parent": [meta.unique_masks],
            "entry_mask": [meta.buckets, meta.layers, meta.heads], "entry_rep": [meta.buckets, meta.layers, meta.heads],
            "rep_anchors": [meta.repetition_plans, meta.anchors_per_frame],
            "rep_row_anchor": [meta.repetition_plans, meta.grid.frame_tokens]}


def _check_tensor_headers(path, header, body_size: int, meta: BundleMeta) -> dict:
    """-> {name: (start, end, shape)} within the body, after checking the safetensors rules (every byte of the
    body belongs to exactly one tensor, in order) and every dtype and shape against the metadata."""
    names = {k for k in header if k != "__metadata__"}
    if names != set(_TENSORS):
        missing, extra = set(_TENSORS) - names, names - set(_TENSORS)
        _fail(path, "tensors", f"tensor set differs from format {FORMAT_VERSION}: missing {sorted(missing)}, "
                               f"unexpected {sorted(x[:64] for x in extra)[:8]}")
    want_shapes = _expected_shapes(meta)
    layout = {}
    for name, (dt, _) in _TENSORS.items():
        info = header[name]
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            _fail(path, name, "tensor entry must have exactly dtype, shape and data_offsets")
        if info["dtype"] != dt:
            _fail(path, name, f"dtype must be {dt}, got {info['dtype']!r:.40}")
        shape, want = info["shape"], want_shapes[name]
        if (not isinstance(shape, list) or len(shape) != len(want)
                or any(type(s) is not int or s != (w if w is not None else min(max(s, 0), body_size))
                       for s, w in zip(shape, want))):
            _fail(path, name, f"shape {shape!r:.80} does not match the metadata (expected "
                              f"{[w if w is not None else '*' for w in want]})")
        off = info["data_offsets"]
        if not (isinstance(off, list) and len(off) == 2 and all(type(x) is int for x in off)
                and 0 <= off[0] <= off[1] <= body_size):
            _fail(path, name, f"data_offsets {off!r:.80} point outside the file (truncated?)")
        n = math.prod(shape) * _DTYPES[dt].itemsize
        if off[1] - off[0] != n:
            _fail(path, name, f"byte length {off[1] - off[0]} does not match shape {shape}")
        layout[name] = (off[0], off[1], shape)
    pos = 0
    for name, (a, b, _) in sorted(layout.items(), key=lambda kv: (kv[1][0], kv[1][1])):
        if a != pos:
            _fail(path, name, f"tensor data starts at byte {a}, expected {pos} (tensors overlap or leave gaps)")
        pos = b
    if pos != body_size:
        _fail(path, "tensors", f"{body_size - pos} bytes after the last tensor (truncated or appended to?)")
    return layout


def _check_decode_budget(path, meta: BundleMeta, payload_shape: list):
    """Refuse, before decoding, a file that declares more decoded masks than its payload can honestly hold."""
    P = payload_shape[0]
    size = lim.mask_bytes(meta.geometry.nq, meta.geometry.nk)
    D = meta.unique_masks * size
    budget = lim.decode_budget(P)
    if D > budget:
        _fail(path, "counts.unique_masks", f"{meta.unique_masks} masks of {size} bytes ({D / 2**20:.1f} MiB decoded) "
                                          f"from a {P}-byte payload exceed the decode budget of {budget / 2**20:.1f} "
                                          f"MiB (at most {lim.DECODE_RATIO}x the payload, {lim.MAX_DECODED_BYTES >> 30}"
                                          " GiB in all): the file is crafted or corrupted")
    if P < meta.unique_masks * lim.ZLIB_MIN_STREAM or P > meta.unique_masks * lim.zlib_bound(size):
        _fail(path, "mask_payload", f"a payload of {P} bytes cannot hold {meta.unique_masks} zlib masks of {size} "
                                    "bytes")


def _array(body: bytes, layout: dict, name: str) -> np.ndarray:
    a, b, shape = layout[name]
    dt = _DTYPES[_TENSORS[name][0]]
    return np.frombuffer(body, dtype=dt, count=(b - a) // dt.itemsize, offset=a).reshape(shape)


def _build(path, meta: BundleMeta, layout: dict, body: bytes) -> MaskBundle:
    U, R, K = meta.unique_masks, meta.repetition_plans, meta.anchors_per_frame
    geometry, grid = meta.geometry, meta.grid
    size = lim.mask_bytes(geometry.nq, geometry.nk)
    offsets = _array(body, layout, "mask_offsets").astype(np.int64)
    parent = _array(body, layout, "mask_parent").astype(np.int64)
    P = layout["mask_payload"][2][0]
    lengths = np.diff(offsets)
    if int(offsets[0]) != 0 or int(offsets[-1]) != P or bool((lengths < 0).any()):
        _fail(path, "mask_offsets", "offsets must start at 0, never decrease and end at the payload length")
    short = (lengths < lim.ZLIB_MIN_STREAM) | (lengths * lim.ZLIB_MAX_RATIO < size) | (lengths > lim.zlib_bound(size))
    if bool(short.any()):
        m = int(short.nonzero()[0][0])
        _fail(path, "mask_offsets", f"mask {m} is stored in {int(lengths[m])} bytes, which no zlib stream of a "
                                    f"{size}-byte mask has")
    if bool(((parent < -1) | (parent >= np.arange(U))).any()):
        _fail(path, "mask_parent", "every parent must be -1 or an earlier mask")
    entry_mask = _array(body, layout, "entry_mask").astype(np.int32)
    entry_rep = _array(body, layout, "entry_rep").astype(np.int32)
    if bool(((entry_mask < 0) | (entry_mask >= U)).any()):
        _fail(path, "entry_mask", f"mask ids must be in [0, {U})")
    if not bool((np.bincount(entry_mask.ravel(), minlength=U) > 0).all()):
        _fail(path, "entry_mask", "a stored mask is used by no entry (the writer stores only used masks)")
    if bool(((entry_rep < -1) | (entry_rep >= R)).any()):
        _fail(path, "entry_rep", f"repetition ids must be -1 or in [0, {R})")
    if R and not bool((np.bincount(entry_rep[entry_rep >= 0].ravel(), minlength=R) > 0).all()):
        _fail(path, "entry_rep", "a stored repetition plan is used by no entry (the writer stores only used plans)")
    anchors = _array(body, layout, "rep_anchors").astype(np.int64)
    rows = _array(body, layout, "rep_row_anchor").astype(np.int64)
    if R and (int(anchors.min()) < 0 or int(anchors.max()) >= grid.frame_tokens):
        _fail(path, "rep_anchors", f"anchor rows must be in [0, {grid.frame_tokens})")
    if R and int(rows.max()) >= K:
        _fail(path, "rep_row_anchor", f"anchor slots must be in [0, {K})")
    plans = {anchors[r].tobytes() + rows[r].tobytes() for r in range(R)}
    if len(plans) != R:
        _fail(path, "rep_anchors", "two repetition plans are identical (the writer stores each plan once)")

    packed, duplicate = _decode_masks(path, memoryview(body)[layout["mask_payload"][0]:layout["mask_payload"][1]],
                                      offsets, parent, U, geometry)
    max_counts, totals = check_masks(packed, geometry, path)
    if duplicate is not None:
        _fail(path, "mask_payload", f"masks {duplicate[0]} and {duplicate[1]} are identical (the writer stores each "
                                    "mask once)")
    try:
        bundle = MaskBundle(signature=meta.signature, grid=grid, geometry=geometry,
                            calibrated_sigmas=meta.calibrated_sigmas, step_bucket=meta.step_bucket,
                            packed_masks=torch.from_numpy(packed), entry_mask=torch.from_numpy(entry_mask),
                            entry_rep=torch.from_numpy(entry_rep), rep_anchors=torch.from_numpy(anchors.copy()),
                            rep_row_anchor=torch.from_numpy(rows.copy()), settings=meta.settings,
                            producer=meta.producer, path=str(path))
    except BundleError as e:
        raise BundleError(f"{e.message}; {FIX_RECREATE}", path=path, field=e.field) from None
    bundle.set_mask_counts(torch.from_numpy(max_counts), torch.from_numpy(totals))

    dens = bundle.entry_densities().numpy()
    if not bool((np.abs(meta.densities - dens) <= 1e-4).all()):
        _fail(path, "densities", "stored per-entry densities disagree with the masks (file edited or corrupted)")
    if not abs(meta.density - float(dens.mean())) <= 1e-5:
        _fail(path, "density", f"stored density {meta.density} disagrees with the masks' {float(dens.mean()):.6f} "
                               "(file edited or corrupted)")
    if meta.digest is not None:
        got = content_digest(meta.text, {name: _array(body, layout, name) for name in _TENSORS})
        if got != meta.digest:
            _fail(path, "digest", "the contents do not match the file's digest: it was edited or corrupted after it "
                                  "was written")
    return bundle


def _decode_masks(path, payload: memoryview, offsets: np.ndarray, parent: np.ndarray, U: int,
                  geometry: BlockGeometry) -> np.ndarray:
    """([U, nq, row_bytes] uint8, first pair of identical masks or None): inflate each mask (never past its
    declared size) and XOR it with its parent."""
    nq, rb = geometry.nq, row_bytes(geometry.nk)
    size = nq * rb
    packed = np.empty((U, nq, rb), dtype=np.uint8)
    flat = packed.reshape(U, size)
    offs, par = offsets.tolist(), parent.tolist()
    seen, duplicate = {}, None
    for m in range(U):
        d = zlib.decompressobj()
        try:
            raw = d.decompress(payload[offs[m]:offs[m + 1]], size + 1)
        except zlib.error as e:
            _fail(path, "mask_payload", f"mask {m} does not decompress ({e})")
        if len(raw) != size or not d.eof or d.unconsumed_tail or d.unused_data:
            _fail(path, "mask_payload", f"mask {m} decodes to {len(raw)}{'+' if not d.eof else ''} bytes, expected "
                                        f"{size} ({nq} rows) and the end of its zlib stream")
        cur = np.frombuffer(raw, dtype=np.uint8)
        if par[m] >= 0:
            np.bitwise_xor(cur, flat[par[m]], out=flat[m])
        else:
            flat[m] = cur
        # crc32 is the cheap part; a collision costs one comparison, and a crafted one only hides a duplicate
        # (harmless: the decode budget bounds the cost either way).
        other = seen.setdefault(zlib.crc32(flat[m]), m)
        if other != m and duplicate is None and np.array_equal(flat[other], flat[m]):
            duplicate = (other, m)
    return packed, duplicate


def _diagonal_window(geometry: BlockGeometry):
    """(byte columns [nq, w], packed diagonal bits in them [nq, w]): the few bytes of each row that hold the key
    blocks sharing tokens with its query block, without building the [nq, nk] diagonal."""
    g = geometry
    q0 = np.arange(g.nq, dtype=np.int64) * g.block_q
    lo = q0 // g.block_k
    hi = (np.minimum(q0 + g.block_q, g.num_tokens) - 1) // g.block_k
    w = int((hi // 8 - lo // 8).max()) + 1
    cols = (lo // 8)[:, None] + np.arange(w)
    pos = (lo // 8 * 8)[:, None] + np.arange(w * 8)
    bits = np.packbits((pos >= lo[:, None]) & (pos <= hi[:, None]), axis=-1)
    return np.minimum(cols, row_bytes(g.nk) - 1), bits


def check_masks(packed: np.ndarray, geometry: BlockGeometry, path=None):
    """Per-mask invariants every bundle keeps, for [U, nq, row_bytes] uint8 packed masks: no bit beyond the last key
    block, the block diagonal kept (so no row is empty, and the masks fit these block sizes: a geometry edited to
    another block size with the same block count misses diagonal blocks). -> (max row count [U] int32, kept blocks
    [U] int64), computed in chunks of bounded size."""
    U, nq, rb = packed.shape
    nk = geometry.nk
    cols, diag = _diagonal_window(geometry)
    rows = np.arange(nq)[:, None]
    pad = rb * 8 - nk
    low = np.uint8((1 << pad) - 1) if pad else np.uint8(0)
    max_counts = np.empty(U, dtype=np.int32)
    totals = np.empty(U, dtype=np.int64)
    per = max(1, (32 << 20) // max(1, nq * rb))
    for u0 in range(0, U, per):
        chunk = packed[u0:u0 + per]
        if pad and bool((chunk[..., -1] & low).any()):
            m = u0 + int((chunk[..., -1] & low).any(-1).nonzero()[0][0])
            _fail(path, "mask_payload", f"mask {m} has bits set beyond the last key block")
        missing = ((chunk[:, rows, cols] & diag) != diag).any(-1)  # [n, nq]
        if bool(missing.any()):
            m, r = (int(x[0]) for x in missing.nonzero())
            _fail(path, "mask_payload", f"mask {u0 + m} does not keep the diagonal of query block {r} (an empty row, "
                                        f"or masks made for other block sizes than {geometry.block_q}x"
                                        f"{geometry.block_k})")
        counts = _popcount_rows(chunk)  # [n, nq]
        max_counts[u0:u0 + per] = counts.max(-1)
        totals[u0:u0 + per] = counts.sum(-1, dtype=np.int64)
    return max_counts, totals


def _popcount_rows(chunk: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(chunk).sum(-1, dtype=np.int32)
    return row_counts(torch.from_numpy(chunk)).numpy()
