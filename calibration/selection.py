"""Block selection (METHOD.md section 1): per-prompt cumulative-mass keep sets, the cross-prompt vote, and
step sharing by IoU.

Mass convention. block_energy gives, per (head, query block, key block), the attention probability summed over the
block's query rows, with the softmax taken over ALL keys (text included). Divided by the number of rows it is the mean
row mass per video key block; the rest of each row's mass, 1 - sum over video blocks, sits on text keys. Text keys are
always computed by the sparse kernel (reference semantics), so their share counts as already covered: a query block
keeps the smallest set S of video key blocks with  text_share + sum_{kb in S} mass[kb] >= eps(t).
For models without joint text, text_share is 0 up to rounding. Any block holding more than 1 - eps of a row's mass is
therefore always kept (without it the rest cannot reach eps).

Global selection (CalibrationSettings.selection = "global"): instead of eps per row, one mass threshold per calibrated
step over every layer, head and query block of the step, the lowest that keeps the step's MEAN row coverage at eps.
Rows whose mass sits on a few blocks (local heads) keep few, diffuse rows keep what their mass earns, so the density
budget goes where the mass is; no single row is promised eps any more. The threshold is found on log-spaced bins of
the block mass (MASS_BINS_PER_OCTAVE per factor of 2, so blocks within 9 % of the threshold share its fate): a
step's masks must be held until its last layer has been seen, and one byte per block is a quarter of a float16.
"""

from __future__ import annotations

import torch

from ..kernels.block_energy.naive import block_row_counts
from ..masks.packing import row_counts
from ..masks.skiplists import BlockGeometry


