"""Sigma -> step and sigma -> bucket. Buckets are sigma intervals, so any sampler and step count finds its masks;
every host and the calibrator find a sigma's step in their schedule by the same rule (SigmaSteps)."""

from __future__ import annotations

import bisect
import math

from .errors import BundleError


def validate_sigmas(calibrated_sigmas, step_bucket, num_buckets: int, path=None):
    s = [float(x) for x in calibrated_sigmas]
    if not s:
        raise BundleError("no calibrated sigmas", path=path, field="sigmas.calibrated")
    if any(not math.isfinite(x) or x < 0 for x in s):
        raise BundleError("calibrated sigmas must be finite and >= 0", path=path, field="sigmas.calibrated")
    if any(a <= b for a, b in zip(s, s[1:])):
        raise BundleError("calibrated sigmas must be strictly decreasing (noisiest step first)",
                          path=path, field="sigmas.calibrated")
    if len(step_bucket) != len(s):
        raise BundleError(f"step_bucket has {len(step_bucket)} entries for {len(s)} calibrated sigmas",
                          path=path, field="sigmas.step_bucket")
    if any(not (0 <= int(b) < num_buckets) for b in step_bucket):
        raise BundleError(f"step_bucket entries must be in [0, {num_buckets})", path=path, field="sigmas.step_bucket")
    if sorted(set(int(b) for b in step_bucket)) != list(range(num_buckets)):
        raise BundleError("every bucket must be used by at least one calibrated step",
                          path=path, field="sigmas.step_bucket")


# Sigmas closer than this (relative) are one step: a sampler hands the model the same sigma through float32 and
# float64 paths, and a second-order sampler revisits it.
SIGMA_RTOL = 1e-4


def same_sigma(a: float, b: float) -> bool:
    return abs(a - b) <= SIGMA_RTOL * max(1.0, abs(a), abs(b))


class SigmaSteps:
    """The one sigma -> step rule: the index of the nearest entry of a schedule (noisiest first). Exactly halfway
    between two entries the less noisy one wins, so entry i serves the sigmas in (midpoint below, midpoint above]:
    the ranges a bundle file records. A schedule out of order (hand-made sigmas) is searched entry by entry."""

    def __init__(self, sigmas):
        self.sigmas = [float(x) for x in sigmas]
        if not self.sigmas:
            raise ValueError("a sigma schedule needs at least one sigma")
        self._ordered = all(a >= b for a, b in zip(self.sigmas, self.sigmas[1:]))
        # Ascending midpoints for bisect.
        self._mid = sorted((a + b) / 2 for a, b in zip(self.sigmas, self.sigmas[1:]))

    def __len__(self) -> int:
        return len(self.sigmas)

    def index(self, sigma: float) -> int:
        sigma = float(sigma)
        if not self._ordered:
            return min(range(len(self.sigmas)), key=lambda i: (abs(self.sigmas[i] - sigma), self.sigmas[i]))
        # Index counted from the low-sigma end, then flipped (sigmas are noisiest first).
        return len(self.sigmas) - 1 - bisect.bisect_left(self._mid, sigma)


def schedule_steps(sample_sigmas) -> SigmaSteps:
    """The steps of a sampler's schedule as samplers hand it over (ComfyUI, diffusers): n + 1 sigmas, the last one
    the sigma the run ends at (usually 0), which is never evaluated."""
    s = [float(x) for x in sample_sigmas]
    return SigmaSteps(s[:max(1, len(s) - 1)])


def step_sigmas(sigmas) -> SigmaSteps:
    """The steps of a list of step sigmas that may end with the final 0 (the calibrator takes either form)."""
    s = [float(x) for x in sigmas]
    if s and s[-1] == 0.0:
        s = s[:-1]
    if not s:
        raise ValueError("sample_sigmas is empty: pass the sampler's sigma schedule (noisiest first)")
    return SigmaSteps(s)


def schedule_fraction(steps: SigmaSteps, sigma: float) -> float:
    """step_fraction of the step `sigma` belongs to in `steps`."""
    return step_fraction(steps.index(sigma), len(steps))


def step_fraction(index: int, num_steps: int) -> float:
    """Where step `index` of a `num_steps`-step run starts in the schedule: 0 for the first, (n - 1) / n for the
    last (the share of the run already done)."""
    return index / max(1, num_steps)


def in_dense_window(fraction, dense_first: float, dense_last: float) -> bool:
    """The step at schedule fraction `fraction` (step_fraction; None = unknown) is in the first `dense_first` or the
    last `dense_last` of the run (fractions of the steps), which run dense."""
    return fraction is not None and (fraction < dense_first or fraction > 1.0 - dense_last - 1e-9)


class SigmaBuckets:
    """Maps a sigma to the bucket of the nearest calibrated sigma (SigmaSteps)."""

    def __init__(self, calibrated_sigmas, step_bucket):
        self._steps = SigmaSteps(calibrated_sigmas)  # strictly decreasing (validate_sigmas)
        self.sigmas = self._steps.sigmas
        self.step_bucket = [int(b) for b in step_bucket]
        self._mid = self._steps._mid

    def step_for_sigma(self, sigma: float) -> int:
        return self._steps.index(sigma)

    def bucket_for_sigma(self, sigma: float) -> int:
        return self.step_bucket[self.step_for_sigma(sigma)]

    def edges(self):
        """Per bucket, the (low, high] sigma ranges it serves, as a list of lists of (low, high) pairs."""
        n = max(self.step_bucket) + 1
        out = [[] for _ in range(n)]
        mids = sorted(self._mid, reverse=True)
        for i, b in enumerate(self.step_bucket):
            hi = math.inf if i == 0 else mids[i - 1]
            lo = 0.0 if i == len(self.sigmas) - 1 else mids[i]
            out[b].append((lo, hi))
        return out
