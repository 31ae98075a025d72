"""Fuzzing the bundle loader with files derived from valid bundles of every family.

One case = a valid bundle file (tiny, of one family: Wan 2.1 / 2.2, Mochi, HunyuanVideo with text first, LTX-Video,
tinywan, generic, and one made by the real Calibrator) changed by one mutator: raw bytes (flips, cuts, splices),
the JSON header (any field replaced by another type, a huge, negative, NaN or infinite number, a long string, deep
nesting, a typo'd or unknown key, a shorter or longer list), the tensors (indices, offsets, parents, payload bits,
with or without the metadata following), consistent geometry edits (block size changed with the block count kept,
grid reshaped), or a crafted decode-amplification file. The outcome of a case is one of:
  rejected      load_bundle raised BundleError naming the file and a field (the promise);
  accepted      it loaded, and every use of it worked (summary, sigma lookup, every bucket's skip lists, the
                preview, a save/load round trip, the sparse runner on the CPU);
  bad_message   a BundleError without the file, the field or a fix;
  escaped       load_bundle raised anything else;
  broken_after  it loaded, then a use of it raised.
`python tests/bundle_fuzz.py` (make fuzz) runs many cases in a worker process and adds two more outcomes: hang
(a case ran past the time limit) and crash (the worker died). tests/test_bundle_fuzz.py runs a few hundred cases
through hypothesis in CI.
"""

from __future__ import annotations

import copy
import json
import math
import random
import struct
import sys
import time
import zlib
from pathlib import Path

if __name__ == "__main__" or "calibatt" not in sys.modules:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from _pkg import load_package  # noqa: E402

    load_package()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from calibatt.kernels.call import AttentionCall  # noqa: E402
from calibatt.kernels.runner import SparseRunner  # noqa: E402
from calibatt.masks import (BlockGeometry, BundleError, MaskBundle, ModelSignature, RepetitionPlan,  # noqa: E402
                            TokenGrid, load_bundle, save_bundle)
from calibatt.masks.bundle import FORMAT  # noqa: E402
from calibatt.nodes.preview import preview_images  # noqa: E402

OUTCOMES = ("rejected", "accepted", "bad_message", "escaped", "broken_after", "hang", "crash")
FAILURES = ("bad_message", "escaped", "broken_after", "hang", "crash")


# ----------------------------------------------------------------------------------------------- valid bundles
def _bundle(family, grid, *, L, H, block=(16, 16), steps=4, shared=True, repetition=True, seed=0, density=0.3,
            extra=None):
    gen = torch.Generator().manual_seed(seed)
    g = BlockGeometry(grid.video_tokens, *block)
    sig = ModelSignature(family, L, H, 16, 16 * H, dict(extra or {}))
    base = torch.rand(L, H, g.nq, g.nk, generator=gen) < density
    buckets, plans = [], []
    for b in range(steps - 1 if shared else steps):
        m = base.clone()
        m[0, 0] ^= torch.rand(g.nq, g.nk, generator=gen) < 0.1
        rep = None
        if repetition and b == 0:
            slot = torch.full((L, H), -1, dtype=torch.int32)
            slot[0, H - 1] = 0
            K = min(2, grid.frame_tokens)
            anchors = torch.randperm(grid.frame_tokens, generator=gen)[:K][None]
            rep = RepetitionPlan(grid.frame_tokens, slot, anchors,
                                 torch.randint(0, K, (1, grid.frame_tokens), generator=gen))
        buckets.append(m)
        plans.append(rep)
    sigmas = torch.linspace(1.0, 0.05, steps).tolist()
    step_bucket = list(range(len(buckets))) + ([len(buckets) - 1] if shared else [])
    settings = {"calibration": {"block_q": block[0], "block_k": block[1], "seed": seed}, "steps": steps,
                "sampler": "euler", "eps_per_step": [0.9] * steps}
    return MaskBundle.from_block_masks(sig, grid, g, buckets, sigmas, step_bucket, repetition=plans,
                                       settings=settings)


