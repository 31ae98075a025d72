"""Calibrated + online hybrid (issue 16), a plain-PyTorch reference: not in the bundle format, not in the kernels.

Calibration tells, per (sigma bucket, layer, head), whether a head's keep mask is the same for every prompt or follows
the content. From the statistics it already keeps (per calibrated step and layer, how many prompts kept each block):
  stability  = blocks every prompt kept / blocks any prompt kept (intersection over union across prompts), summed
               over the bucket's steps;
  static     a head with stability >= static_iou keeps its calibrated skip list (the bundle's mask);
  dynamic    any other head routes per call: the blocks every prompt needed in some step of the bucket ("always",
             the diagonal among them), plus the key blocks with the highest block-pooled q.k score until the row has
             its budget: how many key blocks one prompt kept for that (head, query block) row, on average over the
             prompts (rounded up; the largest over the bucket's steps). The vote keeps what most prompts kept, so
             for such a head it drops each prompt's own blocks; the budget keeps their number, and the call places
             them.
Heads the sparse runner would run dense (density above its cutoff) stay static and dense.

The routing is device-side tensor work (pooling, one sort, a compare with the per-row budget, a scatter): nothing
is read back to the host per call. `hybrid_attention` then computes attention restricted to the block mask, one
mask per batch row and head, through SDPA with a token mask: a reference for tests and CPU benchmarks, O(N^2)
memory per call. Not done here: a bundle format bump recording the classification and budgets, and the kernel
taking per-call rows for dynamic heads in the same launch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..kernels.runner import DENSE_CUTOFF
from ..masks.bundle import MaskBundle
from ..masks.geometry import key_block_density
from ..masks.skiplists import BlockGeometry

STATIC_IOU = 0.7  # default stability above which a head keeps its calibrated list
# A dynamic head's key blocks per query-block row: "prompt" = per row, a prompt's mean count (see above); "mask" =
# the same for every row, the head's calibrated mask's mean row count (the bundle's density for that head, placed
# by the call, as per-call top-k places a uniform k).
BUDGETS = ("prompt", "mask")


@dataclass
class HybridBucket:
    static: torch.Tensor  # [L, H] bool: keeps the calibrated mask
    mask: torch.Tensor  # [L, H, nq, nk] bool: the calibrated mask (all True for heads the runner runs dense)
    always: torch.Tensor  # [L, H, nq, nk] bool: blocks every prompt kept (dynamic heads keep them), with the diagonal
    budget: torch.Tensor  # [L, H, nq] int64: key blocks per query-block row of dynamic heads (a prompt's mean count)
    stability: torch.Tensor  # [L, H] float: intersection over union of the prompts' keep masks


class HybridPlan:
    """Per bucket of a calibrated bundle: which heads are static, and the dynamic heads' always-kept blocks and
    budgets. Build it with from_calibration(bundle, stats) from the Calibrator that made the bundle."""

    def __init__(self, bundle: MaskBundle, buckets: list, static_iou: float):
        self.bundle = bundle
        self.geometry: BlockGeometry = bundle.geometry
        self.buckets = buckets
        self.static_iou = float(static_iou)

    @classmethod
    def from_calibration(cls, bundle: MaskBundle, stats, *, static_iou: float = STATIC_IOU,
                         dense_cutoff: float = DENSE_CUTOFF, budget: str = "prompt") -> "HybridPlan":
        """bundle: Calibrator.finish()'s bundle; stats: the same Calibrator's state() (its steps in the bundle's
        calibrated order)."""
        if not (0.0 <= static_iou <= 1.0):
            raise ValueError(f"static_iou must be in [0, 1] (0: every head static, 1: only heads whose prompts all "
                             f"agree exactly), got {static_iou}")
        if budget not in BUDGETS:
            raise ValueError(f"budget must be one of {', '.join(map(repr, BUDGETS))}, got {budget!r}")
        budget_mode = budget
        g = bundle.geometry
        if (stats.geometry.nq, stats.geometry.nk) != (g.nq, g.nk):
            raise ValueError("the statistics were gathered with other block sizes than the bundle's")
        order = stats.step_order()
        if len(order) != len(bundle.step_bucket):
            raise ValueError(f"the statistics have {len(order)} steps, the bundle {len(bundle.step_bucket)}: build "
                             "the plan from the Calibrator that made the bundle")
        L, H = bundle.num_layers, bundle.num_heads
        diag = g.diagonal()
        dens = bundle.entry_densities()
        buckets = []
        for b in range(bundle.num_buckets):
            mask = bundle.block_masks(b)  # [L, H, nq, nk]
            inter = torch.zeros(L, H, dtype=torch.float64)
            union = torch.zeros(L, H, dtype=torch.float64)
            always = torch.zeros(L, H, g.nq, g.nk, dtype=torch.bool)
            budget = torch.zeros(L, H, g.nq, dtype=torch.int64)
            for i, sid in enumerate(order):
                if bundle.step_bucket[i] != b:
                    continue
                for layer in range(L):
                    n = int(stats.observed[sid][layer])
                    counts = stats.get_counts(sid, layer)
                    if counts is None or n == 0:
                        continue
                    c = torch.from_numpy(counts).to(torch.int64)
                    every = c >= n
                    inter[layer] += every.sum((-1, -2)).double()
                    union[layer] += (c > 0).sum((-1, -2)).double()
                    always[layer] |= every
                    # a prompt's mean count per row: the votes in a row sum to the blocks its prompts kept, and the
                    # diagonal, which every mask keeps, counts where a prompt did not keep it itself
                    kept = c.sum(-1) + (n * diag - c * diag).sum(-1)
                    per_prompt = (kept + n - 1) // n
                    budget[layer] = torch.maximum(budget[layer], per_prompt)
            always |= diag
            stability = torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union))
            dense_heads = dens[b] > dense_cutoff
            mask[dense_heads] = True
            static = (stability >= static_iou) | dense_heads
            if budget_mode == "mask":
                budget = torch.ceil(mask.sum(-1).double().mean(-1, keepdim=True)).to(torch.int64).expand(-1, -1, g.nq)
            budget = torch.maximum(budget, always.sum(-1))  # never fewer than the blocks it must keep
            buckets.append(HybridBucket(static, mask, always, budget, stability.float()))
        return cls(bundle, buckets, static_iou)

    def bucket_for_sigma(self, sigma: float) -> int:
        return self.bundle.bucket_for_sigma(float(sigma))

    def entry_densities(self) -> torch.Tensor:
        """[buckets, L, H] key-block density each head spends: static heads their mask's, dynamic heads their budget's
        (the budget already counts the always-kept blocks)."""
        out = []
        for b in self.buckets:
            nq, nk = b.mask.shape[-2:]
            dyn = key_block_density(b.budget.clamp(max=nk).sum(-1), nq, nk)
            out.append(torch.where(b.static, key_block_density(b.mask.sum((-1, -2)), nq, nk), dyn))
        return torch.stack(out)

    def static_share(self) -> float:
        """Share of (bucket, layer, head) entries that are static."""
        return float(torch.stack([b.static.float().mean() for b in self.buckets]).mean())


def pool_blocks(x: torch.Tensor, geometry: BlockGeometry, block: int) -> torch.Tensor:
    """(B, H, N, D) video tokens -> (B, H, n, D) mean per block of `block` tokens (the last block may be partial)."""
    B, H, N, D = x.shape
    n = math.ceil(N / block)
    pad = n * block - N
    xp = torch.nn.functional.pad(x.float(), (0, 0, 0, pad))
    counts = torch.clamp(N - torch.arange(n, device=x.device) * block, max=block).to(xp.dtype)
    return xp.reshape(B, H, n, block, D).sum(3) / counts[None, None, :, None]


def pooled_scores(q: torch.Tensor, k: torch.Tensor, geometry: BlockGeometry, scale: float) -> torch.Tensor:
    """[B, H, nq, nk] block-pooled q.k: the mean query of each query block against the mean key of each key block."""
    return pool_blocks(q, geometry, geometry.block_q) @ pool_blocks(k, geometry, geometry.block_k).transpose(-1, -2) \
        * scale


def route_dynamic(scores: torch.Tensor, always: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Per row: every `always` block, then the highest-scoring others until the row has `budget` blocks (more only
    where the always blocks alone exceed it). scores [..., nq, nk], always bool broadcastable to it, budget
    [..., nq] integer. Device-side only: one sort and a compare, no host read."""
    always = always.expand_as(scores)
    ranked = torch.where(always, torch.full_like(scores, float("inf")), scores)
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    pos = torch.arange(scores.shape[-1], device=scores.device)
    keep_sorted = pos < budget[..., None]
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep | always


