"""Which heads each Ulysses rank computes, and the skip lists of those heads.

Ulysses gives every rank the whole sequence for a subset of the heads. With calibrated masks the heads cost very
different amounts (a local-window head keeps a few % of its key blocks, a dense-routed head all of them), so a
contiguous split (rank r gets heads r*H/P .. (r+1)*H/P) leaves ranks idle behind the one holding the dense heads.
`assign_heads` balances the calibrated costs greedily (LPT: the costliest head first, each to the least-loaded rank).

Every rank gets the same number of head slots, ceil(H / P): the engines' all-to-all (yunchang's all_to_all_4D)
splits the head dimension into P equal parts, and equal shapes keep the collective one static shape per call.
When P does not divide H the missing slots are padding heads (zeros in, ignored out), so the assignment caps each
rank at ceil(H / P) real heads. Padding costs (P * ceil(H/P) - H) / H more all-to-all traffic and no attention
compute (parallel/usp.py never computes a padding slot). Variable splits (all_to_all_single with split sizes)
would save that traffic but need an engine whose all-to-all takes them; yunchang's does not.

Host-side only: costs come from the bundle's host densities, computed once per bucket, never per call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..masks.skiplists import LayerRepetition, LayerSkipList

PAD = -1  # a padding slot in HeadAssignment.order


@dataclass(frozen=True)
class HeadAssignment:
    """ranks[r] = the heads rank r computes (ascending); slots = head slots per rank (ceil(H / P))."""

    num_heads: int
    ranks: tuple  # tuple[tuple[int, ...], ...]
    slots: int

    def __post_init__(self):
        flat = sorted(h for r in self.ranks for h in r)
        if flat != list(range(self.num_heads)):
            raise ValueError(f"a head assignment must give each of the {self.num_heads} heads to exactly one rank, "
                             f"got {self.ranks}")
        if any(len(r) > self.slots for r in self.ranks):
            raise ValueError(f"a rank holds more than {self.slots} heads: {self.ranks}")

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def order(self) -> list:
        """Head of each of the world_size * slots slots, rank by rank (PAD for padding): the layout the all-to-all
        splits into equal, contiguous per-rank parts."""
        out = []
        for r in self.ranks:
            out += list(r) + [PAD] * (self.slots - len(r))
        return out

    def loads(self, costs) -> list:
        c = [float(x) for x in costs]
        return [sum(c[h] for h in r) for r in self.ranks]

    def imbalance(self, costs) -> float:
        """max load / mean load (1.0 = perfectly balanced): the step waits for the slowest rank."""
        loads = self.loads(costs)
        mean = sum(loads) / len(loads)
        return max(loads) / mean if mean > 0 else 1.0


def _check(num_heads: int, world_size: int):
    if world_size < 1 or num_heads < 1:
        raise ValueError(f"need at least one head and one rank, got {num_heads} heads and {world_size} ranks")
    if world_size > num_heads:
        raise ValueError(f"Ulysses needs at least as many heads as ranks ({num_heads} heads, {world_size} ranks): "
                         "use fewer Ulysses ranks and put the rest in the ring degree")


def contiguous_heads(num_heads: int, world_size: int) -> HeadAssignment:
    """The engines' default split: consecutive heads, ceil(H / P) per rank (the last ranks may hold fewer)."""
    _check(num_heads, world_size)
    slots = -(-num_heads // world_size)
    ranks = tuple(tuple(range(min(r * slots, num_heads), min((r + 1) * slots, num_heads))) for r in range(world_size))
    if any(not r for r in ranks):
        # e.g. 5 heads on 4 ranks at 2 slots: 2, 2, 1, 0; rebalance the counts to 2, 1, 1, 1
        base, extra = divmod(num_heads, world_size)
        bounds = [0]
        for r in range(world_size):
            bounds.append(bounds[-1] + base + (r < extra))
        ranks = tuple(tuple(range(bounds[r], bounds[r + 1])) for r in range(world_size))
    return HeadAssignment(num_heads, ranks, slots)


def assign_heads(costs, world_size: int) -> HeadAssignment:
    """LPT: heads by falling cost, each to the least-loaded rank that still has a free slot (ties: fewer heads,
    then the lower rank, so the result is deterministic and equal on every rank). costs: [H] host floats."""
    c = [float(x) for x in (costs.tolist() if isinstance(costs, torch.Tensor) else costs)]
    H = len(c)
    _check(H, world_size)
    if any(not x >= 0.0 for x in c):
        raise ValueError(f"head costs must be finite and >= 0, got {c}")
    slots = -(-H // world_size)
    ranks = [[] for _ in range(world_size)]
    load = [0.0] * world_size
    for h in sorted(range(H), key=lambda i: (-c[i], i)):
        r = min((r for r in range(world_size) if len(ranks[r]) < slots), key=lambda r: (load[r], len(ranks[r]), r))
        ranks[r].append(h)
        load[r] += c[h]
    return HeadAssignment(H, tuple(tuple(sorted(r)) for r in ranks), slots)


def head_costs(densities, dense_cutoff: float = 1.0) -> torch.Tensor:
    """Per-head cost from calibrated key-block densities ([H] or [L, H], e.g. MaskBundle.entry_densities()[bucket]):
    the density, and 1.0 for a head the runner routes dense (density above `dense_cutoff`). Attention time is close
    to linear in the computed blocks (docs/BENCHMARKS.md, "## Kernels")."""
    d = torch.as_tensor(densities, dtype=torch.float64)
    return torch.where(d > dense_cutoff, torch.ones_like(d), d)


def slice_layer(skip: LayerSkipList, heads) -> LayerSkipList:
    """The skip list of some heads of a layer (in the given order), repetition plan included: what a Ulysses rank
    holding those heads reads. The geometry (and so the text tokens' place) is the layer's own: Ulysses ranks hold
    the whole sequence."""
    idx = torch.as_tensor(list(heads), dtype=torch.long)
    if idx.numel() == 0:
        raise ValueError("slice_layer needs at least one head")
    if int(idx.min()) < 0 or int(idx.max()) >= skip.num_heads:
        raise ValueError(f"heads {idx.tolist()} out of range for a layer of {skip.num_heads} heads")
    dev = skip.kv_indices.device
    rep = skip.repetition
    if rep is not None:
        host = rep.on_host()
        slot = host.head_slot[idx]
        if bool((slot >= 0).any()):
            # keep only the plans these heads use, renumbered, so a rank carries no other rank's anchors
            used = sorted({int(s) for s in slot.tolist() if s >= 0})
            remap = torch.full((host.anchors.shape[0],), -1, dtype=torch.int32)
            remap[used] = torch.arange(len(used), dtype=torch.int32)
            local = torch.where(slot >= 0, remap[slot.clamp(min=0).long()], slot).to(torch.int32)
            sel = torch.as_tensor(used, dtype=torch.long)
            rep = LayerRepetition(host.frame_tokens, local, host.anchors[sel], host.row_anchor[sel]).to(dev)
        else:
            rep = None
    i = idx.to(dev)
    return LayerSkipList(skip.geometry, skip.kv_indices.index_select(0, i).contiguous(),
                         skip.kv_counts.index_select(0, i).contiguous(), rep)


class SlotLayout:
    """Moves a tensor's heads between the model's order and an assignment's slot order (rank by rank, real heads
    first, zero padding slots), so an engine's contiguous equal split of the head dimension hands every rank the
    heads the assignment chose. Index tensors are made once per device."""

    def __init__(self, assignment: HeadAssignment):
        self.assignment = assignment
        a = assignment
        self._order = torch.tensor([a.num_heads if h == PAD else h for h in a.order], dtype=torch.long)
        self._inv = torch.tensor([a.order.index(h) for h in range(a.num_heads)], dtype=torch.long)
        self._dev: dict = {}

    def _on(self, device):
        key = str(device)
        if key not in self._dev:
            self._dev[key] = (self._order.to(device), self._inv.to(device))
        return self._dev[key]

    def to_slots(self, x: torch.Tensor, dim: int = 2) -> torch.Tensor:
        """H heads along `dim` -> world_size * slots, padding slots zero (one copy, as the all-to-all makes)."""
        order, _ = self._on(x.device)
        shape = list(x.shape)
        shape[dim] = 1
        return torch.cat([x, x.new_zeros(shape)], dim=dim).index_select(dim, order)

    def from_slots(self, y: torch.Tensor, dim: int = 2) -> torch.Tensor:
        _, inv = self._on(y.device)
        return y.index_select(dim, inv)