def _calibrated():
    """A bundle from the real Calibrator on planted synthetic attention (2 layers, 4 heads, 2 prompts)."""
    from calibatt.calibration import CalibrationSettings, Calibrator
    from synthetic import planted_layer

    grid, sig = TokenGrid(2, 4, 8), ModelSignature("generic", 2, 4, 16, 64)
    sigmas = [3.0, 1.0, 0.3]
    cal = Calibrator(sig, grid, CalibrationSettings(block_q=16, block_k=16, A=0.85, C=0.97, k=4.0,
                                                    stats_row_stride=1), background=False)
    kinds = [["local", "stripes", "repeat", "global"], ["global", "repeat", "local", "stripes"]]
    for p in range(2):
        cal.begin_prompt(sample_sigmas=sigmas + [0.0], key=f"p{p}")
        for s in sigmas:
            for layer in range(2):
                q, k, v = planted_layer(grid, kinds[layer], 16, prompt=p, layer=layer, sigma=s)
                cal.observe(AttentionCall(q, k, v, "bhld", 4, layer, s, grid, scale=1.0))
        cal.end_prompt()
    try:
        return cal.finish()
    finally:
        cal.close()


def base_bundles() -> dict:
    """name -> MaskBundle, one or more per family (deterministic)."""
    wan = {"in_channels": 16, "model_type": "t2v"}
    return {
        "wan21": _bundle("wan21", TokenGrid(3, 6, 8), L=2, H=3, extra=wan),
        "wan22_unequal_blocks": _bundle("wan22", TokenGrid(2, 4, 8), L=2, H=2, block=(8, 16), seed=1,
                                        extra={"in_channels": 48, "model_type": "t2v"}),
        "mochi_text_end": _bundle("mochi", TokenGrid(2, 4, 6, text_tokens=7, text_position="end"), L=2, H=2,
                                  seed=2),
        "hunyuan_text_start": _bundle("hunyuan", TokenGrid(2, 4, 4, patch=(1, 2, 2), text_tokens=5,
                                                           text_position="start"), L=3, H=2, seed=3,
                                      extra={"in_channels": 16, "double_blocks": 1}),
        "ltxv": _bundle("ltxv", TokenGrid(4, 4, 4, patch=(1, 1, 1), vae_stride=(8, 32, 32)), L=2, H=2, seed=4,
                        steps=3, shared=False, extra={"in_channels": 128}),
        "tinywan": _bundle("tinywan", TokenGrid(3, 4, 4), L=1, H=2, repetition=False, steps=2, seed=5),
        "generic_one_bucket": _bundle("generic", TokenGrid(1, 4, 4), L=1, H=1, steps=1, shared=False,
                                      repetition=False, seed=6, density=0.9),
        "calibrated": _calibrated(),
    }


_BASES: dict = {}
BASE_NAMES = ("calibrated", "generic_one_bucket", "hunyuan_text_start", "ltxv", "mochi_text_end", "tinywan",
              "wan21", "wan22_unequal_blocks")


def _sorted(node):
    if isinstance(node, dict):
        return {k: _sorted(node[k]) for k in sorted(node)}
    return node


def base_files(tmp: Path) -> dict:
    """name -> bytes of each valid bundle file (built once per process)."""
    if not _BASES:
        for name, b in base_bundles().items():
            p = save_bundle(b, tmp / f"base_{name}.safetensors")
            # The safetensors library writes __metadata__ in hash-map order, which changes between processes:
            # sort the header so that a case is the same file in every process (reproducible from seed and index).
            header, body = split(p.read_bytes())
            _BASES[name] = join(_sorted(header), body)
            p.unlink()
    return _BASES


# ----------------------------------------------------------------------------------------------- file surgery
def split(data: bytes):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header, body: bytes, raw_meta: str | None = None) -> bytes:
    """header dict (+ optional raw text for the calibatt metadata string, for JSON that json.dumps cannot write)."""
    if raw_meta is not None:
        header = dict(header)
        header["__metadata__"] = dict(header["__metadata__"], calibatt="@@RAW@@")
        text = json.dumps(header).replace('"@@RAW@@"', json.dumps(raw_meta))
    else:
        text = json.dumps(header)
    h = text.encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + body


def meta_of(header) -> dict:
    return json.loads(header["__metadata__"]["calibatt"])


def with_meta(data: bytes, fn) -> bytes:
    header, body = split(data)
    meta = meta_of(header)
    fn(meta)
    header["__metadata__"]["calibatt"] = json.dumps(meta)
    return join(header, body)


def tensors_of(data: bytes) -> dict:
    from safetensors.torch import load
    return {k: v.clone() for k, v in load(data).items()}


