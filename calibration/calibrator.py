"""Calibrator: one attention callback that returns dense outputs and gathers block statistics on the way.

Any host drives it the same way: begin_prompt(), then observe(call) for every self-attention call of the denoising
run (it returns the dense output in the host's layout), then end_prompt(). finish() turns the statistics of all
committed prompts into a MaskBundle.

Per call (on the call's device, no host sync): block energy of the positive CFG rows -> mean mass per (head, query
block, key block) -> this prompt's keep mask at eps(t) -> bit-packed; plus per head the repetition error of the
anchor plan (from the dense output) and the mass the keep mask dropped. The packed bits of a step are copied to
the host once, when the next step starts (one sync per step, not per call).

Memory budget (Wan 14B 720p: L = H = 40, N = 75,600 video tokens, nq = nk = 591 blocks of 128; S calibrated steps):
  GPU, per call (transient): energy + mass + sort values/indices [H, nq, nk] = 56 + 56 + 56 + 112 MB ~ 0.3 GB,
      the block-energy score slab [B, H, 128, N] float32 = 1.5 GB (chunked in the Triton path), the repetition
      check over 4 heads at a time [B, 4, N, D] float32 x 3 ~ 0.5 GB.
  GPU, per step: packed keep bits of the step's calls, L x H x nq x ceil(nk / 8) = 70 MB (selection "global":
      the mass bins of the step's calls, L x H x nq x nk bytes = 559 MB, until the step's threshold is known).
  CPU, per prompt in progress: the same bits for every step, S x 70 MB = 3.5 GB at S = 50 (1.4 GB at S = 20);
      dropped whole if the prompt is interrupted; twice that while the previous prompt commits in the background.
  CPU, across prompts: vote counters, uint8 per (step, layer, head, qb, kb) = S x 559 MB raw, zlib-compressed
      (see stats.py; measured 4-6x on banded masks), independent of the number of prompts.
  Nothing of size N x N (tokens) exists anywhere, and no float map of a prompt outlives its call.
"""

from __future__ import annotations

import hashlib
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import torch

from ..kernels.call import AttentionCall
from ..kernels.dense import dense_attention
from ..kernels.block_energy import block_energy, block_row_counts
from ..kernels.layouts import as_layout
from ..masks.bundle import MaskBundle
from ..masks.geometry import ModelSignature, TokenGrid, anchor_share, key_block_density
from ..masks.packing import pack_bits, row_counts
from ..masks.sigmas import same_sigma, step_fraction, step_sigmas
from .repetition import anchor_plan, decide_repetitive, repetition_scores
from .selection import (MASS_BINS, bin_histogram, global_threshold, keep_from_bins, kept_mass, mass_bins,
                        mean_block_mass, select_blocks, share_steps, vote)
from .settings import CalibrationSettings
from .stats import CalibrationStats, StatsError