def hybrid_block_mask(q: torch.Tensor, k: torch.Tensor, bucket: HybridBucket, layer: int,
                      geometry: BlockGeometry, scale: float) -> torch.Tensor:
    """[B, H, nq, nk] bool: static heads their calibrated mask, dynamic heads routed from this call's q and k."""
    B = q.shape[0]
    static = bucket.static[layer].to(q.device)
    mask = bucket.mask[layer].to(q.device)
    dyn = route_dynamic(pooled_scores(q, k, geometry, scale), bucket.always[layer].to(q.device)[None],
                        bucket.budget[layer].to(q.device)[None].expand(B, -1, -1))
    return torch.where(static[None, :, None, None], mask[None], dyn)


def block_mask_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor,
                         geometry: BlockGeometry, scale: Optional[float] = None) -> torch.Tensor:
    """(B, H, N, D) video-only attention where query block i sees the key blocks block_mask[b, h, i] marks (every
    row keeps at least its diagonal block). Through SDPA with the token mask: the reference, O(N^2) memory."""
    N = q.shape[2]
    tok = block_mask.repeat_interleave(geometry.block_q, dim=-2)[..., :N, :]
    tok = tok.repeat_interleave(geometry.block_k, dim=-1)[..., :N]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=tok, scale=scale)


class HybridAttention:
    """Attention handler (AttentionCall -> output in the host layout) running a HybridPlan with the reference
    above; video-only calls (the tiny models' self-attention). mean_density() reads back the densities it summed
    on the device, once, at the end."""

    def __init__(self, plan: HybridPlan):
        self.plan = plan
        self._bucket = None
        self._density = None
        self._calls = 0

    def begin_step(self, sigma: float, device=None, step_fraction=None):
        self._bucket = self.plan.bucket_for_sigma(sigma)

    def __call__(self, call):
        if call.grid.text_tokens:
            raise ValueError("HybridAttention: calls with joint text tokens are not supported by this reference "
                             "(video-only self-attention)")
        if self._bucket is None:
            self.begin_step(call.sigma)
        q, k, v = call.bhld()
        scale = call.scale if call.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        g = self.plan.geometry
        mask = hybrid_block_mask(q, k, self.plan.buckets[self._bucket], call.layer, g, scale)
        d = mask.float().mean()
        self._density = d if self._density is None else self._density + d
        self._calls += 1
        return call.to_host_layout(block_mask_attention(q, k, v, mask, g, scale=scale))

    def mean_density(self) -> float:
        return 0.0 if self._density is None else float(self._density) / self._calls

    def static_share(self) -> float:
        return self.plan.static_share()