def with_tensors(data: bytes, tensors: dict, meta: dict | None = None) -> bytes:
    from safetensors.torch import save
    header, _ = split(data)
    st_meta = dict(header["__metadata__"])
    if meta is not None:
        st_meta["calibatt"] = json.dumps(meta)
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=st_meta)


def restamp(data: bytes, rng: random.Random) -> bytes:
    """Drop the content digest, or recompute it for the mutated contents (a crafted file, not a careless edit), so
    the checks behind it are reached; files the safetensors library cannot read stay as they are."""
    from calibatt.masks.bundle_file import content_digest
    try:
        header, body = split(data)
        st_meta = header["__metadata__"]
        if rng.random() < 0.3:
            st_meta.pop("digest", None)
        else:
            t = tensors_of(data)
            st_meta["digest"] = content_digest(st_meta["calibatt"], {k: t[k].numpy() for k in t})
        return join(header, body)
    except Exception:  # noqa: BLE001 - a file broken beyond that stays broken
        return data


def refresh_fingerprint(meta: dict):
    fields = {k: v for k, v in meta["model"].items() if k != "fingerprint"}
    meta["model"]["fingerprint"] = ModelSignature(**fields).fingerprint()


# ----------------------------------------------------------------------------------------------- mutators
_HUGE_INT = "1" * 5000
_DEEP = "[" * 100000 + "]" * 100000
_RAW = {"@HUGE_INT@": _HUGE_INT, "@NEG_HUGE_INT@": "-" + _HUGE_INT, "@NAN@": "NaN", "@INF@": "Infinity",
        "@NEG_INF@": "-Infinity", "@BIG_FLOAT@": "1e999", "@DEEP@": _DEEP, "@LONG_FLOAT@": "0." + "1" * 5000}
_VALUES = [None, True, False, 0, -1, 1, 2, 3, 7, 2 ** 31, 2 ** 63, -(2 ** 63), 10 ** 18, 0.5, -0.5, 1e-300,
           1.7e308, -1.7e308, "", "x", "x" * 300, "\u00e9\u4e2d", [], {}, [1, 2], [1, 2, 3, 4], {"a": 1}, [[]],
           [None, None, None], "end", "start", "none", "thw", "wan21"] + list(_RAW)


def _paths(node, prefix=()):
    """Every (path) inside a JSON document, lists sampled so big tables do not dominate."""
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        idx = list(range(len(node)))
        for i in (idx if len(idx) <= 6 else idx[:2] + idx[-2:]):
            out += _paths(node[i], prefix + (i,))
    return out


def _get(doc, path):
    for p in path:
        doc = doc[p]
    return doc


