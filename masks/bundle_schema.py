"""The bundle file's JSON, checked strictly before anything is built from it.

Every field has a type, a range and (for lists) a length; objects of the format refuse unknown keys (a typo is an
error, never a silent default) and report missing ones; geometry fields must agree with each other (grid vs blocks,
counts vs model, fingerprint vs model, sigma ranges vs sigmas). JSON itself is parsed with NaN / Infinity, integers
of more than 19 digits, duplicate keys and deep nesting refused. Any failure is a BundleError naming the file, the
field and the fix; nothing else escapes.

`settings` is the calibration record (shown to users, never read by the engine): any JSON object of limited depth
and size, with its block sizes and step count, where present, agreeing with the bundle.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import bundle_limits as lim
from .bundle import FORMAT, FORMAT_VERSION
from .errors import BundleError
from .geometry import KNOWN_FAMILIES, TEXT_POSITIONS, ModelSignature, TokenGrid
from .signatures import current
from .sigmas import SigmaBuckets, validate_sigmas
from .skiplists import BlockGeometry

FIX_RECREATE = "re-create it with Calibrate Sparse Attention or download it again"
FIX_UPDATE = "update the calibatt custom nodes"

_MAX_INT_DIGITS = 19  # int64
_SETTINGS_DEPTH = 4
_SETTINGS_NODES = 20000
_MAX_STR = 1024
_MAX_KEY = 128


def fail(path, field, msg, fix=FIX_RECREATE):
    raise BundleError(f"{msg}; {fix}" if fix else msg, path=path, field=field)


class _Refused(ValueError):
    """Raised by the JSON hooks; turned into a BundleError for the field being parsed."""


def _parse_int(s: str) -> int:
    if len(s.lstrip("-")) > _MAX_INT_DIGITS:
        raise _Refused(f"an integer of {len(s.lstrip('-'))} digits (at most {_MAX_INT_DIGITS})")
    return int(s)


def _parse_float(s: str) -> float:
    if len(s) > 64:
        raise _Refused(f"a number written with {len(s)} characters")
    x = float(s)
    if not math.isfinite(x):
        raise _Refused(f"the number {s[:32]} overflows")
    return x


def _parse_constant(s: str):
    raise _Refused(f"{s} (JSON has no NaN or Infinity)")


def _pairs(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _Refused(f"the key {k[:64]!r} twice")
        out[k] = v
    return out


def parse_json(text, path, field: str, what: str):
    """Strict json.loads of `text` (str, or UTF-8 bytes); any problem is a BundleError for `field`."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            fail(path, field, f"{what} is not UTF-8 text")
    if not isinstance(text, str):
        fail(path, field, f"{what} must be a JSON string, got {type(text).__name__}")
    try:
        value = json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant,
                           object_pairs_hook=_pairs)
    except _Refused as e:
        fail(path, field, f"{what} contains {e}")
    except RecursionError:  # the C decoder counts its nesting against the interpreter's recursion limit
        fail(path, field, f"{what} is nested too deeply")
    except ValueError as e:  # JSONDecodeError and anything the decoder refuses
        fail(path, field, f"{what} is not valid JSON ({str(e)[:120]})")
    return value


