"""MaskBundle: compiled skip lists for every sigma bucket plus what they were calibrated for.

In memory a bundle keeps each distinct (layer, head) block mask once, bit-packed, and an entry table
[bucket, layer, head] -> mask id; identical masks across buckets, layers or heads cost nothing extra. Skip lists
for one bucket are built on demand, on the device that will use them. Nothing here knows about ComfyUI.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..version import __version__
from .errors import BundleError
from .geometry import ModelSignature, TokenGrid, anchor_share, key_block_density
from .packing import pack_bits, row_bytes, row_counts, unpack_bits
from .sigmas import SigmaBuckets, validate_sigmas
from .skiplists import BlockGeometry, LayerSkipList, RepetitionPlan, SkipLists, packed_to_table
from .transfer import to_device_async

FORMAT = "calibatt-mask-bundle"
FORMAT_VERSION = 1


# Elements (head x query block x key block) unpacked at once when skip_lists() builds a whole bucket: the prefix-sum
# compaction holds ~15 bytes per element (mask, positions, scatter indices), so ~120 MB at most.
_BUILD_ELEMENTS = 1 << 23


@dataclass
class MaskBundle:
    signature: ModelSignature
    grid: TokenGrid
    geometry: BlockGeometry
    calibrated_sigmas: list  # strictly decreasing, one per calibrated step
    step_bucket: list  # calibrated step -> bucket
    packed_masks: torch.Tensor  # [U, nq, ceil(nk/8)] uint8, distinct masks
    entry_mask: torch.Tensor  # [B, L, H] int32 -> row of packed_masks
    entry_rep: torch.Tensor  # [B, L, H] int32 -> row of rep_anchors, -1 if not repetitive
    rep_anchors: torch.Tensor  # [R, K] int64
    rep_row_anchor: torch.Tensor  # [R, frame_tokens] int64
    settings: dict = field(default_factory=dict)
    producer: dict = field(default_factory=lambda: {"package": "calibatt", "version": __version__})
    path: Optional[str] = None
    _cache: OrderedDict = field(default_factory=OrderedDict, repr=False, compare=False)
    _max_counts: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        validate_sigmas(self.calibrated_sigmas, self.step_bucket, self.num_buckets, self.path)
        self._buckets = SigmaBuckets(self.calibrated_sigmas, self.step_bucket)

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_packed(cls, signature: ModelSignature, grid: TokenGrid, geometry: BlockGeometry, bucket_masks,
                    calibrated_sigmas, step_bucket, *, bucket_rep=None, rep_anchors: Optional[torch.Tensor] = None,
                    rep_row_anchor: Optional[torch.Tensor] = None, settings: Optional[dict] = None) -> "MaskBundle":
        """The bundle of packed masks, as calibration makes them (no table is built on the way).

        bucket_masks: per bucket (in bucket order) [L, H, nq, ceil(nk/8)] uint8 (packing.pack_bits); the block
        diagonal is added. bucket_rep: optional per bucket None or [L, H] int, -1 for ordinary heads, else a row of
        rep_anchors [R, K] / rep_row_anchor [R, frame_tokens]. Identical masks and plans are stored once, numbered
        by first use (bucket, layer, head); plans no head uses are dropped."""
        if len(bucket_masks) == 0:
            raise BundleError("a bundle needs at least one bucket", field="buckets")
        if geometry.num_tokens != grid.video_tokens:
            raise BundleError(f"the masks cover {geometry.num_tokens} tokens; the grid has {grid.video_tokens} "
                              f"video tokens", field="blocks.num_tokens")
        L, H = signature.num_layers, signature.num_heads
        shape = (L, H, geometry.nq, row_bytes(geometry.nk))
        frame_tokens = grid.frame_tokens
        if rep_anchors is None:
            rep_anchors = torch.zeros(0, 1, dtype=torch.int64)
            rep_row_anchor = torch.zeros(0, frame_tokens, dtype=torch.int64)
        if rep_row_anchor is None or rep_row_anchor.shape[-1] != frame_tokens:
            got = None if rep_row_anchor is None else rep_row_anchor.shape[-1]
            raise BundleError(f"repetition plan uses {got}-token frames; the grid has {frame_tokens}",
                              field="repetition.frame_tokens")
        diag = pack_bits(geometry.diagonal())
        mask_ids: dict = {}
        packed: list = []
        rep_ids: dict = {}
        used_plans: list = []
        B = len(bucket_masks)
        entry_mask = torch.empty(B, L, H, dtype=torch.int32)
        entry_rep = torch.full((B, L, H), -1, dtype=torch.int32)
        for b in range(B):
            bits = bucket_masks[b].cpu()
            if tuple(bits.shape) != shape or bits.dtype != torch.uint8:
                raise BundleError(f"bucket {b}: packed masks must be uint8 {list(shape)} (layers, heads, nq, "
                                  f"ceil(nk/8)); got {bits.dtype} {list(bits.shape)}", field="buckets")
            bits = bits | diag
            for l in range(L):
                for h in range(H):
                    key = bits[l, h].numpy().tobytes()
                    mid = mask_ids.get(key)
                    if mid is None:
                        mid = mask_ids[key] = len(packed)
                        packed.append(bits[l, h])
                    entry_mask[b, l, h] = mid
            rep = bucket_rep[b] if bucket_rep is not None else None
            if rep is None:
                continue
            if tuple(rep.shape) != (L, H):
                raise BundleError(f"bucket {b}: the repetition plan covers {tuple(rep.shape)} (layers, heads); "
                                  f"the masks cover {(L, H)}", field="repetition.head_slot")
            for l, h in (rep >= 0).nonzero().tolist():
                s = int(rep[l, h])
                a, r = rep_anchors[s], rep_row_anchor[s]
                key = a.numpy().tobytes() + b"|" + r.to(torch.uint8).numpy().tobytes()
                rid = rep_ids.get(key)
                if rid is None:
                    rid = rep_ids[key] = len(used_plans)
                    used_plans.append(s)
                entry_rep[b, l, h] = rid
        K = rep_anchors.shape[1] if used_plans else 1
        idx = torch.tensor(used_plans, dtype=torch.long)
        return cls(
            signature=signature, grid=grid, geometry=geometry,
            calibrated_sigmas=[float(s) for s in calibrated_sigmas], step_bucket=[int(b) for b in step_bucket],
            packed_masks=torch.stack(packed), entry_mask=entry_mask, entry_rep=entry_rep,
            rep_anchors=rep_anchors[idx].long() if used_plans else torch.zeros(0, K, dtype=torch.int64),
            rep_row_anchor=(rep_row_anchor[idx].long() if used_plans
                            else torch.zeros(0, frame_tokens, dtype=torch.int64)),
            settings=dict(settings or {}),
        )

    @classmethod
    def from_block_masks(cls, signature: ModelSignature, grid: TokenGrid, geometry: BlockGeometry, bucket_masks,
                         calibrated_sigmas, step_bucket, *, repetition=None,
                         settings: Optional[dict] = None) -> "MaskBundle":
        """The bundle of masks written by hand (tests and tools): per bucket (in bucket order) an [L, H, nq, nk]
        bool block mask, packed straight into the bundle (the block diagonal is added). repetition: None, or per
        bucket None or a RepetitionPlan."""
        if len(bucket_masks) == 0:
            raise BundleError("a bundle needs at least one bucket", field="buckets")
        L, H = signature.num_layers, signature.num_heads
        shape = (L, H, geometry.nq, geometry.nk)
        packed, reps, anchors, rows = [], [], [], []
        plans = repetition if repetition is not None else [None] * len(bucket_masks)
        if len(plans) != len(bucket_masks):
            raise BundleError(f"{len(plans)} repetition plans for {len(bucket_masks)} buckets", field="repetition")
        for b, (mask, rep) in enumerate(zip(bucket_masks, plans)):
            if tuple(mask.shape) != shape:
                raise BundleError(f"bucket {b}: block masks must be {list(shape)} (layers, heads, nq, nk); got "
                                  f"{list(mask.shape)}", field="buckets")
            packed.append(pack_bits(mask.to(torch.bool).cpu()))
            if rep is None:
                reps.append(None)
                continue
            if rep.frame_tokens != grid.frame_tokens:
                raise BundleError(f"repetition plan uses {rep.frame_tokens}-token frames; the grid has "
                                  f"{grid.frame_tokens}", field="repetition.frame_tokens")
            if anchors and rep.anchors.shape[1] != anchors[0].shape[1]:
                raise BundleError("all repetitive heads must use the same number of anchors per frame",
                                  field="repetition.anchors")
            first = sum(a.shape[0] for a in anchors)
            reps.append(torch.where(rep.head_slot >= 0, rep.head_slot + first, rep.head_slot))
            anchors.append(rep.anchors)
            rows.append(rep.row_anchor)
        return cls.from_packed(signature, grid, geometry, packed, calibrated_sigmas, step_bucket, bucket_rep=reps,
                               rep_anchors=torch.cat(anchors) if anchors else None,
                               rep_row_anchor=torch.cat(rows) if rows else None, settings=settings)

    # ---- shape facts ------------------------------------------------------------------------------------------
    @property
    def num_buckets(self) -> int:
        return self.entry_mask.shape[0]

    @property
    def num_layers(self) -> int:
        return self.entry_mask.shape[1]

    @property
    def num_heads(self) -> int:
        return self.entry_mask.shape[2]

    @property
    def num_unique_masks(self) -> int:
        return self.packed_masks.shape[0]

    def bucket_for_sigma(self, sigma: float) -> int:
        return self._buckets.bucket_for_sigma(sigma)

    def sigma_ranges(self):
        return self._buckets.edges()

    def _mask_counts(self):
        # Row counts of every distinct mask, computed once: they size tables and give densities.
        if self._max_counts is None:
            counts = row_counts(self.packed_masks)  # [U, nq]
            self._max_counts = counts.max(-1).values
            self._block_totals = counts.sum(-1, dtype=torch.int64)
        return self._max_counts, self._block_totals

    def set_mask_counts(self, max_counts: torch.Tensor, block_totals: torch.Tensor):
        """Row statistics the loader computed while validating (saves a second pass over every mask)."""
        self._max_counts = max_counts.to(torch.int32)
        self._block_totals = block_totals.to(torch.int64)

    def max_counts(self) -> torch.Tensor:
        """[U] int32: longest row of each distinct mask (sizes padded tables without a device sync)."""
        return self._mask_counts()[0]

    def entry_densities(self) -> torch.Tensor:
        """[B, L, H] float64 fraction of key blocks computed, repetitive heads at their anchor share."""
        g = self.geometry
        totals = self._mask_counts()[1][self.entry_mask.long()]
        if not self.rep_anchors.shape[0]:
            return key_block_density(totals, g.nq, g.nk)
        share = anchor_share(g.num_tokens, self.grid.frame_tokens, self.rep_anchors.shape[1])
        return key_block_density(totals, g.nq, g.nk, self.entry_rep >= 0, share)

    @property
    def density(self) -> float:
        return float(self.entry_densities().mean())

    def step_densities(self) -> list:
        d = self.entry_densities().mean(dim=(1, 2))
        return [float(d[b]) for b in self.step_bucket]

    # ---- skip lists -------------------------------------------------------------------------------------------
    def repetition_plan(self, bucket: int) -> Optional[RepetitionPlan]:
        er = self.entry_rep[bucket]
        if not bool((er >= 0).any()):
            return None
        used = sorted(set(er[er >= 0].tolist()))
        remap = {r: i for i, r in enumerate(used)}
        slot = er.clone()
        for r, i in remap.items():
            slot[er == r] = i
        idx = torch.tensor(used, dtype=torch.long)
        return RepetitionPlan(self.grid.frame_tokens, slot, self.rep_anchors[idx], self.rep_row_anchor[idx])

    def bucket_masks(self, bucket: int, layers=None) -> torch.Tensor:
        """[len(layers), H, nq, ceil(nk/8)] uint8 on the CPU: the packed masks of one bucket (every layer by default),
        what the runner keeps on the device to build each layer's table when it runs (kernels/tables/__init__.py)."""
        self._check_bucket(bucket)
        ids = self.entry_mask[bucket].long()
        if layers is not None:
            ids = ids[torch.as_tensor(list(layers), dtype=torch.long)]
        return self.packed_masks[ids.reshape(-1)].view(ids.shape[0], self.num_heads, *self.packed_masks.shape[1:])

    def block_masks(self, bucket: int, layers=None) -> torch.Tensor:
        """[len(layers), H, nq, nk] bool on the CPU: the same masks unpacked, for previews and tools that look at
        blocks (no tables are built)."""
        return unpack_bits(self.bucket_masks(bucket, layers), self.geometry.nk)

    def layer_widths(self, bucket: int) -> list:
        """Per layer, the longest row of any head (key blocks): the width of that layer's padded table, known on the
        host so that building a table needs no device sync."""
        self._check_bucket(bucket)
        return self.max_counts()[self.entry_mask[bucket].long()].amax(-1).tolist()

    def _check_bucket(self, bucket: int):
        if not (0 <= bucket < self.num_buckets):
            raise BundleError(f"bucket {bucket} out of range [0, {self.num_buckets})", path=self.path, field="bucket")

    def skip_lists(self, bucket: int, device=None) -> SkipLists:
        """SkipLists of one bucket on `device`: every layer's padded table, built there from the packed masks. The
        last one is cached. For inspection, tests and tools; the sparse runner keeps a bucket packed and builds one
        layer's table per call instead (kernels/tables/__init__.py), which holds a small fraction of the memory."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        key = (bucket, str(device))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        self._check_bucket(bucket)
        g = self.geometry
        rep = self.repetition_plan(bucket)
        ids = self.entry_mask[bucket].long()  # [L, H]
        widths = self.layer_widths(bucket)  # host-side: no device sync
        # Several layers per unpack / table build: a build per layer costs ~10 small launches each, which at small
        # sizes (the tiny models: 6 layers, 2 ms per step) rivals the step's attention. The chunk bounds the
        # transient memory of the compaction.
        per = max(1, _BUILD_ELEMENTS // max(1, self.num_heads * g.nq * g.nk))
        layers = []
        for l0 in range(0, self.num_layers, per):
            l1 = min(self.num_layers, l0 + per)
            bits = to_device_async(self.packed_masks[ids[l0:l1].reshape(-1)], device)
            bits = bits.view(l1 - l0, self.num_heads, g.nq, -1)
            table, counts = packed_to_table(bits, g.nk, width=int(max(widths[l0:l1])))
            for i, l in enumerate(range(l0, l1)):
                lrep = rep.for_layer(l) if rep is not None else None
                layers.append(LayerSkipList(g, table[i], counts[i], lrep.to(device) if lrep is not None else None))
        sl = SkipLists(g, layers, rep)
        self._cache.clear()
        self._cache[key] = sl
        return sl

    def release(self, bucket: Optional[int] = None, device=None):
        """Drop cached device skip lists: all of them (sampling ended), or one bucket's on one device (its user
        moved on to another bucket or device)."""
        if bucket is None:
            self._cache.clear()
        else:
            self._cache.pop((bucket, str(torch.device(device) if device is not None else torch.device("cpu"))),
                            None)

    def resident(self) -> list:
        """(bucket, device) of every bucket whose skip lists this bundle holds built, oldest first."""
        return list(self._cache)

    # ---- fit checks ---------------------------------------------------------------------------------------------
    def check_compatible(self, signature: Optional[ModelSignature] = None, grid: Optional[TokenGrid] = None):
        """Raise BundleError listing every way the model / latent differs from what the bundle was made for."""
        problems = []
        if signature is not None:
            problems += self.signature.mismatches(signature)
        if grid is not None:
            problems += self.grid.mismatches(grid)
        if problems:
            made = f"{self.signature.family}, {self.signature.num_layers} layers, {self.grid.describe()}"
            raise BundleError(
                "this mask bundle does not fit: " + "; ".join(problems)
                + f". The bundle was made for {made}. Calibrate a bundle for this model and video size "
                "(Calibrate Sparse Attention), or load one made for it.",
                path=self.path, field="model" if signature is not None and self.signature.mismatches(signature)
                else "grid")

    def summary(self) -> str:
        s = self.signature
        return (f"{s.family}: {s.num_layers} layers x {s.num_heads} heads | grid {self.grid.describe()} | "
                f"{len(self.calibrated_sigmas)} steps in {self.num_buckets} sigma buckets | "
                f"blocks {self.geometry.block_q}x{self.geometry.block_k} | density {self.density:.3f} | "
                f"{self.num_unique_masks} distinct masks"
                + (f" | {int((self.entry_rep >= 0).sum())} repetitive head entries" if self.rep_anchors.shape[0]
                   else ""))

    def content_hash(self) -> str:
        h = hashlib.sha256()
        for t in (self.packed_masks, self.entry_mask, self.entry_rep, self.rep_anchors, self.rep_row_anchor):
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]