def _tweak(value, rng: random.Random):
    if isinstance(value, bool) or value is None:
        return rng.choice(_VALUES)
    if isinstance(value, (int, float)):
        return rng.choice([value + 1, value - 1, value * 2, -value, 0, value * 1000, value / 3, float(value),
                           int(value) if math.isfinite(value) else 0, str(value)])
    if isinstance(value, str):
        return rng.choice([value + "x", value[:-1], value.upper(), value * 3, "", value + "\x00"])
    if isinstance(value, list):
        v = list(value)
        op = rng.randrange(5)
        if op == 0 and v:
            v.pop(rng.randrange(len(v)))
        elif op == 1:
            v.append(copy.deepcopy(v[-1]) if v else 0)
        elif op == 2:
            rng.shuffle(v)
        elif op == 3 and v:
            v.insert(0, copy.deepcopy(v[0]))
        else:
            v = v[: max(0, len(v) // 2)]
        return v
    if isinstance(value, dict):
        v = dict(value)
        if v and rng.random() < 0.5:
            v.pop(rng.choice(list(v)))
        else:
            v[rng.choice(["typo", "extra", "text_postion", "frame", "nq2"])] = rng.choice(_VALUES[:10])
        return v
    return value


def _set_doc(doc, rng: random.Random):
    """Mutate one node of a JSON document in place; -> the document (possibly replaced at the root)."""
    path = rng.choice(_paths(doc))
    if not path:
        return rng.choice(_VALUES)
    parent, key = _get(doc, path[:-1]), path[-1]
    op = rng.random()
    if op < 0.45:
        parent[key] = rng.choice(_VALUES)
    elif op < 0.8:
        parent[key] = _tweak(parent[key], rng)
    elif isinstance(parent, dict) and op < 0.9:
        val = parent.pop(key)
        if rng.random() < 0.5:  # a typo'd key
            parent[key[:-1] + rng.choice("xs_") if key else "_"] = val
    else:
        parent[key] = copy.deepcopy(rng.choice([parent[key], doc, _get(doc, rng.choice(_paths(doc)))]))
    return doc


def _dump_raw(doc) -> str:
    text = json.dumps(doc)
    for k, v in _RAW.items():
        text = text.replace(json.dumps(k), v)
    return text


def mut_meta_field(data: bytes, rng: random.Random) -> bytes:
    header, body = split(data)
    meta = _set_doc(meta_of(header), rng)
    return join(header, body, raw_meta=_dump_raw(meta))


def mut_meta_field_consistent(data: bytes, rng: random.Random) -> bytes:
    """A metadata edit with the fingerprint and the header/metadata format fields kept in step, so the deeper
    checks are reached."""
    header, body = split(data)
    meta = meta_of(header)
    for _ in range(rng.randint(1, 3)):
        meta = _set_doc(meta, rng)
    if isinstance(meta, dict) and isinstance(meta.get("model"), dict):
        try:
            refresh_fingerprint(meta)
        except Exception:  # noqa: BLE001 - the model fields were broken on purpose
            pass
    return join(header, body, raw_meta=_dump_raw(meta))


def mut_header_field(data: bytes, rng: random.Random) -> bytes:
    """The safetensors header itself: tensor entries and __metadata__ strings."""
    header, body = split(data)
    sub = {k: v for k, v in header.items() if k != "__metadata__"}
    sub["__metadata__"] = {k: v for k, v in header["__metadata__"].items() if k != "calibatt"}
    sub = _set_doc(sub, rng)
    if isinstance(sub, dict) and isinstance(sub.get("__metadata__"), dict):
        sub["__metadata__"] = dict(sub["__metadata__"], calibatt=header["__metadata__"]["calibatt"])
    text = _dump_raw(sub).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def mut_raw_meta_text(data: bytes, rng: random.Random) -> bytes:
    """Byte-level edits of the metadata JSON text (may break the JSON itself)."""
    header, body = split(data)
    text = bytearray(header["__metadata__"]["calibatt"].encode())
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(text))
        text[i] = rng.choice(b'0123456789-.eE[]{}",:nulltrueNaN \\')
    return join(header, body, raw_meta=text.decode("latin-1"))


def mut_bytes(data: bytes, rng: random.Random) -> bytes:
    d = bytearray(data)
    op = rng.randrange(7)
    if op == 0:
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(d))
            d[i] ^= 1 << rng.randrange(8)
    elif op == 1:
        return bytes(d[: rng.randrange(len(d))])
    elif op == 2:
        return bytes(d) + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif op == 3:
        i = rng.randrange(len(d))
        n = rng.randint(1, 32)
        d[i:i + n] = bytes(rng.randrange(256) for _ in range(n))
    elif op == 4:
        i = rng.randrange(len(d))
        del d[i:i + rng.randint(1, 32)]
    elif op == 5:
        d[:8] = struct.pack("<Q", rng.choice([0, 1, 7, len(d), len(d) - 8, 2 ** 40, 2 ** 64 - 1]))
    else:  # a change inside the tensor body only
        (n,) = struct.unpack("<Q", data[:8])
        if len(d) > 8 + n:
            i = rng.randrange(8 + n, len(d))
            d[i] = rng.randrange(256)
    return bytes(d)


def mut_tensor(data: bytes, rng: random.Random) -> bytes:
    """Change values of one tensor, keeping a well-formed safetensors file (the metadata may or may not follow)."""
    t = tensors_of(data)
    name = rng.choice(sorted(t))
    x = t[name]
    if x.numel() == 0:
        x = torch.zeros(rng.randint(1, 4), *x.shape[1:], dtype=x.dtype)
    else:
        flat = x.reshape(-1)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(flat.numel())
            info = torch.iinfo(x.dtype)
            value = rng.choice([info.min, info.max, -1, 0, 1, int(flat[i]) + 1, int(flat[i]) - 1, rng.randint(0, 255)])
            flat[i] = min(info.max, max(info.min, value))
        if rng.random() < 0.2:  # or a different shape
            x = x.reshape(-1)[: max(0, x.numel() - rng.randint(1, 3))]
    t[name] = x
    return with_tensors(data, t)


