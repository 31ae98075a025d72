"""Calibration under Ulysses sequence parallelism: each rank gathers the statistics of the heads it holds, and the
ranks' statistics are merged once, at the end, into the statistics one process would have gathered.

Why this is exact: every statistic the calibrator keeps is per head (block energy, the eps selection of each
(head, query block) row, the repetition error, the dropped mass: calibration/calibrator.py), and a Ulysses rank
holds the whole sequence for its heads. So rank u runs an ordinary Calibrator for a model of len(heads_u) heads on
the calls of its heads, and `merged_stats` places each rank's per-head counters and sums at their heads' places:
one all-gather per calibrated step. During calibration all heads cost the same (attention is dense), so the heads
are split contiguously (ceil(H / U) slots, padding slots when U does not divide H, as in parallel/heads.py).

Ring attention is not supported for calibration: a ring rank holds a query shard, and a row's block energy needs
the row's softmax over all keys (a second pass round the ring); calibrate with the Ulysses degree equal to the
sequence-parallel degree (at most the head count), or on one GPU.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ..calibration.calibrator import Calibrator
from ..calibration.settings import CalibrationSettings
from ..calibration.stats import CalibrationStats, StatsError, StepRecord
from ..kernels.call import AttentionCall
from ..masks.bundle import MaskBundle
from ..masks.geometry import ModelSignature, TokenGrid
from .heads import SlotLayout, contiguous_heads
from .usp import call_module, group_rank, group_size, install_attention


class SequenceParallelCalibration:
    """One Ulysses rank's calibrator, with a Calibrator's driving protocol, so `calibrate()` runs it on every rank
    with the same prompts (each rank may resume from its own statistics file: state / merge hold this rank's
    heads). Calls go through `attention` (yunchang module with `install` done) or, for an engine that already hands
    this rank its heads, `observe_local`. `finish()` (a collective) merges the ranks' statistics once and returns the
    bundle one process observing every head would make, on every rank; `merged_stats()` is that merge alone."""

    def __init__(self, signature: ModelSignature, grid: TokenGrid, settings: Optional[CalibrationSettings] = None,
                 *, ulysses_group=None, ring_group=None, background: bool = False):
        if group_size(ring_group) > 1:
            raise ValueError("calibration under ring attention is not supported (a ring rank holds a query shard; "
                             "block energies need each row's softmax over every key): calibrate with the Ulysses "
                             "degree equal to the sequence-parallel degree, or on one GPU")
        if settings is not None and settings.selection == "global" and group_size(ulysses_group) > 1:
            # A rank sees only its heads, so its threshold would be its own: the bundle would depend on the degree.
            raise ValueError("calibration with selection \"global\" under Ulysses is not supported (one mass "
                             "threshold spans every head, and a rank holds only some): use selection \"row\" or "
                             "calibrate on one GPU")
        self.signature = signature
        self.group = ulysses_group
        self.U, self.R, self.u_rank = group_size(ulysses_group), 1, group_rank(ulysses_group)
        self.assignment = contiguous_heads(signature.num_heads, self.U)
        self.layout = SlotLayout(self.assignment)
        self.heads = self.assignment.ranks[self.u_rank]
        s = signature
        self.local_signature = ModelSignature(s.family, s.num_layers, len(self.heads), s.head_dim, s.dim,
                                              dict(s.extra))
        self.calibrator = Calibrator(self.local_signature, grid, settings, background=background)
        self.grid, self.settings = grid, self.calibrator.settings
        self._call = None

    # -- the Calibrator protocol (what calibrate() drives); statistics are this rank's heads -----------------------
    def begin_prompt(self, sample_sigmas=None, key: Optional[str] = None):
        self.calibrator.begin_prompt(sample_sigmas, key)

    def set_schedule(self, sample_sigmas):
        self.calibrator.set_schedule(sample_sigmas)

    def end_prompt(self, save_to=None):
        self.calibrator.end_prompt(save_to=save_to)

    def abort_prompt(self):
        self.calibrator.abort_prompt()

    def wait(self):
        self.calibrator.wait()

    def state(self) -> CalibrationStats:
        return self.calibrator.state()

    def merge(self, stats: CalibrationStats):
        self.calibrator.merge(stats)

    def finish(self) -> MaskBundle:
        """Collective over the Ulysses group: merge every rank's heads once, then vote, as one process would."""
        full = Calibrator(self.signature, self.grid, self.settings, background=False)
        full.merge(self.merged_stats())
        return full.finish()

    def observe_local(self, call: AttentionCall) -> torch.Tensor:
        """A call holding this rank's heads (in self.heads order) over the whole sequence: dense output."""
        return self.calibrator.observe(call)

    # -- yunchang ------------------------------------------------------------------------------------------------
    def install(self, module):
        return install_attention(self, module, self.U, self.R)

    def attention(self, module, q, k, v, *, layer: int, sigma: float, grid: TokenGrid, positive_rows=None,
                  text_bias=None, scale: Optional[float] = None) -> torch.Tensor:
        """Dense attention through yunchang, with this rank's statistics gathered on the way: q, k, v
        (B, S_local, H, D), this rank's contiguous shard; returns (B, S_local, H, D)."""
        if getattr(module, "_calibatt_sp", None) is not self:
            raise ValueError("call SequenceParallelCalibration.install(module) on this yunchang module first")
        self._call = (layer, sigma, grid, positive_rows, text_bias)
        try:
            out = call_module(module, *(self.layout.to_slots(t) for t in (q, k, v)), scale)
        finally:
            self._call = None
        return self.layout.from_slots(out)

    def ring_attn_fn(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, *args, group=None, **kwargs):
        if self._call is None:
            raise RuntimeError("this yunchang module calibrates: call it through SequenceParallelCalibration.attention")
        layer, sigma, grid, rows, bias = self._call
        n = len(self.heads)
        qh, kh, vh = (t[:, :, :n].transpose(1, 2) for t in (q, k, v))
        o = self.observe_local(AttentionCall(qh, kh, vh, "bhld", n, layer, sigma, grid, positive_rows=rows,
                                             scale=softmax_scale, text_bias=bias))
        out = q.new_zeros(q.shape)
        out[:, :, :n] = o.transpose(1, 2).to(q.dtype)
        return out

    # -- the one merge ---------------------------------------------------------------------------------------------
    def merged_stats(self) -> CalibrationStats:
        """Collective over the Ulysses group: the statistics of all heads, equal to one process observing every
        head. Every rank must have run the same prompts and steps."""
        st = self.calibrator.state()
        a, L, slots = self.assignment, self.signature.num_layers, self.assignment.slots
        g = st.geometry
        n = len(self.heads)
        # the same steps and prompts everywhere, or the per-head pieces do not belong together
        facts = torch.tensor([float(len(st.steps)), float(st.num_prompts)] + [x.sigma for x in st.steps],
                             dtype=torch.float64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.U)]
        dist.all_gather(sizes, torch.tensor([facts.numel()]), group=self.group)
        seen = [torch.zeros(int(s), dtype=torch.float64) for s in sizes]
        dist.all_gather(seen, facts, group=self.group)
        if any(not torch.equal(x, facts) for x in seen):
            raise StatsError("the Ulysses ranks calibrated different prompts or steps; run every prompt on every "
                             "rank of the group (same schedule) before merging")
        out = CalibrationStats(self.signature, st.grid, st.settings)
        for sid, rec in enumerate(st.steps):
            out.add_step(StepRecord(**rec.to_dict()))
            counts = torch.zeros(L, slots, g.nq, g.nk, dtype=torch.uint8)
            present = torch.zeros(L, dtype=torch.uint8)
            for layer in range(L):
                c = st.get_counts(sid, layer)
                if c is not None:
                    counts[layer, :n] = torch.from_numpy(c.copy())
                    present[layer] = 1
            sums = torch.zeros(3, L, slots, dtype=torch.float64)
            for i, name in enumerate(("rep_err", "rep_frac", "drop")):
                sums[i, :, :n] = getattr(st, name)[sid]
            all_counts = [torch.empty_like(counts) for _ in range(self.U)]
            all_sums = [torch.empty_like(sums) for _ in range(self.U)]
            all_present = [torch.empty_like(present) for _ in range(self.U)]
            dist.all_gather(all_counts, counts, group=self.group)
            dist.all_gather(all_sums, sums, group=self.group)
            dist.all_gather(all_present, present, group=self.group)
            if any(not torch.equal(p, present) for p in all_present):
                raise StatsError(f"the Ulysses ranks observed different layers at step {sid}")
            full = torch.zeros(L, self.signature.num_heads, g.nq, g.nk, dtype=torch.uint8)
            for r, heads in enumerate(a.ranks):
                idx = torch.as_tensor(heads, dtype=torch.long)
                full[:, idx] = all_counts[r][:, :len(heads)]
                for i, name in enumerate(("rep_err", "rep_frac", "drop")):
                    getattr(out, name)[sid][:, idx] = all_sums[r][i, :, :len(heads)]
            for layer in range(L):
                if present[layer]:
                    out.add_votes(sid, layer, np.ascontiguousarray(full[layer].numpy()))
            out.observed[sid] = st.observed[sid].clone()
        out.num_prompts = st.num_prompts
        out.prompt_keys = list(st.prompt_keys)
        return out