class Calibrator:
    def __init__(self, signature: ModelSignature, grid: TokenGrid, settings: Optional[CalibrationSettings] = None, *,
                 progress: Optional[Callable[[int, Optional[int]], None]] = None, background: bool = True):
        """progress(done, total): steps finished in the current prompt and the schedule length (None if unknown).
        background: commit a finished prompt's votes on a worker thread (zlib and numpy release the GIL), so the
        CPU work overlaps the next prompt's GPU work; state(), merge() and finish() wait for it."""
        self.signature = signature
        self.grid = grid
        self.settings = settings if settings is not None else CalibrationSettings()
        self.stats = CalibrationStats(signature, grid, self.settings)
        self.geometry = self.stats.geometry
        self.progress = progress
        self.anchors, self.row_anchor = anchor_plan(grid, self.settings.anchors)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="calibatt-commit") if background \
            else None
        self._future = None
        self._record = None  # the prompt in progress: {sigma: {...}}
        self._queue: list = []
        self._key = None
        self._schedule = None
        self._sigma = None
        self._steps_seen = 0
        self.discarded_prompts = 0
        self._consts: dict = {}

    # ---- prompt lifecycle -----------------------------------------------------------------------------------
    def begin_prompt(self, sample_sigmas=None, key: Optional[str] = None):
        """Start a prompt. sample_sigmas: the sampler's schedule (as the host knows it; a trailing 0 is ignored),
        which gives each step its index t for eps(t); without it settings.steps must be set and steps are counted
        as distinct sigmas arrive. A prompt still open (interrupted, never ended) is discarded."""
        if self._record is not None:
            warnings.warn("Calibrator.begin_prompt(): the previous prompt was never ended (interrupted?); its "
                          "statistics are discarded. Hosts that sample one prompt in several runs (e.g. two experts) "
                          "should call begin_prompt once and set_schedule per run")
            self.abort_prompt()
        self._record = {}
        self._queue = []
        self._key = key
        self._sigma = None
        self._steps_seen = 0
        self._schedule = None
        if sample_sigmas is not None:
            self.set_schedule(sample_sigmas)

    def set_schedule(self, sample_sigmas):
        """Give the running prompt its sigma schedule (hosts that learn it only at the first model call)."""
        if self._record is None:
            raise RuntimeError("set_schedule() outside a prompt: call begin_prompt() first")
        self._schedule = step_sigmas(sample_sigmas.tolist() if torch.is_tensor(sample_sigmas) else sample_sigmas)

    def abort_prompt(self):
        """Forget the prompt in progress; committed statistics are untouched."""
        if self._record is not None:
            self.discarded_prompts += 1
        self._record = None
        self._queue = []
        self._sigma = None

    def end_prompt(self, save_to=None):
        """Commit the prompt. save_to: also save the statistics there once committed (on the worker thread when
        background, so neither the commit nor the save holds up the next prompt)."""
        if self._record is None:
            raise RuntimeError("end_prompt() without begin_prompt()")
        self._drain()
        record = self._finalise(self._record)
        key = self._key
        self._record = None
        self._sigma = None
        if self.progress is not None:
            total = len(self._schedule) if self._schedule is not None else self.settings.steps
            self.progress(self._steps_seen, total)
        if self._executor is None:
            self._commit(record, key, save_to)
        else:
            self.wait()  # at most one finished prompt in flight: bounds host memory to two prompts' bits
            self._future = self._executor.submit(self._commit, record, key, save_to)

    def _commit(self, record, key, save_to=None):
        if record:  # a prompt without positive rows has nothing to vote with
            # Commit into a copy and swap, so a failure leaves the previous statistics whole.
            new = self.stats.copy()
            new.commit_prompt(record, key)
            self.stats = new
        if save_to is not None:
            self.stats.save(save_to)

    def wait(self):
        """Wait for a background commit (and save); re-raises its error."""
        fut, self._future = self._future, None
        if fut is not None:
            fut.result()

    @property
    def in_prompt(self) -> bool:
        return self._record is not None

    # ---- the attention callback -----------------------------------------------------------------------------
    def observe(self, call: AttentionCall) -> torch.Tensor:
        """Dense attention output in the host layout; statistics from the positive rows of the call."""
        if self._record is None:
            raise RuntimeError("Calibrator.observe() outside a prompt: call begin_prompt() before the denoising run "
                               "and end_prompt() after it")
        q, k, v = call.bhld()
        self._check_call(call, q)
        out = call.dense() if call.dense is not None else call.to_host_layout(
            dense_attention(q, k, v, call.scale, text_bias=call.text_bias, video_start=call.video_start))
        rows = None if call.positive_rows is None else [int(r) for r in call.positive_rows]
        if rows is not None and not rows:
            return out  # a negative-only call (host runs the CFG branches separately)
        sigma = float(call.sigma)
        if self._sigma is None or not same_sigma(sigma, self._sigma):
            self._start_step(sigma)
        eps = self._record[self._step_key(sigma)]["eps"]
        ob = as_layout(out, "bhld", call.heads)
        if rows is not None and rows != list(range(q.shape[0])):
            if rows == list(range(rows[0], rows[0] + len(rows))):  # the usual case: a view, no copy
                q, k, ob = (t[rows[0]:rows[0] + len(rows)] for t in (q, k, ob))
            else:
                idx = torch.as_tensor(rows, dtype=torch.long, device=q.device)
                q, k, ob = q.index_select(0, idx), k.index_select(0, idx), ob.index_select(0, idx)
        g = self.geometry
        rows_t, anchors, row_anchor = self._device_consts(q.device)
        with torch.no_grad():
            stride = self.settings.stats_row_stride
            # Rotate the sampled rows with the step and layer (host ints: no sync). Not with the prompt: a prompt's
            # statistics must not depend on its key or on the order prompts run in (resumed and merged runs equal
            # one uninterrupted run), and the prompts' own noise already varies what a fixed row sees.
            offset = (self._record[self._step_key(sigma)]["t_index"] + int(call.layer)) % stride
            energy = block_energy(q, k, g, scale=call.scale, row_stride=stride, row_offset=offset,
                                  text_bias=call.text_bias_for(rows), video_start=call.video_start)
            mass = mean_block_mass(energy, g, q.shape[0], rows_t)
            del energy
            text = (1.0 - mass.sum(-1)).clamp(0.0, 1.0)
            glob = None
            if self.settings.selection == "global":
                # The threshold needs every layer of the step: hold the bins (1 byte per block) and the per-head
                # mass per bin until the step is drained, where the keep bits and the dropped mass are made.
                bins = mass_bins(mass)
                glob = (bins, bin_histogram(mass, bins), text.sum(-1))
                bits = None
                drop = torch.zeros(mass.shape[0], device=mass.device)
            else:
                keep = select_blocks(mass, eps, text)
                drop = (1.0 - kept_mass(mass, keep, text)).clamp_min(0.0).mean(-1)
                bits = pack_bits(keep)
            del mass
            if self.settings.repetition:
                err, frac = repetition_scores(ob, self.grid, anchors, row_anchor, self.settings.gamma, head_chunk=4,
                                              video_start=call.video_start)
            else:
                err = torch.ones_like(drop)
                frac = torch.zeros_like(drop)
            self._queue.append((sigma, int(call.layer), bits, torch.stack([err.float(), frac.float(),
                                                                            drop.float()]), glob))
        return out

    def _device_consts(self, device):
        # Small constants, copied to each device once: a copy per call from pageable memory would wait on the GPU.
        key = str(device)
        hit = self._consts.get(key)
        if hit is None:
            hit = self._consts[key] = (block_row_counts(self.geometry).to(device), self.anchors.to(device),
                                       self.row_anchor.to(device))
        return hit

    def _check_call(self, call: AttentionCall, q: torch.Tensor):
        # Video part only: joint-text models (Mochi, HunyuanVideo) bring a different number of text tokens with
        # each prompt. Masks cover video blocks; text keys are always computed and their share of each row's mass
        # is read per call (selection.py), so one calibration serves every text length, and either text position
        # (the call's grid says where its video starts; the statistics take that offset).
        problems = self.grid.mismatches(call.grid, text=False)
        if problems:
            raise ValueError("attention call does not match the calibrator's token grid: " + "; ".join(problems)
                             + ". Create the Calibrator with the grid of the latent being sampled")
        B, H, N, D = q.shape
        if H != self.signature.num_heads:
            raise ValueError(f"attention call has {H} heads; the model signature says {self.signature.num_heads}")
        if N != call.grid.total_tokens:
            raise ValueError(f"attention call has {N} tokens; its grid has {call.grid.total_tokens} "
                             f"({call.grid.video_tokens} video + {call.grid.text_tokens} text)")
        if not (0 <= int(call.layer) < self.signature.num_layers):
            raise ValueError(f"attention call layer {call.layer} outside [0, {self.signature.num_layers})")

    def _step_key(self, sigma: float):
        for s in self._record:
            if same_sigma(s, sigma):
                return s
        return None

    def _start_step(self, sigma: float):
        self._drain()
        self._sigma = sigma
        if self._step_key(sigma) is not None:
            return  # a step seen earlier in this prompt (second-order samplers revisit sigmas)
        if self._schedule is not None:
            T = len(self._schedule)
            t = self._schedule.index(sigma)
        else:
            if self.settings.steps is None:
                raise ValueError("eps(t) needs the schedule length: pass sample_sigmas to begin_prompt() or set "
                                 "CalibrationSettings.steps")
            T = int(self.settings.steps)
            t = min(self._steps_seen, T - 1)
        self._record[sigma] = {"t_index": t, "num_steps": T, "eps": self.settings.eps(t, T), "layers": {}}
        self._steps_seen += 1
        if self.progress is not None and self._steps_seen > 1:
            self.progress(self._steps_seen - 1, T)

    def _drain(self):
        """Move the queued per-call results of the current step to the host (one sync) and fold them in."""
        if not self._queue:
            return
        if self.settings.selection == "global":
            self._select_global()
        bits = torch.stack([it[2] for it in self._queue]).cpu().numpy()
        vals = torch.stack([it[3] for it in self._queue]).double().cpu().numpy()
        for i, (sigma, layer, _, _, _) in enumerate(self._queue):
            st = self._record[self._step_key(sigma)]
            lr = st["layers"].get(layer)
            if lr is None:
                st["layers"][layer] = {"bits": bits[i].copy(), "vals": vals[i].copy(), "n": 1}
            else:
                # Same (step, layer) twice in one prompt: keep the union, which reaches eps on either call's mass
                # and therefore on their mean.
                lr["bits"] |= bits[i]
                lr["vals"] += vals[i]
                lr["n"] += 1
        self._queue = []

    def _select_global(self):
        """selection "global": one mass threshold over every queued call of a step (all its layers, heads and query
        blocks), reaching eps(t) on the mean row; fills in each call's keep bits and dropped mass. On the device,
        no host read (the drain's one copy follows)."""
        nq = self.geometry.nq
        by_step: dict = {}
        for i, it in enumerate(self._queue):
            by_step.setdefault(self._step_key(it[0]), []).append(i)
        for key, idx in by_step.items():
            eps = self._record[key]["eps"]
            hist = sum(self._queue[i][4][1].sum(0) for i in idx)
            text = sum(self._queue[i][4][2].sum() for i in idx)
            rows = sum(int(self._queue[i][4][2].numel()) * nq for i in idx)
            thr = global_threshold(hist, text, rows, eps)
            for i in idx:
                sigma, layer, _, vals, (bins, h, t) = self._queue[i]
                keep = keep_from_bins(bins, thr)
                kept = (h * (torch.arange(MASS_BINS, device=h.device) >= thr)).sum(-1)  # [H] mass kept, summed
                vals = vals.clone()
                vals[2] = (1.0 - (t + kept) / nq).clamp_min(0.0)
                self._queue[i] = (sigma, layer, pack_bits(keep), vals, None)

    @staticmethod
    def _finalise(record):
        out = {}
        for sigma, st in record.items():
            layers = {}
            for layer, lr in st["layers"].items():
                v = lr["vals"] / lr["n"]
                layers[layer] = {"bits": lr["bits"], "rep_err": v[0], "rep_frac": v[1], "drop": v[2]}
            if layers:
                out[sigma] = {**{k: st[k] for k in ("t_index", "num_steps", "eps")}, "layers": layers}
        return out

    # ---- statistics -----------------------------------------------------------------------------------------
    def state(self) -> CalibrationStats:
        """The committed statistics (the prompt in progress is not part of them)."""
        self.wait()
        return self.stats

    def merge(self, stats: CalibrationStats):
        """Add statistics of other runs (resumable accumulation)."""
        self.wait()
        new = self.stats.copy()
        new.merge(stats)
        self.stats = new

    def close(self):
        self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    # ---- selection -> bundle --------------------------------------------------------------------------------
    def step_masks(self):
        """Per calibrated step (noisiest first): (sigma, packed voted mask [L, H, nq, nkb] uint8 with the diagonal,
        repetitive heads [L, H] bool, StepRecord)."""
        st = self.state()
        if st.num_prompts == 0:
            raise StatsError("no calibration prompt was committed: run at least one prompt to the end "
                             "(begin_prompt / observe / end_prompt) before finish()")
        g = self.geometry
        L, H = st.num_layers, st.num_heads
        diag = g.diagonal()
        rep_share = anchor_share(g.num_tokens, self.grid.frame_tokens, int(self.anchors.numel()))
        s = self.settings
        out = []
        for sid in st.step_order():
            packed = []
            for layer in range(L):
                counts = st.get_counts(sid, layer)
                n = int(st.observed[sid][layer])
                if counts is None or n == 0:
                    mask = torch.ones(H, g.nq, g.nk, dtype=torch.bool)  # never observed: stay dense
                else:
                    mask = vote(torch.from_numpy(counts), n, s.rho)
                packed.append(pack_bits(mask | diag))
            packed = torch.stack(packed)
            density = key_block_density(row_counts(packed).sum(-1), g.nq, g.nk)  # [L, H]
            n = st.observed[sid].double().clamp_min(1.0)[:, None]
            rep = torch.zeros(L, H, dtype=torch.bool)
            if s.repetition:
                rep = decide_repetitive(st.rep_err[sid] / n, st.rep_frac[sid] / n, st.drop[sid] / n, density,
                                        rep_share, s.rep_min_fraction)
                rep &= (st.observed[sid] > 0)[:, None]
            out.append((st.steps[sid].sigma, packed, rep, st.steps[sid]))
        return out

    def finish(self) -> MaskBundle:
        """Vote, repetition, sharing and dedup -> MaskBundle. Writes nothing; save it with masks.save_bundle."""
        st = self.state()
        steps = self.step_masks()
        sigmas = [x[0] for x in steps]
        step_t = [step_fraction(x[3].t_index, x[3].num_steps) for x in steps]
        step_bucket, bucket_masks, bucket_rep = share_steps([x[1] for x in steps], step_t, self.settings.share_iou,
                                                            self.settings.share_after, [x[2] for x in steps])
        del steps
        # Every repetitive head of a calibration shares its one anchor plan (row 0).
        slots = [None if r is None else torch.where(r, 0, -1).to(torch.int32) for r in bucket_rep]
        # The settings once, as given (preset, A, C, k, rho, gamma, seed, sampler, ...); beside them only what the run
        # produced. "anchors" is the anchor rows of the whole grid (calibration.anchors is per frame), "steps" the
        # calibrated sigmas (calibration.steps is the schedule length). Bundles written before this also carry eps,
        # rho, gamma, seed, sampler and share_iou here, copies of the calibration record; readers take either.
        settings = {
            "calibration": self.settings.to_dict(),
            "anchors": int(self.anchors.numel()), "prompts": st.num_prompts, "steps": len(sigmas),
            "eps_per_step": [round(st.steps[i].eps, 6) for i in st.step_order()],
            "repetitive_entries": int(sum(int(r.sum()) for r in bucket_rep)),
        }
        return MaskBundle.from_packed(self.signature, self.grid, self.geometry, bucket_masks, sigmas, step_bucket,
                                      bucket_rep=slots, rep_anchors=self.anchors[None],
                                      rep_row_anchor=self.row_anchor[None], settings=settings)