def mut_mask_bits(data: bytes, rng: random.Random) -> bytes:
    """Re-encode one mask with some bits flipped (a valid zlib stream), metadata unchanged or densities updated."""
    header, _ = split(data)
    meta = meta_of(header)
    t = tensors_of(data)
    U = t["mask_parent"].numel()
    nq, nk = meta["blocks"]["nq"], meta["blocks"]["nk"]
    size = nq * ((nk + 7) // 8)
    offs = t["mask_offsets"].tolist()
    payload = t["mask_payload"].numpy().tobytes()
    chunks = [payload[offs[m]:offs[m + 1]] for m in range(U)]
    m = rng.randrange(U)
    raw = bytearray(zlib.decompress(chunks[m]))
    op = rng.randrange(4)
    if op == 0:
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(size)] ^= 1 << rng.randrange(8)
    elif op == 1:
        raw = bytearray(size)  # empty mask
    elif op == 2:
        raw = raw[:-1] if rng.random() < 0.5 else raw + b"\x00"
    else:
        raw = bytearray(b"\xff" * size)  # padding bits set
    chunks[m] = zlib.compress(bytes(raw), rng.choice([0, 6, 9]))
    if rng.random() < 0.3:
        chunks[m] += b"\x00"  # trailing data after the stream
    t["mask_payload"] = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8) if chunks else \
        t["mask_payload"]
    t["mask_offsets"] = torch.tensor([0] + list(np.cumsum([len(c) for c in chunks])), dtype=torch.int64)
    return with_tensors(data, t)


