"""Skip lists: the run-time form of one sigma bucket's block masks, what the reference and the Triton kernel read.

Calibration hands the bundle bit-packed masks (MaskBundle.from_packed) and the bundle stores those; skip lists are
built from them on the device that runs them (kernels/tables for the runner, MaskBundle.skip_lists for tools and
tests). Per (layer, head) and query block they list the key blocks to compute as a padded index table plus a count,
which is the layout the kernel walks. Padding repeats the last valid index so a stray read stays in bounds; readers
use the count. RowTables (which rows each kernel launch writes) are derived from the repetition plan in to(device).

Repetition plans live beside the block lists: for a repetitive (layer, head) only a few anchor rows per frame are
computed (against every key) and each other row of the frame takes its anchor's output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .errors import BundleError
from .geometry import anchor_share, key_block_density, num_blocks
from .packing import unpack_bits
from .transfer import to_device_async


@dataclass(frozen=True)
class BlockGeometry:
    """Block tiling of the masked (video) part of the sequence. The last block may be partial."""

    num_tokens: int
    block_q: int
    block_k: int

    def __post_init__(self):
        if self.num_tokens <= 0 or self.block_q <= 0 or self.block_k <= 0:
            raise BundleError(f"block geometry must be positive: {self}", field="blocks")

    @property
    def nq(self) -> int:
        return num_blocks(self.num_tokens, self.block_q)

    @property
    def nk(self) -> int:
        return num_blocks(self.num_tokens, self.block_k)

    def diagonal(self, device=None) -> torch.Tensor:
        """[nq, nk] bool: key blocks that share tokens with each query block (its own diagonal)."""
        q0 = torch.arange(self.nq, device=device) * self.block_q
        q1 = torch.clamp(q0 + self.block_q, max=self.num_tokens)
        k0 = torch.arange(self.nk, device=device) * self.block_k
        k1 = torch.clamp(k0 + self.block_k, max=self.num_tokens)
        return (k0[None, :] < q1[:, None]) & (q0[:, None] < k1[None, :])

    def to_dict(self) -> dict:
        return {"num_tokens": self.num_tokens, "block_q": self.block_q, "block_k": self.block_k,
                "nq": self.nq, "nk": self.nk}


@dataclass
class LayerRepetition:
    """Repetition plan of one layer. head_slot[h] = -1 for ordinary heads, else a row of anchors/row_anchor."""

    frame_tokens: int
    head_slot: torch.Tensor  # [H] int32
    anchors: torch.Tensor  # [R, K] int64, anchor positions inside a frame
    row_anchor: torch.Tensor  # [R, frame_tokens] int64, anchor slot (0..K-1) of every in-frame position
    # The same plan on the CPU when this one was copied to a device from there: kernels read which heads are
    # repetitive from it instead of reading the device copy back (a host sync).
    host: Optional["LayerRepetition"] = field(default=None, repr=False, compare=False)

    def to(self, device) -> "LayerRepetition":
        device = torch.device(device)
        if device.type == "cpu" and self.head_slot.device.type == "cpu":
            return self
        host = self.host if self.host is not None else (self if self.head_slot.device.type == "cpu" else None)
        return LayerRepetition(self.frame_tokens, to_device_async(self.head_slot, device),
                               to_device_async(self.anchors, device), to_device_async(self.row_anchor, device), host)

    def on_host(self) -> "LayerRepetition":
        """This plan on the CPU: the kept host copy, else a copy (a host sync when this one is on a GPU)."""
        if self.host is not None:
            return self.host
        if self.head_slot.device.type == "cpu":
            return self
        return LayerRepetition(self.frame_tokens, self.head_slot.cpu(), self.anchors.cpu(), self.row_anchor.cpu())

    def without_heads(self, heads: torch.Tensor) -> "LayerRepetition":
        """A CPU copy in which the heads marked in `heads` ([H] bool, CPU) are not repetitive."""
        plan = self.on_host()
        slot = torch.where(heads.to(torch.bool), torch.full_like(plan.head_slot, -1), plan.head_slot)
        return LayerRepetition(plan.frame_tokens, slot, plan.anchors, plan.row_anchor)


@dataclass
class RepetitionPlan:
    """Repetition plan of one bucket, for all layers: which heads, their anchors and the row -> anchor map."""

    frame_tokens: int
    head_slot: torch.Tensor  # [L, H] int32, -1 = not repetitive
    anchors: torch.Tensor  # [R, K] int64, positions within a frame
    row_anchor: torch.Tensor  # [R, frame_tokens] int64 in [0, K)

    def __post_init__(self):
        self.head_slot = self.head_slot.to(torch.int32)
        self.anchors = self.anchors.to(torch.int64)
        self.row_anchor = self.row_anchor.to(torch.int64)
        R = self.anchors.shape[0]
        if self.row_anchor.shape != (R, self.frame_tokens):
            raise BundleError(f"row_anchor must be [{R}, {self.frame_tokens}], got {tuple(self.row_anchor.shape)}",
                              field="repetition.row_anchor")
        if R:
            K = self.anchors.shape[1]
            if K < 1 or int(self.anchors.min()) < 0 or int(self.anchors.max()) >= self.frame_tokens:
                raise BundleError("anchor rows must lie inside a frame", field="repetition.anchors")
            if int(self.row_anchor.min()) < 0 or int(self.row_anchor.max()) >= K:
                raise BundleError(f"row_anchor slots must be in [0, {K})", field="repetition.row_anchor")
        used = self.head_slot[self.head_slot >= 0]
        if used.numel() and int(used.max()) >= R:
            raise BundleError(f"head_slot refers to plan {int(used.max())} of {R}", field="repetition.head_slot")

    def for_layer(self, layer: int) -> Optional[LayerRepetition]:
        slots = self.head_slot[layer]
        used = slots >= 0
        if not bool(used.any()):
            return None
        rows = slots[used].long()
        local = torch.full_like(slots, -1)
        local[used] = torch.arange(rows.numel(), dtype=torch.int32)
        return LayerRepetition(self.frame_tokens, local, self.anchors[rows], self.row_anchor[rows])


@dataclass(frozen=True)
class RowTables:
    """Which video rows each launch of the Triton kernel writes, on one device: derived from the layer's repetition
    plan once (when the skip list is put on the device), never per call.

    skip_rows[h]: the first skip_rows[h] video rows of head h are left to the anchor broadcast by the sparse launch
    (0 for ordinary heads, frames * T for a repetitive head). The anchor fields are None without repetitive heads:
    anchor_heads [R] int32, anchor_rows [R, F*K] int32 (the rows the anchors sit at, video-relative),
    row_anchor [R, 1, T, 1] int64 (the anchor slot of every in-frame position, the broadcast's gather index),
    frames F and covered = F*T (the rows the broadcast writes)."""

    device: str
    skip_rows: torch.Tensor
    anchor_heads: Optional[torch.Tensor] = None
    anchor_rows: Optional[torch.Tensor] = None
    row_anchor: Optional[torch.Tensor] = None
    frames: int = 0
    covered: int = 0

    def tensors(self) -> list:
        return [t for t in (self.skip_rows, self.anchor_heads, self.anchor_rows, self.row_anchor) if t is not None]


def row_tables(geometry: BlockGeometry, num_heads: int, rep: Optional[LayerRepetition], device) -> RowTables:
    """RowTables of a layer on `device`. Which heads repeat is read from the plan's host copy (LayerRepetition.host)
    when it has one, so no host sync; a plan that only lives on a GPU is read back once. The tables are made on the
    host and go up through pinned memory: an index_put of a Python scalar on the device would copy that scalar from
    pageable memory, which makes the host wait for the GPU queue."""
    device = torch.device(device)
    plan = rep.on_host() if rep is not None else None
    heads = [] if plan is None else [h for h in range(plan.head_slot.numel()) if int(plan.head_slot[h]) >= 0]
    if not heads:
        return RowTables(str(device), torch.zeros(num_heads, dtype=torch.int32, device=device))
    T = plan.frame_tokens
    frames = geometry.num_tokens // T
    sl = torch.tensor([int(plan.head_slot[h]) for h in heads], dtype=torch.long)
    anchors = plan.anchors[sl]  # [R, K]
    rows = (torch.arange(frames)[None, :, None] * T + anchors[:, None, :]).reshape(len(heads), -1)
    skip = torch.zeros(num_heads, dtype=torch.int32)
    skip[heads] = frames * T
    return RowTables(str(device), to_device_async(skip, device),
                     to_device_async(torch.tensor(heads, dtype=torch.int32), device),
                     to_device_async(rows.to(torch.int32), device),
                     to_device_async(plan.row_anchor[sl].long()[:, None, :, None].contiguous(), device),
                     frames, frames * T)


@dataclass
class LayerSkipList:
    """Skip list of one layer (all heads): what one attention call reads. `rows` (RowTables) is what the kernel
    derives from the repetition plan, always present: built with the list (on its tables' device) unless the maker
    passes it (to(device), the runner's per-call tables), so the kernel only reads it."""

    geometry: BlockGeometry
    kv_indices: torch.Tensor  # [H, nq, W] int16/int32, padded by repeating the last valid index
    kv_counts: torch.Tensor  # [H, nq] int32, >= 1
    repetition: Optional[LayerRepetition] = None
    rows: Optional[RowTables] = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.rows is None:
            self.rows = row_tables(self.geometry, self.num_heads, self.repetition, self.kv_indices.device)

    @property
    def num_heads(self) -> int:
        return self.kv_counts.shape[0]

    def to(self, device, non_blocking: bool = False) -> "LayerSkipList":
        rep = self.repetition.to(device) if self.repetition is not None else None
        return LayerSkipList(self.geometry, self.kv_indices.to(device, non_blocking=non_blocking),
                             self.kv_counts.to(device, non_blocking=non_blocking), rep,
                             row_tables(self.geometry, self.num_heads, rep, device))

    def block_mask(self) -> torch.Tensor:
        """[H, nq, nk] bool."""
        return _table_to_mask(self.kv_indices, self.kv_counts, self.geometry.nk)

    def head_densities(self) -> torch.Tensor:
        """[H] float: fraction of key blocks computed; a repetitive head counts its anchor rows' share."""
        g = self.geometry
        rep = self.repetition
        if rep is None:
            return key_block_density(self.kv_counts.sum(-1), g.nq, g.nk)
        share = anchor_share(g.num_tokens, rep.frame_tokens, rep.anchors.shape[1])
        return key_block_density(self.kv_counts.sum(-1), g.nq, g.nk, rep.head_slot >= 0, share)

    @property
    def density(self) -> float:
        return float(self.head_densities().mean())

    def head_range(self, start: int, stop: int) -> "LayerSkipList":
        """Heads start..stop-1 as a list of their own (the kernel then takes those heads' q, k, v): the runner's FP8
        check compares a few heads at a time, so it never holds a second whole-layer output. Which heads repeat is
        read from the plan's host copy where it has one (no host sync)."""
        rep = self.repetition
        if rep is not None:
            host = rep.on_host() if rep.host is not None or rep.head_slot.device.type == "cpu" else None
            rep = LayerRepetition(rep.frame_tokens, rep.head_slot[start:stop], rep.anchors, rep.row_anchor,
                                  None if host is None or host is rep else
                                  LayerRepetition(host.frame_tokens, host.head_slot[start:stop], host.anchors,
                                                  host.row_anchor))
        return LayerSkipList(self.geometry, self.kv_indices[start:stop], self.kv_counts[start:stop], rep)

    def with_full_heads(self, heads: torch.Tensor) -> "LayerSkipList":
        """A copy in which the heads marked in `heads` ([H] bool, on this list's device) list every key block and are
        not repetitive: exact dense attention for them through the same kernel launch. Device ops only."""
        g = self.geometry
        full = torch.arange(g.nk, device=self.kv_indices.device, dtype=self.kv_indices.dtype)
        W = self.kv_indices.shape[-1]
        # Widen to nk by repeating each row's last valid index (the padding convention), then overwrite the heads.
        take = torch.minimum(torch.arange(g.nk, device=full.device), (self.kv_counts.long() - 1)[..., None])
        idx = self.kv_indices.gather(-1, take.clamp_max(W - 1))
        sel = heads.to(torch.bool)
        idx = torch.where(sel[:, None, None], full.expand_as(idx), idx)
        counts = torch.where(sel[:, None], torch.full_like(self.kv_counts, g.nk), self.kv_counts)
        rep = self.repetition
        if rep is not None:
            slot = torch.where(sel, torch.full_like(rep.head_slot, -1), rep.head_slot)
            rep = LayerRepetition(rep.frame_tokens, slot, rep.anchors, rep.row_anchor)
        return LayerSkipList(g, idx.contiguous(), counts.to(torch.int32), rep)


def _table_to_mask(kv_indices: torch.Tensor, kv_counts: torch.Tensor, nk: int) -> torch.Tensor:
    W = kv_indices.shape[-1]
    valid = torch.arange(W, device=kv_indices.device) < kv_counts[..., None]
    mask = torch.zeros(*kv_counts.shape, nk + 1, dtype=torch.bool, device=kv_indices.device)
    idx = torch.where(valid, kv_indices.long(), torch.full_like(kv_indices, nk, dtype=torch.long))
    mask.scatter_(-1, idx, True)
    return mask[..., :nk]


def index_dtype(nk: int) -> torch.dtype:
    """Key-block index type of the tables: int16 while every index fits (nk <= 32767: 4 M tokens at 128-token
    blocks), else int32. The kernel widens each index as it loads it."""
    return torch.int16 if nk <= torch.iinfo(torch.int16).max else torch.int32


def mask_to_table(mask: torch.Tensor, width: Optional[int] = None):
    """[..., nq, nk] bool -> (kv_indices [..., nq, W], kv_counts [..., nq] int32).

    W = `width` when the caller knows the longest row (no device sync), else the max count.
    """
    counts = mask.sum(-1, dtype=torch.int32)
    W = max(1, int(width) if width is not None else (int(counts.max()) if counts.numel() else 1))
    return _compact(mask, counts, W), counts


def packed_to_table(packed: torch.Tensor, nk: int, width: int, full: Optional[torch.Tensor] = None):
    """mask_to_table from bit-packed masks ([..., nq, ceil(nk/8)] uint8, packing.pack_bits) on their device.

    full: optional bool over the leading dims but the last two (e.g. [H] for one layer's heads): those rows list
    every key block. width must be at least the longest row (the bundle knows it from its per-mask counts)."""
    mask = unpack_bits(packed, nk)
    if full is not None:
        mask = mask | full.to(torch.bool)[..., None, None]
    counts = mask.sum(-1, dtype=torch.int32)
    return _compact(mask, counts, max(1, int(width))), counts


def _compact(mask: torch.Tensor, counts: torch.Tensor, W: int) -> torch.Tensor:
    """Kept key blocks of each row, ascending, padded to W by repeating the last: a prefix sum gives each kept
    block its column (no sort), a scatter puts it there, a gather pads. Columns past W (a width below the longest
    row) and the unkept blocks land in a spill column that is cut off."""
    nk = mask.shape[-1]
    dtype = index_dtype(nk)
    pos = mask.cumsum(-1, dtype=torch.int32) - 1
    pos = torch.where(mask, pos.clamp_max(W), W).long()
    table = torch.zeros(*mask.shape[:-1], W + 1, dtype=dtype, device=mask.device)
    cols = torch.arange(nk, dtype=dtype, device=mask.device)
    table.scatter_(-1, pos, cols.expand(mask.shape))
    take = torch.minimum(torch.arange(W, device=mask.device), (counts.long() - 1).clamp(min=0)[..., None])
    return table.gather(-1, take)


@dataclass
class SkipLists:
    """Compiled skip lists of one sigma bucket: every layer and head."""

    geometry: BlockGeometry
    layers: list  # list[LayerSkipList]
    repetition: Optional[RepetitionPlan] = None
    _mask_cache: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)

    @classmethod
    def from_block_mask(cls, mask: torch.Tensor, geometry: BlockGeometry,
                        repetition: Optional[RepetitionPlan] = None) -> "SkipLists":
        """mask: [L, H, nq, nk] bool. The diagonal is added so that no query block is ever empty."""
        if mask.dim() != 4 or mask.shape[-2:] != (geometry.nq, geometry.nk):
            raise BundleError(f"block mask must be [layers, heads, {geometry.nq}, {geometry.nk}], "
                              f"got {tuple(mask.shape)}", field="mask")
        mask = mask.to(torch.bool) | geometry.diagonal(mask.device)
        if repetition is not None and tuple(repetition.head_slot.shape) != tuple(mask.shape[:2]):
            raise BundleError(f"repetition plan covers {tuple(repetition.head_slot.shape)} (layers, heads); "
                              f"the masks cover {tuple(mask.shape[:2])}", field="repetition.head_slot")
        layers = []
        for l in range(mask.shape[0]):
            table, counts = mask_to_table(mask[l])
            rep = repetition.for_layer(l) if repetition is not None else None
            layers.append(LayerSkipList(geometry, table, counts, rep))
        out = cls(geometry, layers, repetition)
        out._mask_cache = mask
        return out

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_heads(self) -> int:
        return self.layers[0].num_heads

    def layer(self, index: int) -> LayerSkipList:
        return self.layers[index]

    def block_mask(self) -> torch.Tensor:
        """[L, H, nq, nk] bool."""
        if self._mask_cache is None:
            self._mask_cache = torch.stack([lay.block_mask() for lay in self.layers])
        return self._mask_cache

    def head_densities(self) -> torch.Tensor:
        """[L, H] float."""
        return torch.stack([lay.head_densities() for lay in self.layers])

    @property
    def density(self) -> float:
        return float(self.head_densities().mean())

    def to(self, device, non_blocking: bool = False) -> "SkipLists":
        return SkipLists(self.geometry, [lay.to(device, non_blocking) for lay in self.layers], self.repetition)