def prompt_key(prompt) -> str:
    """A stable key for a prompt (what resumable runs use to skip prompts already done)."""
    return hashlib.sha1(repr(prompt).encode("utf-8")).hexdigest()[:16]


def calibrate(run_prompt: Callable, prompts, calibrator: Calibrator, *, keys=None,
              progress: Optional[Callable[[int, int], None]] = None, stats_path=None, save_every: int = 1,
              bundle_path=None) -> MaskBundle:
    """Drive a calibration: for each prompt, begin_prompt, run_prompt(prompt, calibrator) (the host runs one whole
    denoising with calibrator.observe as its self-attention, and may call calibrator.set_schedule), end_prompt.

    stats_path: statistics are loaded from it when it exists (prompts whose key is already in it are skipped) and
    saved to it every `save_every` prompts, so an interrupted run resumes where it stopped. progress(done, total)
    counts prompts. An exception inside a prompt discards that prompt, keeps the statistics saved so far, writes no
    bundle, and propagates. bundle_path: where to save the bundle (atomically) once all prompts are done.
    """
    from ..masks.bundle_file import save_bundle

    prompts = list(prompts)
    keys = [prompt_key(p) for p in prompts] if keys is None else [str(k) for k in keys]
    if len(keys) != len(prompts) or len(set(keys)) != len(keys):
        raise ValueError("calibrate(): keys must be unique, one per prompt")
    have = set(calibrator.state().prompt_keys)
    if stats_path is not None and Path(stats_path).is_file():
        loaded = CalibrationStats.load(stats_path)
        if not set(loaded.prompt_keys) <= have:
            calibrator.merge(loaded)
            have |= set(loaded.prompt_keys)
    total = len(prompts)
    done = 0
    since_save = 0
    for prompt, key in zip(prompts, keys):
        if key in have:
            done += 1
            if progress is not None:
                progress(done, total)
            continue
        calibrator.begin_prompt(key=key)
        try:
            run_prompt(prompt, calibrator)
        except BaseException:
            calibrator.abort_prompt()
            try:
                calibrator.wait()  # let the previous prompt's commit and save land before propagating
            except Exception as e:  # the interrupt is the error to report; the save problem is secondary
                warnings.warn(f"calibration statistics of the previous prompt were not saved: {e}")
            raise
        done += 1
        since_save += 1
        save = stats_path is not None and since_save >= max(1, save_every)
        calibrator.end_prompt(save_to=stats_path if save else None)
        if save:
            since_save = 0
        if progress is not None:
            progress(done, total)
    if stats_path is not None and since_save:
        calibrator.state().save(stats_path)
    bundle = calibrator.finish()
    if bundle_path is not None:
        save_bundle(bundle, bundle_path)
    return bundle