def mut_geometry(data: bytes, rng: random.Random) -> bytes:
    """Consistent-looking geometry edits: block size changed with the same block count, grid reshaped with the
    same token count, text position flipped, fields of the calibration record changed in step."""
    def edit(meta):
        g, b = meta["grid"], meta["blocks"]
        op = rng.randrange(5)
        if op == 0:  # block_q (or block_k) edited while nq stays the same
            key, n = rng.choice([("block_q", "nq"), ("block_k", "nk")])
            for cand in range(b[key] + 1, b[key] * 2 + 2):
                if -(-b["num_tokens"] // cand) == b[n]:
                    b[key] = cand
                    if rng.random() < 0.5 and isinstance(meta["settings"].get("calibration"), dict):
                        meta["settings"]["calibration"][key] = cand
                    break
        elif op == 1:  # frames/height/width permuted
            f, h, w = g["frames"], g["height"], g["width"]
            g["frames"], g["height"], g["width"] = rng.choice([(h, f, w), (w, h, f), (f, w, h), (f * h, 1, w)])
        elif op == 2:
            g["text_position"] = {"end": "start", "start": "end", "none": "end"}[g["text_position"]]
        elif op == 3:
            g[rng.choice(["patch", "vae_stride"])] = rng.choice([[1, 2], [1, 2, 2, 2], [0, 2, 2], [1, 2, 99]])
        else:
            i = rng.randrange(len(meta["densities"]))
            meta["densities"][i][0][0] = float("nan") if rng.random() < 0.5 else meta["densities"][i][0][0] + 1e-3
    header, body = split(data)
    meta = meta_of(header)
    edit(meta)
    return join(header, body, raw_meta=json.dumps(meta))  # json.dumps writes NaN as NaN


def mut_amplification(data: bytes, rng: random.Random) -> bytes:
    n = rng.choice([64, 512, 2048, 4096, 16384])
    return amplification_file(n, rng.choice([2, 4, 8]), identical=rng.random() < 0.5)


MUTATORS = {
    "bytes": mut_bytes,
    "meta_field": mut_meta_field,
    "meta_field_consistent": mut_meta_field_consistent,
    "meta_text": mut_raw_meta_text,
    "header_field": mut_header_field,
    "tensor": mut_tensor,
    "mask_bits": mut_mask_bits,
    "geometry": mut_geometry,
    "amplification": mut_amplification,
}
RESTAMPED = ("meta_field", "meta_field_consistent", "meta_text", "tensor", "mask_bits", "geometry")
# Amplification files are large to build; they are a small share of the cases.
WEIGHTS = {"bytes": 3, "meta_field": 4, "meta_field_consistent": 3, "meta_text": 2, "header_field": 2, "tensor": 3,
           "mask_bits": 2, "geometry": 2, "amplification": 0.05}


# ----------------------------------------------------------------------------------------------- crafted files
def _packed_diag(blocks: int) -> np.ndarray:
    rows = np.arange(blocks)
    out = np.zeros((blocks, (blocks + 7) // 8), dtype=np.uint8)
    out[rows, rows // 8] = (0x80 >> (rows % 8)).astype(np.uint8)
    return out


def amplification_file(blocks: int, masks: int, identical: bool = True, stored_random: int = 0) -> bytes:
    """A bundle of blocks x blocks-block masks (one layer, one head, a bucket per mask; everything consistent, so
    only the size checks stand between the file and the decoder). Mask 0 is the diagonal; each next one is stored
    XORed with the previous: identical to it (what the issue measured), or with one more block (distinct
    masks, the most a file can declare per payload byte). stored_random: that many extra masks of random bits
    stored uncompressed (zlib level 0), which buys decode budget with payload."""
    from safetensors.torch import save

    block = 16
    geometry = BlockGeometry(blocks * block, block, block)
    grid = TokenGrid(1, blocks, block, patch=(1, 1, 1))
    rb = (blocks + 7) // 8
    diag = _packed_diag(blocks)
    chunks, counts, parents = [zlib.compress(diag.tobytes(), 9)], [blocks], [-1]
    zero = None
    for i in range(1, masks):
        if identical:
            zero = zero or zlib.compress(bytes(blocks * rb), 9)
            chunks.append(zero)
            counts.append(counts[-1])
        else:
            flip = np.zeros_like(diag)
            row, c = divmod(i - 1, blocks - 1)
            col = c if c < row else c + 1  # a new off-diagonal block each time
            flip[row, col // 8] = 0x80 >> (col % 8)
            chunks.append(zlib.compress(flip.tobytes(), 9))
            counts.append(counts[-1] + 1)
        parents.append(i - 1)
    rng = np.random.default_rng(0)
    for _ in range(stored_random):
        bits = rng.integers(0, 256, size=diag.shape, dtype=np.uint8) | diag
        if blocks % 8:
            bits[:, -1] &= np.uint8((0xFF << (8 - blocks % 8)) & 0xFF)
        chunks.append(zlib.compress(bits.tobytes(), 0))
        counts.append(int(np.unpackbits(bits).sum()))
        parents.append(-1)
    masks = len(chunks)
    sig = ModelSignature("generic", 1, 1, 16, 16)
    sigmas = [float(masks - i) for i in range(masks)]
    offsets = np.zeros(masks + 1, dtype=np.int64)
    np.cumsum([len(c) for c in chunks], out=offsets[1:])
    dens = [c / (blocks * blocks) for c in counts]
    mids = [(a + b) / 2 for a, b in zip(sigmas, sigmas[1:])]
    ranges = [[[mids[i] if i < masks - 1 else 0.0, mids[i - 1] if i else None]] for i in range(masks)]
    meta = {"format": FORMAT, "format_version": 1, "producer": {"package": "calibatt", "version": "0"},
            "model": {**sig.to_dict(), "fingerprint": sig.fingerprint()}, "grid": grid.to_dict(),
            "blocks": geometry.to_dict(),
            "sigmas": {"calibrated": sigmas, "step_bucket": list(range(masks)), "ranges": ranges},
            "settings": {}, "counts": {"buckets": masks, "layers": 1, "heads": 1, "unique_masks": masks,
                                       "repetition_plans": 0, "anchors_per_frame": 1},
            "density": round(float(np.mean(dens)), 6), "densities": [[[round(d, 5)]] for d in dens]}
    tensors = {"mask_payload": torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8),
               "mask_offsets": torch.from_numpy(offsets),
               "mask_parent": torch.tensor(parents, dtype=torch.int32),
               "entry_mask": torch.arange(masks, dtype=torch.int32).reshape(masks, 1, 1),
               "entry_rep": torch.full((masks, 1, 1), -1, dtype=torch.int32),
               "rep_anchors": torch.zeros(0, 1, dtype=torch.int32),
               "rep_row_anchor": torch.zeros(0, grid.frame_tokens, dtype=torch.uint8)}
    return save(tensors, metadata={"format": FORMAT, "format_version": "1", "calibatt": json.dumps(meta)})


def amplification_file_of_size(blocks: int, target_bytes: int, identical: bool = True) -> bytes:
    """An amplification file of about target_bytes (the issue's 0.3, 1.1 and 8.4 MB files: 16,384 blocks, XOR-
    identical)."""
    one = len(zlib.compress(bytes(blocks * ((blocks + 7) // 8)), 9))
    return amplification_file(blocks, max(2, target_bytes // one), identical)


# ----------------------------------------------------------------------------------------------- one case
def case_input(index: int, seed: int, tmp: Path):
    """-> (base name, mutator name, bytes) of case `index`, reproducible from (seed, index)."""
    rng = random.Random(seed * 1_000_003 + index)
    bases = base_files(tmp)
    base = rng.choice(sorted(bases))
    names = sorted(MUTATORS)
    mutator = rng.choices(names, weights=[WEIGHTS[n] for n in names])[0]
    data = MUTATORS[mutator](bases[base], rng)
    if mutator in RESTAMPED and rng.random() < 0.6:
        data = restamp(data, rng)
    return base, mutator, data


def exercise(bundle: MaskBundle, tmp: Path):
    """Every use a host makes of a loaded bundle; raises if any of them fails."""
    bundle.summary()
    bundle.step_densities()
    bundle.sigma_ranges()
    bundle.content_hash()
    bundle.check_compatible(bundle.signature, bundle.grid)
    s = bundle.calibrated_sigmas
    for sigma in [0.0, s[-1] / 2, *s, s[0] * 2, 1e30]:
        assert 0 <= bundle.bucket_for_sigma(sigma) < bundle.num_buckets
    # Skip lists of the first, middle and last bucket (a build sorts every block of a layer: ~0.4 s per bucket at
    # 4,096 x 4,096 blocks on the CPU, and crafted files reach that size).
    for b in sorted({0, bundle.num_buckets // 2, bundle.num_buckets - 1}):
        sl = bundle.skip_lists(b)
        assert int(sl.layer(0).kv_counts.min()) >= 1
        sl.head_densities()
    img = preview_images(bundle, size=16)
    assert bool(torch.isfinite(img).all())
    again = load_bundle(save_bundle(bundle, tmp / "roundtrip.safetensors"))
    assert torch.equal(again.entry_densities(), bundle.entry_densities())
    # every entry's packed mask and repetition plan, whatever numbering the writer chose
    assert torch.equal(again.packed_masks[again.entry_mask.long()], bundle.packed_masks[bundle.entry_mask.long()])
    for b in range(bundle.num_buckets):
        ra, rb = again.repetition_plan(b), bundle.repetition_plan(b)
        assert (ra is None) == (rb is None)
        if ra is not None:
            for l in range(bundle.num_layers):
                la, lb = ra.for_layer(l), rb.for_layer(l)
                assert (la is None) == (lb is None)
                if la is not None:
                    assert torch.equal(la.head_slot >= 0, lb.head_slot >= 0)
                    assert torch.equal(la.anchors[la.head_slot[la.head_slot >= 0].long()],
                                       lb.anchors[lb.head_slot[lb.head_slot >= 0].long()])
    grid = bundle.grid
    if grid.total_tokens <= 1024 and bundle.signature.head_dim <= 64:
        runner = SparseRunner(bundle)
        H, D, N = bundle.num_heads, bundle.signature.head_dim, grid.total_tokens
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, H, N, D, generator=gen) for _ in range(3))
        for layer in {0, bundle.num_layers - 1}:
            out = runner(AttentionCall(q, k, v, "bhld", H, layer, s[0], grid))
            assert out.shape == q.shape and bool(torch.isfinite(out).all())
        runner.end()


def run_case(data: bytes, tmp: Path):
    """-> (outcome, detail) for one file's bytes."""
    path = tmp / "case.safetensors"
    path.write_bytes(data)
    try:
        bundle = load_bundle(path)
    except BundleError as e:
        msg = str(e)
        if str(path) not in msg or not e.field or ";" not in msg:
            return "bad_message", msg[:300]
        return "rejected", e.field.split(".")[0].split("[")[0]
    except Exception as e:  # noqa: BLE001 - this is what the fuzz counts
        return "escaped", f"{type(e).__name__}: {str(e)[:300]}"
    try:
        exercise(bundle, tmp)
    except Exception as e:  # noqa: BLE001
        return "broken_after", f"{type(e).__name__}: {str(e)[:300]}"
    return "accepted", ""


# ----------------------------------------------------------------------------------------------- make fuzz
def _peak_rss_reset():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MB (Linux; NaN elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _worker(conn, seed: int, tmpdir: str):
    torch.set_num_threads(1)
    tmp = Path(tmpdir)
    base_files(tmp)
    conn.send(("ready",))
    while True:
        index = conn.recv()
        if index is None:
            return
        base, mutator, data = case_input(index, seed, tmp)
        conn.send(("start", base, mutator))
        _peak_rss_reset()
        before = _rss_mb("VmRSS")
        t0 = time.perf_counter()
        outcome, detail = run_case(data, tmp)
        conn.send((index, base, mutator, len(data), outcome, detail, time.perf_counter() - t0,
                   _rss_mb("VmHWM") - before))


def main(argv=None):
    import argparse
    import multiprocessing as mp
    import tempfile
    from collections import Counter

    ap = argparse.ArgumentParser(description="Fuzz the mask bundle loader; exit 1 on any failure outcome.")
    ap.add_argument("--cases", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--first", type=int, default=0, help="first case index (to reproduce one: --first I --cases 1)")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds a case may take before it counts as a hang")
    ap.add_argument("--out", help="write the counts and failures as JSON here")
    a = ap.parse_args(argv)

    ctx = mp.get_context("spawn")
    counts, per_mutator, failures = Counter(), {}, []
    worst = {"seconds": 0.0, "growth_mb": 0.0}
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="calibatt-fuzz-") as tmpdir:
        def start():
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(child, a.seed, tmpdir), daemon=True)
            p.start()
            if not parent.poll(300) or parent.recv() != ("ready",):
                raise RuntimeError("fuzz worker did not start")
            return p, parent

        proc, conn = start()
        for index in range(a.first, a.first + a.cases):
            conn.send(index)
            base = mutator = "?"
            if conn.poll(120):  # building a case (a crafted file) takes seconds at most
                try:
                    _, base, mutator = conn.recv()
                except EOFError:
                    pass
            secs, rss = a.timeout, 0.0
            if conn.poll(a.timeout):
                try:
                    _, base, mutator, size, outcome, detail, secs, rss = conn.recv()
                except EOFError:
                    outcome, detail = "crash", "worker died"
            else:
                outcome, detail = "hang", f"> {a.timeout} s"
            if outcome in ("hang", "crash") or not proc.is_alive():
                if outcome not in ("hang", "crash"):
                    outcome, detail = "crash", "worker died"
                proc.kill()
                proc.join()
                proc, conn = start()
            counts[outcome] += 1
            per_mutator.setdefault(mutator, Counter())[outcome] += 1
            worst["seconds"] = max(worst["seconds"], secs)
            worst["growth_mb"] = max(worst["growth_mb"], rss)
            if outcome in FAILURES:
                failures.append({"case": index, "base": base, "mutator": mutator, "outcome": outcome,
                                 "detail": detail})
            if (index - a.first + 1) % 1000 == 0:
                print(f"{index - a.first + 1} cases, {dict(counts)}, {time.time() - t_start:.0f} s", flush=True)
        conn.send(None)
        proc.join(10)
    elapsed = time.time() - t_start
    report = {"cases": a.cases, "seed": a.seed, "seconds": round(elapsed, 1),
              "counts": {k: counts.get(k, 0) for k in OUTCOMES},
              "per_mutator": {m: dict(c) for m, c in sorted(per_mutator.items())},
              "slowest_case_s": round(worst["seconds"], 3),
              "largest_case_memory_mb": round(worst["growth_mb"], 1),  # peak RSS over the RSS before the case
              "failures": failures[:200]}
    print(f"{a.cases} cases (seed {a.seed}) in {elapsed:.0f} s; slowest case {worst['seconds']:.2f} s; largest "
          f"memory growth in a case {worst['growth_mb']:.0f} MB")
    print("outcomes: " + ", ".join(f"{k} {counts.get(k, 0)}" for k in OUTCOMES))
    for m, c in sorted(per_mutator.items()):
        print(f"  {m:22s} " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    for f in failures[:20]:
        print("FAILURE", f)
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