# ------------------------------------------------------------------------------------------------ field checks
class _Fields:
    def __init__(self, path):
        self.path = path

    def fail(self, field, msg, fix=FIX_RECREATE):
        raise BundleError(f"{msg}; {fix}" if fix else msg, path=self.path, field=field)  # the module's fail()

    def obj(self, v, field: str, keys: tuple) -> dict:
        if not isinstance(v, dict):
            self.fail(field, f"must be a JSON object, got {_kind(v)}")
        unknown = [k for k in v if k not in keys]
        if unknown:
            self.fail(f"{field}.{unknown[0]}"[:200], f"unknown key {unknown[0][:64]!r} (known: {', '.join(keys)}): a "
                      "typo, or a bundle from a newer version", f"{FIX_RECREATE}, or {FIX_UPDATE}")
        for k in keys:
            if k not in v:
                self.fail(f"{field}.{k}", "missing")
        return v

    def integer(self, v, field: str, lo: int, hi: int) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(field, f"must be an integer, got {_show(v)}")
        if not lo <= v <= hi:
            self.fail(field, f"{v} is outside the allowed range [{lo}, {hi}]")
        return v

    def number(self, v, field: str, lo: float, hi: float) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.fail(field, f"must be a number, got {_show(v)}")
        x = float(v)
        if not (math.isfinite(x) and lo <= x <= hi):
            self.fail(field, f"{x} is outside the allowed range [{lo}, {hi}]")
        return x

    def text(self, v, field: str, max_len: int = 64, choices=None) -> str:
        if not isinstance(v, str):
            self.fail(field, f"must be a string, got {_show(v)}")
        if len(v) > max_len:
            self.fail(field, f"is {len(v)} characters long (at most {max_len})")
        if not v.isprintable() and any(ord(c) < 32 or 0xD800 <= ord(c) <= 0xDFFF for c in v):
            self.fail(field, "contains control characters or unpaired surrogates")
        if choices is not None and v not in choices:
            self.fail(field, f"{v!r} is not one of {', '.join(choices)}",
                      FIX_UPDATE if field == "model.family" else FIX_RECREATE)
        return v

    def array(self, v, field: str, lo: int, hi: int) -> list:
        if not isinstance(v, list):
            self.fail(field, f"must be a list, got {_show(v)}")
        if not lo <= len(v) <= hi:
            self.fail(field, f"has {len(v)} entries (allowed {lo}..{hi})")
        return v

    def triple(self, v, field: str) -> tuple:
        v = self.array(v, field, 3, 3)
        return tuple(self.integer(x, f"{field}[{i}]", 1, lim.MAX_PATCH) for i, x in enumerate(v))

    def scalar(self, v, field: str):
        if v is None or isinstance(v, bool):
            return v
        if isinstance(v, int):
            return self.integer(v, field, -(1 << 63), (1 << 63) - 1)
        if isinstance(v, float):
            return v  # finite: the parser refuses NaN / Infinity
        if isinstance(v, str):
            return self.text(v, field, _MAX_STR)
        self.fail(field, f"must be a string, number, boolean or null, got {_kind(v)}")

    def tree(self, v, field: str, depth: int, budget: list):
        """A JSON value of limited depth and size (the settings record)."""
        budget[0] -= 1
        if budget[0] < 0:
            self.fail(field, f"has more than {_SETTINGS_NODES} values")
        if isinstance(v, dict):
            if depth <= 0:
                self.fail(field, f"nested more than {_SETTINGS_DEPTH} levels deep")
            for k, x in v.items():
                self.text(k, f"{field} key", _MAX_KEY)
                self.tree(x, f"{field}.{k}", depth - 1, budget)
        elif isinstance(v, list):
            if depth <= 0:
                self.fail(field, f"nested more than {_SETTINGS_DEPTH} levels deep")
            for i, x in enumerate(v):
                self.tree(x, f"{field}[{i}]", depth - 1, budget)
        else:
            self.scalar(v, field)


