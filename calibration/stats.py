"""CalibrationStats: what calibration keeps between prompts, sessions and machines.

Per calibrated step (identified by its sigma) and layer: a vote counter per (head, query block, key block), i.e. how
many prompts kept that block, as uint8 [H, nq, nk] (so at most 255 prompts), stored zlib-compressed. Plus, per
(step, layer, head), sums over prompts of the repetition error, the share of rows that repeat, and the mass dropped
by the block selection, and per (step, layer) how many prompts observed it. No float attention map of any prompt
is kept: a prompt contributes one bit per block (its keep mask), added to the counters when it is committed.

Budget (Wan 14B 720p: L = 40, H = 40, nq = nk = 591, 128-token blocks; S = calibrated steps):
  counters, raw       S * L * H * nq * nk bytes  = 559 MB per step (28 GB for S = 50, 11 GB for S = 20)
  counters, stored    zlib level 1; votes are mostly 0 or "all prompts", measured 4-6x smaller on banded masks
  per (step, layer)   4 float64 [H] sums + 1 int: negligible
Files: safetensors (compressed chunks as uint8 tensors, sums as float64) + JSON metadata; atomic; no pickle.
"""

from __future__ import annotations

import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..masks.atomic import atomic_write_bytes
from ..masks.geometry import ModelSignature, TokenGrid
from ..masks.sigmas import same_sigma
from ..masks.skiplists import BlockGeometry
from .settings import CalibrationSettings

STATS_FORMAT = "calibatt-calibration-stats"
STATS_VERSION = 1
MAX_PROMPTS = 255  # uint8 vote counters
# Counter chunks updated at once when a prompt is committed (each thread holds ~3 chunk-sized buffers).
COMMIT_THREADS = max(1, min(8, (os.cpu_count() or 1)))


class StatsError(ValueError):
    """A statistics file is malformed, or two runs' statistics cannot be merged."""


@dataclass
class StepRecord:
    sigma: float
    t_index: int  # position in the schedule it was first seen in (0 = noisiest)
    num_steps: int  # length of that schedule
    eps: float  # eps(t) used for its selections

    def to_dict(self):
        return {"sigma": self.sigma, "t_index": self.t_index, "num_steps": self.num_steps, "eps": self.eps}

    @classmethod
    def from_dict(cls, d):
        return cls(float(d["sigma"]), int(d["t_index"]), int(d["num_steps"]), float(d["eps"]))