def mean_block_mass(energy: torch.Tensor, geometry: BlockGeometry, batch: int,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
    """[H, nq, nk] summed energy -> mean mass per row of each query block (rows of a block then sum to 1 - text).
    rows: block_row_counts(geometry) already on energy's device (saves a host-to-device copy per call)."""
    if rows is None:
        rows = block_row_counts(geometry).to(energy.device)
    return energy / (rows * float(batch))[None, :, None]


def select_blocks(mass: torch.Tensor, eps: float, text_share: torch.Tensor | None = None) -> torch.Tensor:
    """mass [..., nq, nk] (mean row mass per video key block) -> bool keep mask of the same shape.

    Per query-block row: the fewest key blocks, largest first, such that text_share + kept mass >= eps.
    text_share defaults to 1 - row sum (clamped to [0, 1]).
    """
    if text_share is None:
        text_share = (1.0 - mass.sum(-1)).clamp(0.0, 1.0)
    target = (eps - text_share)[..., None]
    vals, order = torch.sort(mass, dim=-1, descending=True)
    before = torch.cumsum(vals, dim=-1) - vals  # mass already kept when this block is considered
    keep_sorted = before < target
    keep = torch.zeros_like(keep_sorted)
    keep.scatter_(-1, order, keep_sorted)
    return keep


# Log2 bins of block mass: bin 0 holds everything below 2^-MASS_BINS_OCTAVES (and exact zeros), bin 255 reaches 1.
MASS_BINS = 256
MASS_BINS_PER_OCTAVE = 8
MASS_BINS_OCTAVES = (MASS_BINS - 1) // MASS_BINS_PER_OCTAVE  # 31: 2^-31 of a row is nothing any eps misses


def mass_bins(mass: torch.Tensor) -> torch.Tensor:
    """uint8 log-spaced bin of each block mass (monotone in the mass: a higher bin never holds less mass)."""
    lg = torch.log2(mass.float().clamp_min(2.0 ** -MASS_BINS_OCTAVES))
    b = torch.floor((lg + MASS_BINS_OCTAVES) * MASS_BINS_PER_OCTAVE)
    return b.clamp_(0, MASS_BINS - 1).to(torch.uint8)


def bin_histogram(mass: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """[..., nq, nk] mass and its bins -> [..., MASS_BINS] mass summed per bin over the query and key blocks."""
    lead = mass.shape[:-2]
    m = mass.float().reshape(-1, mass.shape[-2] * mass.shape[-1])
    b = bins.reshape(m.shape).long()
    out = torch.zeros(m.shape[0], MASS_BINS, dtype=torch.float32, device=mass.device)
    out.scatter_add_(1, b, m)
    return out.reshape(*lead, MASS_BINS)


def global_threshold(hist: torch.Tensor, text_total, rows: int, eps: float) -> torch.Tensor:
    """The lowest bin to keep (a 0-d long tensor on hist's device; no host sync): hist [MASS_BINS] mass per bin
    summed over every row of the step, text_total the text shares summed over the same rows, rows their number.
    Like select_blocks, a bin is kept while the mass of the bins above it (plus the text) is short of eps * rows;
    MASS_BINS (keep nothing) when the text alone covers it."""
    target = float(eps) * float(rows) - torch.as_tensor(text_total, dtype=torch.float64, device=hist.device)
    above = torch.flip(torch.cumsum(torch.flip(hist.double(), [0]), 0), [0]) - hist.double()  # strictly higher bins
    keep_bin = above < target
    # bins are kept from the top down, so the kept ones are a suffix: its start is the count of the others
    return (MASS_BINS - keep_bin.sum()).to(torch.long)


def keep_from_bins(bins: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return bins.long() >= threshold


def kept_mass(mass: torch.Tensor, keep: torch.Tensor, text_share: torch.Tensor | None = None) -> torch.Tensor:
    """[..., nq] mass covered by `keep` plus the text share (what the eps guarantee is about)."""
    if text_share is None:
        text_share = (1.0 - mass.sum(-1)).clamp(0.0, 1.0)
    return text_share + (mass * keep).sum(-1)


def vote(counts: torch.Tensor, prompts, rho: float) -> torch.Tensor:
    """Keep a block where at least rho of the prompts kept it. counts: integer votes; prompts: scalar or
    broadcastable tensor of prompts that voted. A block no prompt saw (prompts == 0) is kept (dense is safe)."""
    prompts = torch.as_tensor(prompts, dtype=torch.float64)
    need = rho * prompts - 1e-9
    keep = counts.to(torch.float64) >= need
    return keep | (prompts <= 0)


def packed_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """IoU of two bit-packed masks of the same shape (uint8, padding bits zero). Empty vs empty is 1."""
    inter = int(row_counts(a & b).sum())
    union = int(row_counts(a | b).sum())
    return 1.0 if union == 0 else inter / union


def share_steps(step_masks, step_t: list, share_iou: float, share_after: float = 0.0, rep_heads=None):
    """Group adjacent steps (in schedule order) into buckets.

    step_masks: sequence of packed masks [L, H, nq, nkb] uint8 (any indexable, may be lazy); step_t: t / T per step.
    rep_heads: optional per-step [L, H] bool repetitive flags. A step joins the open bucket when its mask has IoU >=
    share_iou with the bucket's union mask and t / T >= share_after. The bucket's mask is the union of its steps'
    masks (never drops a block any member kept); its repetitive heads are those repetitive in every member.
    Returns (step_bucket, bucket_masks, bucket_rep).
    """
    step_bucket, bucket_masks, bucket_rep = [], [], []
    for s in range(len(step_t)):
        m = step_masks[s]
        r = rep_heads[s] if rep_heads is not None else None
        if bucket_masks and step_t[s] >= share_after and packed_iou(bucket_masks[-1], m) >= share_iou:
            bucket_masks[-1] = bucket_masks[-1] | m
            if r is not None:
                bucket_rep[-1] = bucket_rep[-1] & r
        else:
            bucket_masks.append(m.clone())
            bucket_rep.append(r.clone() if r is not None else None)
        step_bucket.append(len(bucket_masks) - 1)
    return step_bucket, bucket_masks, bucket_rep