def _kind(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number")


def _show(v) -> str:
    if isinstance(v, (dict, list)):
        return _kind(v)
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


# ------------------------------------------------------------------------------------------------ the document
@dataclass
class BundleMeta:
    """What the metadata declares, every field checked and consistent."""

    version: int
    signature: ModelSignature
    grid: TokenGrid
    geometry: BlockGeometry
    buckets: int
    layers: int
    heads: int
    unique_masks: int
    repetition_plans: int
    anchors_per_frame: int
    calibrated_sigmas: list
    step_bucket: list
    settings: dict
    producer: dict
    density: float
    densities: np.ndarray  # [B, L, H] float64
    text: str  # the metadata document as stored (the digest covers it)
    digest: Optional[str]  # "blake2b-128:<hex>" of the document and the tensors; absent in files before 0.x


_TOP = ("format", "format_version", "producer", "model", "grid", "blocks", "sigmas", "settings", "counts", "density",
        "densities")
_MODEL = ("family", "num_layers", "num_heads", "head_dim", "dim", "extra", "fingerprint")
_GRID = ("frames", "height", "width", "patch", "order", "text_tokens", "text_position", "vae_stride")
_BLOCKS = ("num_tokens", "block_q", "block_k", "nq", "nk")
_SIGMAS = ("calibrated", "step_bucket", "ranges")
_COUNTS = ("buckets", "layers", "heads", "unique_masks", "repetition_plans", "anchors_per_frame")
_PRODUCER = ("package", "version")
_ST_META = ("format", "format_version", "calibatt", "digest")
DIGEST_PREFIX = "blake2b-128:"


def read_metadata(path, header: dict) -> BundleMeta:
    """Check the safetensors `__metadata__` and the bundle document in it; -> BundleMeta."""
    f = _Fields(path)
    st_meta = header.get("__metadata__")
    if not isinstance(st_meta, dict) or st_meta.get("format") != FORMAT:
        got = st_meta.get("format") if isinstance(st_meta, dict) else None
        f.fail("format", f"format is {_show(got)}, not '{FORMAT}': this safetensors file is not a mask bundle "
                         "(a model checkpoint?)", "put only mask bundles in models/sparse_attention/")
    digest = st_meta.get("digest")
    f.obj(st_meta if digest is not None else dict(st_meta, digest=""), "__metadata__", _ST_META)
    for k in _ST_META:
        if k in st_meta and not isinstance(st_meta[k], str):
            f.fail(f"__metadata__.{k}", f"safetensors metadata values must be strings, got {_show(st_meta[k])}")
    v = st_meta["format_version"]
    if not (v.isascii() and v.isdigit() and 0 < len(v) <= 6):
        f.fail("format_version", f"format_version {_show(v)} is not a positive integer")
    version = int(v)
    if digest is not None and not (digest.startswith(DIGEST_PREFIX) and len(digest) == len(DIGEST_PREFIX) + 32
                                   and all(c in "0123456789abcdef" for c in digest[len(DIGEST_PREFIX):])):
        f.fail("digest", f"digest {_show(digest)} is not '{DIGEST_PREFIX}' and 32 hex digits")
    if version > FORMAT_VERSION:
        f.fail("format_version", f"bundle format version {version} is newer than this package reads "
                                 f"({FORMAT_VERSION})", FIX_UPDATE)
    if version < 1:
        f.fail("format_version", f"format_version {version} is invalid")
    meta = parse_json(st_meta["calibatt"], path, "calibatt", "bundle metadata")
    if not isinstance(meta, dict):
        f.fail("calibatt", f"bundle metadata must be a JSON object, got {_kind(meta)}")
    if meta.get("format") != FORMAT or type(meta.get("format_version")) is not int \
            or meta["format_version"] != version:
        f.fail("calibatt.format", "format fields of the header and the bundle metadata disagree")
    f.obj(meta, "calibatt", _TOP)

    # counts first: they bound everything else
    c = f.obj(meta["counts"], "counts", _COUNTS)
    L = f.integer(c["layers"], "counts.layers", 1, lim.MAX_LAYERS)
    H = f.integer(c["heads"], "counts.heads", 1, lim.MAX_HEADS)
    B = f.integer(c["buckets"], "counts.buckets", 1, lim.MAX_STEPS)
    if B * L * H > lim.MAX_ENTRIES:
        f.fail("counts", f"{B} buckets x {L} layers x {H} heads = {B * L * H} entries exceed {lim.MAX_ENTRIES}")
    U = f.integer(c["unique_masks"], "counts.unique_masks", 1, B * L * H)
    R = f.integer(c["repetition_plans"], "counts.repetition_plans", 0, B * L * H)
    K = f.integer(c["anchors_per_frame"], "counts.anchors_per_frame", 1, lim.MAX_ANCHORS)

    producer = f.obj(meta["producer"], "producer", _PRODUCER)
    producer = {k: f.text(producer[k], f"producer.{k}") for k in _PRODUCER}

    m = f.obj(meta["model"], "model", _MODEL)
    family = f.text(m["family"], "model.family", 32, KNOWN_FAMILIES)
    extra = m["extra"]
    if not isinstance(extra, dict) or len(extra) > 32:
        f.fail("model.extra", "must be a JSON object of at most 32 entries")
    for k, x in extra.items():
        f.text(k, "model.extra key", _MAX_KEY)
        f.scalar(x, f"model.extra.{k}")
    signature = ModelSignature(family, f.integer(m["num_layers"], "model.num_layers", 1, lim.MAX_LAYERS),
                               f.integer(m["num_heads"], "model.num_heads", 1, lim.MAX_HEADS),
                               f.integer(m["head_dim"], "model.head_dim", 1, lim.MAX_HEAD_DIM),
                               f.integer(m["dim"], "model.dim", 1, lim.MAX_DIM), dict(extra))
    if (signature.num_layers, signature.num_heads) != (L, H):
        f.fail("model", f"model says {signature.num_layers} layers x {signature.num_heads} heads but the masks "
                        f"cover {L} x {H}")
    if f.text(m["fingerprint"], "model.fingerprint") != signature.fingerprint():
        f.fail("model.fingerprint", "the model fields do not match their fingerprint (file edited?)")
    # Read as today's builders make it for the same model, so files written by older versions still fit (the
    # stored fields were checked against the stored fingerprint above).
    signature = current(signature)

    g = f.obj(meta["grid"], "grid", _GRID)
    frames = f.integer(g["frames"], "grid.frames", 1, lim.MAX_GRID_SIDE)
    height = f.integer(g["height"], "grid.height", 1, lim.MAX_GRID_SIDE)
    width = f.integer(g["width"], "grid.width", 1, lim.MAX_GRID_SIDE)
    if height * width > lim.MAX_FRAME_TOKENS:
        f.fail("grid", f"frame of {height * width} tokens exceeds the cap {lim.MAX_FRAME_TOKENS}")
    text_tokens = f.integer(g["text_tokens"], "grid.text_tokens", 0, lim.MAX_TEXT_TOKENS)
    text_position = f.text(g["text_position"], "grid.text_position", 16, TEXT_POSITIONS)
    if (text_tokens > 0) != (text_position != "none"):
        f.fail("grid.text_tokens", f"{text_tokens} text tokens with text_position '{text_position}' (text tokens "
                                   "need 'end' or 'start', none need 'none')")
    grid = TokenGrid(frames=frames, height=height, width=width, patch=f.triple(g["patch"], "grid.patch"),
                     order=f.text(g["order"], "grid.order", 16, ("thw",)), text_tokens=text_tokens,
                     text_position=text_position, vae_stride=f.triple(g["vae_stride"], "grid.vae_stride"))

    b = f.obj(meta["blocks"], "blocks", _BLOCKS)
    num_tokens = f.integer(b["num_tokens"], "blocks.num_tokens", 1, lim.MAX_BLOCKS * lim.MAX_BLOCK_SIZE)
    bq = f.integer(b["block_q"], "blocks.block_q", 1, lim.MAX_BLOCK_SIZE)
    bk = f.integer(b["block_k"], "blocks.block_k", 1, lim.MAX_BLOCK_SIZE)
    if grid.video_tokens != num_tokens:
        f.fail("grid", f"grid has {grid.video_tokens} video tokens but blocks.num_tokens is {num_tokens}")
    geometry = BlockGeometry(num_tokens, bq, bk)
    if geometry.nq > lim.MAX_BLOCKS or geometry.nk > lim.MAX_BLOCKS:
        f.fail("blocks", f"{geometry.nq}x{geometry.nk} blocks exceeds the cap of {lim.MAX_BLOCKS} per side")
    if H * geometry.nq * geometry.nk > lim.MAX_LAYER_BLOCKS:
        f.fail("blocks", f"{H} heads x {geometry.nq} x {geometry.nk} blocks per layer exceed {lim.MAX_LAYER_BLOCKS}")
    if (f.integer(b["nq"], "blocks.nq", 1, lim.MAX_BLOCKS), f.integer(b["nk"], "blocks.nk", 1, lim.MAX_BLOCKS)) != \
            (geometry.nq, geometry.nk):
        f.fail("blocks.nq", f"block counts {b['nq']}x{b['nk']} disagree with num_tokens / block sizes "
                            f"({geometry.nq}x{geometry.nk})")

    s = f.obj(meta["sigmas"], "sigmas", _SIGMAS)
    calibrated = [f.number(x, f"sigmas.calibrated[{i}]", 0.0, lim.MAX_SIGMA)
                  for i, x in enumerate(f.array(s["calibrated"], "sigmas.calibrated", 1, lim.MAX_STEPS))]
    step_bucket = [f.integer(x, f"sigmas.step_bucket[{i}]", 0, B - 1)
                   for i, x in enumerate(f.array(s["step_bucket"], "sigmas.step_bucket", 1, lim.MAX_STEPS))]
    try:
        validate_sigmas(calibrated, step_bucket, B)
    except BundleError as e:
        f.fail(e.field, e.message)
    _check_ranges(f, s["ranges"], calibrated, step_bucket, B)

    settings = meta["settings"]
    if not isinstance(settings, dict):
        f.fail("settings", f"must be a JSON object, got {_kind(settings)}")
    f.tree(settings, "settings", _SETTINGS_DEPTH, [_SETTINGS_NODES])
    _check_settings(f, settings, geometry, len(calibrated))

    density = f.number(meta["density"], "density", 0.0, 1.0)
    dens = f.array(meta["densities"], "densities", B, B)
    try:
        densities = np.array(dens)
    except (TypeError, ValueError, OverflowError):
        densities = None
    if densities is None or densities.dtype.kind not in "fi" or densities.shape != (B, L, H):
        f.fail("densities", f"per-entry densities must be a [{B}][{L}][{H}] array of numbers")
    densities = densities.astype(np.float64)
    if not bool(((densities >= 0) & (densities <= 1)).all()):
        f.fail("densities", f"per-entry densities must be a [{B}][{L}][{H}] array of numbers in [0, 1]")
    return BundleMeta(version, signature, grid, geometry, B, L, H, U, R, K, calibrated, step_bucket, dict(settings),
                      producer, density, densities, st_meta["calibatt"], digest)


def _check_ranges(f: _Fields, ranges, calibrated, step_bucket, B):
    want = SigmaBuckets(calibrated, step_bucket).edges()
    ranges = f.array(ranges, "sigmas.ranges", B, B)
    for bi, (got, exp) in enumerate(zip(ranges, want)):
        got = f.array(got, f"sigmas.ranges[{bi}]", len(exp), len(exp))
        for i, (pair, (lo, hi)) in enumerate(zip(got, exp)):
            pair = f.array(pair, f"sigmas.ranges[{bi}][{i}]", 2, 2)
            glo = f.number(pair[0], f"sigmas.ranges[{bi}][{i}]", 0.0, lim.MAX_SIGMA)
            ghi = math.inf if pair[1] is None else f.number(pair[1], f"sigmas.ranges[{bi}][{i}]", 0.0, lim.MAX_SIGMA)
            if not (_close(glo, lo) and _close(ghi, hi)):
                f.fail("sigmas.ranges", f"bucket {bi}'s sigma range ({glo}, {ghi}] disagrees with the calibrated "
                                        f"sigmas ({lo}, {hi}] (file edited?)")


def _close(a: float, b: float) -> bool:
    return a == b or (math.isfinite(a) and math.isfinite(b) and abs(a - b) <= 1e-9 * max(1.0, abs(b)))


def _check_settings(f: _Fields, settings: dict, geometry: BlockGeometry, steps: int):
    """Where the calibration record states block sizes or a step count, they must be the bundle's."""
    cal = settings.get("calibration")
    if isinstance(cal, dict):
        for key, want in (("block_q", geometry.block_q), ("block_k", geometry.block_k)):
            if key in cal and cal[key] != want:
                f.fail(f"settings.calibration.{key}", f"the calibration used {key} {_show(cal[key])} but the blocks "
                                                      f"say {want} (file edited?)")
    if "steps" in settings and settings["steps"] != steps:
        f.fail("settings.steps", f"the calibration record says {_show(settings['steps'])} steps but the bundle "
                                 f"has {steps} calibrated sigmas (file edited?)")