class CalibrationStats:
    def __init__(self, signature: ModelSignature, grid: TokenGrid, settings: CalibrationSettings):
        self.signature = signature
        self.grid = grid
        self.settings = settings
        self.geometry = BlockGeometry(grid.video_tokens, settings.block_q, settings.block_k)
        self.steps: list = []  # StepRecord, in order of first appearance; step id = index
        self.counts: dict = {}  # (step id, layer) -> zlib bytes of uint8 [H, nq, nk]
        self.observed: list = []  # per step: int64 [L] prompts that observed (step, layer)
        self.rep_err: list = []  # per step: float64 [L, H] sum over prompts
        self.rep_frac: list = []
        self.drop: list = []
        self.num_prompts = 0
        self.prompt_keys: list = []

    # ---- shape facts ----------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.signature.num_layers

    @property
    def num_heads(self) -> int:
        return self.signature.num_heads

    @property
    def chunk_shape(self):
        return (self.num_heads, self.geometry.nq, self.geometry.nk)

    @property
    def chunk_bytes(self) -> int:
        H, nq, nk = self.chunk_shape
        return H * nq * nk

    def raw_nbytes(self) -> int:
        """What the counters would take uncompressed."""
        return len(self.counts) * self.chunk_bytes

    def nbytes(self) -> int:
        """Bytes actually held (compressed counters + per-head sums)."""
        small = sum(t.numel() * t.element_size() for lst in (self.observed, self.rep_err, self.rep_frac, self.drop)
                    for t in lst)
        return sum(len(c) for c in self.counts.values()) + small

    # ---- steps ----------------------------------------------------------------------------------------------
    def find_step(self, sigma: float) -> Optional[int]:
        for i, st in enumerate(self.steps):
            if same_sigma(st.sigma, sigma):
                return i
        return None

    def add_step(self, rec: StepRecord) -> int:
        L, H = self.num_layers, self.num_heads
        self.steps.append(rec)
        self.observed.append(torch.zeros(L, dtype=torch.int64))
        for lst in (self.rep_err, self.rep_frac, self.drop):
            lst.append(torch.zeros(L, H, dtype=torch.float64))
        return len(self.steps) - 1

    def step_order(self) -> list:
        """Step ids, noisiest (largest sigma) first."""
        return sorted(range(len(self.steps)), key=lambda i: -self.steps[i].sigma)

    # ---- counters -------------------------------------------------------------------------------------------
    def get_counts(self, step: int, layer: int) -> Optional[np.ndarray]:
        blob = self.counts.get((step, layer))
        if blob is None:
            return None
        raw = zlib.decompress(blob)
        if len(raw) != self.chunk_bytes:
            raise StatsError(f"vote counters of step {step} layer {layer} hold {len(raw)} bytes, expected "
                             f"{self.chunk_bytes}: the statistics are corrupt; recalibrate or load another file")
        return np.frombuffer(bytearray(raw), dtype=np.uint8).reshape(self.chunk_shape)

    def _added(self, step: int, layer: int, votes) -> bytes:
        """The compressed counters of (step, layer) plus votes (uint8 [H, nq, nk], or a callable making them)."""
        votes = votes() if callable(votes) else votes
        cur = self.get_counts(step, layer)
        if cur is None:
            new = votes.astype(np.uint8, copy=False)
        else:
            s = cur.astype(np.uint16) + votes
            if int(s.max(initial=0)) > 255:
                raise StatsError(f"more than {MAX_PROMPTS} prompts voted for one block; the counters are uint8. "
                                 "Calibrate with fewer prompts (the method needs 16-64)")
            new = s.astype(np.uint8)
        return zlib.compress(np.ascontiguousarray(new, dtype=np.uint8).tobytes(), 1)

    def add_votes(self, step: int, layer: int, votes: np.ndarray):
        """votes: uint8 [H, nq, nk] (0/1 for one prompt, or another run's counters: parallel/calibration.py merges
        the ranks' statistics through it)."""
        self.counts[(step, layer)] = self._added(step, layer, votes)

    def _add_many(self, items):
        """[(step, layer, votes or a callable returning them)], distinct keys: decompress-add-recompress in
        parallel (zlib and numpy release the GIL), then store all at once."""
        if len(items) > 1 and COMMIT_THREADS > 1:
            with ThreadPoolExecutor(max_workers=min(COMMIT_THREADS, len(items))) as ex:
                blobs = list(ex.map(lambda it: self._added(*it), items))
        else:
            blobs = [self._added(*it) for it in items]
        for (sid, layer, _), blob in zip(items, blobs):
            self.counts[(sid, layer)] = blob

    # ---- commit / merge -------------------------------------------------------------------------------------
    def commit_prompt(self, record: dict, key: Optional[str] = None):
        """record: {sigma: {"t_index", "num_steps", "eps", "layers": {layer: {"bits": uint8 [H, nq, nkb] numpy,
        "rep_err", "rep_frac", "drop": float64 [H] numpy}}}} for one whole prompt."""
        if self.num_prompts >= MAX_PROMPTS:
            raise StatsError(f"statistics already hold {MAX_PROMPTS} prompts, the most uint8 counters allow")
        nk = self.geometry.nk
        bits: dict = {}
        for sigma, st in record.items():
            sid = self.find_step(sigma)
            if sid is None:
                sid = self.add_step(StepRecord(float(sigma), int(st["t_index"]), int(st["num_steps"]),
                                               float(st["eps"])))
            for layer, lr in st["layers"].items():
                if (sid, layer) in bits:  # two of the prompt's sigmas matched one step: one vote, the union
                    bits[(sid, layer)] = bits[(sid, layer)] | lr["bits"]
                    continue
                bits[(sid, layer)] = lr["bits"]
                self.observed[sid][layer] += 1
                self.rep_err[sid][layer] += torch.from_numpy(lr["rep_err"])
                self.rep_frac[sid][layer] += torch.from_numpy(lr["rep_frac"])
                self.drop[sid][layer] += torch.from_numpy(lr["drop"])
        self._add_many([(sid, layer, lambda b=b: np.unpackbits(b, axis=-1, count=nk))
                        for (sid, layer), b in bits.items()])
        self.num_prompts += 1
        if key is not None:
            self.prompt_keys.append(str(key))

    def compatibility_problems(self, other: "CalibrationStats") -> list:
        out = []
        out += [f"model: {m}" for m in self.signature.mismatches(other.signature)]
        out += [f"grid: {m}" for m in self.grid.mismatches(other.grid, text=False)]
        a, b = self.settings.selection_key(), other.settings.selection_key()
        out += [f"setting {k}: {a[k]} here, {b[k]} in the other run" for k in sorted(a) if a[k] != b[k]]
        return out

    def merge(self, other: "CalibrationStats"):
        """Add another run's statistics (same model, grid and selection settings); steps are matched by sigma."""
        problems = self.compatibility_problems(other)
        if problems:
            raise StatsError("cannot merge calibration statistics: " + "; ".join(problems)
                             + ". Merge only runs made with the same model, video size and eps/block settings")
        if self.num_prompts + other.num_prompts > MAX_PROMPTS:
            raise StatsError(f"merging would hold {self.num_prompts + other.num_prompts} prompts; the most is "
                             f"{MAX_PROMPTS}")
        dup = sorted(set(self.prompt_keys) & set(other.prompt_keys))
        if dup:
            raise StatsError(f"both runs contain prompt(s) {dup[:5]}: merging would count them twice")
        for osid, st in enumerate(other.steps):
            sid = self.find_step(st.sigma)
            if sid is None:
                sid = self.add_step(StepRecord(st.sigma, st.t_index, st.num_steps, st.eps))
            self._add_many([(sid, layer, lambda o=osid, l=layer: other.get_counts(o, l))
                            for layer in range(self.num_layers) if (osid, layer) in other.counts])
            self.observed[sid] += other.observed[osid]
            self.rep_err[sid] += other.rep_err[osid]
            self.rep_frac[sid] += other.rep_frac[osid]
            self.drop[sid] += other.drop[osid]
        self.num_prompts += other.num_prompts
        self.prompt_keys += list(other.prompt_keys)

    def copy(self) -> "CalibrationStats":
        out = CalibrationStats(self.signature, self.grid, self.settings)
        out.steps = [StepRecord(**s.to_dict()) for s in self.steps]
        out.counts = dict(self.counts)  # bytes are immutable
        for name in ("observed", "rep_err", "rep_frac", "drop"):
            setattr(out, name, [t.clone() for t in getattr(self, name)])
        out.num_prompts = self.num_prompts
        out.prompt_keys = list(self.prompt_keys)
        return out

    # ---- files ----------------------------------------------------------------------------------------------
    def save(self, path) -> Path:
        """safetensors + JSON metadata, written atomically (temp file, fsync, rename)."""
        from safetensors.torch import save as st_save

        path = Path(path)
        S, L, H = len(self.steps), self.num_layers, self.num_heads
        tensors = {}
        chunks = []
        for (sid, layer), blob in sorted(self.counts.items()):
            name = f"counts.{sid}.{layer}"
            tensors[name] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
            chunks.append([sid, layer])
        if S:
            tensors["observed"] = torch.stack(self.observed).contiguous()
            for name in ("rep_err", "rep_frac", "drop"):
                tensors[name] = torch.stack(getattr(self, name)).contiguous()
        meta = {"format": STATS_FORMAT, "format_version": STATS_VERSION, "signature": self.signature.to_dict(),
                "grid": self.grid.to_dict(), "settings": self.settings.to_dict(),
                "steps": [s.to_dict() for s in self.steps], "num_prompts": self.num_prompts,
                "prompt_keys": self.prompt_keys, "chunks": chunks, "compression": "zlib",
                "shape": {"steps": S, "layers": L, "heads": H, "nq": self.geometry.nq, "nk": self.geometry.nk}}
        blob = st_save(tensors, metadata={"format": STATS_FORMAT, "calibatt": json.dumps(meta)})
        atomic_write_bytes(path, blob)
        return path

    @classmethod
    def load(cls, path) -> "CalibrationStats":
        from safetensors import safe_open

        path = Path(path)

        def fail(field, msg):
            raise StatsError(f"{path}: [{field}] {msg}; recalibrate, or pass a file written by CalibrationStats.save")

        if not path.is_file():
            raise StatsError(f"{path}: no such calibration statistics file")
        try:
            f = safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors raises its own error types
            fail("header", f"not a safetensors file ({e})")
        with f:
            st_meta = f.metadata() or {}
            if st_meta.get("format") != STATS_FORMAT:
                fail("format", f"format is {st_meta.get('format')!r}, not '{STATS_FORMAT}'")
            try:
                meta = json.loads(st_meta["calibatt"])
            except (KeyError, json.JSONDecodeError) as e:
                fail("calibatt", f"metadata missing or not JSON ({e})")
            if meta.get("format_version") != STATS_VERSION:
                fail("format_version", f"version {meta.get('format_version')!r}, this package reads {STATS_VERSION}")
            try:
                out = cls(ModelSignature.from_dict(meta["signature"]), TokenGrid.from_dict(meta["grid"]),
                          CalibrationSettings.from_dict(meta["settings"]))
                steps = [StepRecord.from_dict(s) for s in meta["steps"]]
            except (KeyError, TypeError, ValueError) as e:
                fail("signature/grid/settings/steps", f"invalid ({e})")
            S, L, H = len(steps), out.num_layers, out.num_heads
            names = set(f.keys())
            for s in steps:
                out.add_step(s)
            if S:
                expect = {"observed": ((S, L), torch.int64), "rep_err": ((S, L, H), torch.float64),
                          "rep_frac": ((S, L, H), torch.float64), "drop": ((S, L, H), torch.float64)}
                for name, (shape, dtype) in expect.items():
                    if name not in names:
                        fail(name, "missing")
                    t = f.get_tensor(name)
                    if tuple(t.shape) != shape or t.dtype != dtype:
                        fail(name, f"is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}")
                    setattr(out, name, [x.clone() for x in t])
            for sid, layer in meta.get("chunks", []):
                name = f"counts.{sid}.{layer}"
                if not (0 <= sid < S and 0 <= layer < L) or name not in names:
                    fail(name, "vote counter chunk missing or out of range")
                out.counts[(int(sid), int(layer))] = f.get_tensor(name).numpy().tobytes()
            out.num_prompts = int(meta.get("num_prompts", 0))
            out.prompt_keys = [str(k) for k in meta.get("prompt_keys", [])]
        # Chunks are decoded (size and zlib checksum checked) when used, not here: at 720p that is minutes of CPU.
        return out
