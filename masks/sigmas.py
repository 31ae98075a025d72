"""Sigma -> bucket lookup. Buckets are sigma intervals, so any sampler and step count finds its masks."""

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


class SigmaBuckets:
    """Maps a sigma to the bucket of the nearest calibrated sigma (boundaries at midpoints)."""

    def __init__(self, calibrated_sigmas, step_bucket):
        self.sigmas = [float(x) for x in calibrated_sigmas]  # strictly decreasing
        self.step_bucket = [int(b) for b in step_bucket]
        # Ascending midpoints for bisect.
        self._mid = sorted((a + b) / 2 for a, b in zip(self.sigmas, self.sigmas[1:]))

    def step_for_sigma(self, sigma: float) -> int:
        # Index counted from the low-sigma end, then flipped (sigmas are stored noisiest first).
        from_low = bisect.bisect_left(self._mid, float(sigma))
        return len(self.sigmas) - 1 - from_low

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
