"""SparseRunner: given a bundle and an AttentionCall, run the right attention.

Per step (not per call) it picks the sigma bucket and builds that bucket's skip lists on the call's device; per
call it dispatches: dense where the step is in a dense window or the bundle's entry is dense, otherwise the
block-sparse path for the device (Triton on CUDA when available, the reference on CPU).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..masks.bundle import MaskBundle
from .call import AttentionCall
from .dense import dense_attention
from .reference import sparse_attention_reference


class SparseRunner:
    def __init__(self, bundle: MaskBundle, *, dense_first: float = 0.0, dense_last: float = 0.0):
        if not (0.0 <= dense_first <= 1.0 and 0.0 <= dense_last <= 1.0):
            raise ValueError("dense_first and dense_last are fractions of the steps in [0, 1]")
        self.bundle = bundle
        self.dense_first = dense_first
        self.dense_last = dense_last
        self._step_key = None
        self._skip = None
        self._dense_step = False

    def begin_step(self, sigma: float, device, step_fraction: Optional[float] = None):
        """Call once per denoising step with the host-side sigma and, when known, the position in the schedule
        (0 = first step, 1 = last). Cheap when the bucket did not change."""
        self._dense_step = step_fraction is not None and (
            step_fraction < self.dense_first or step_fraction > 1.0 - self.dense_last - 1e-9)
        bucket = self.bundle.bucket_for_sigma(float(sigma))
        key = (bucket, str(torch.device(device)))
        if key != self._step_key:
            self._skip = self.bundle.skip_lists(bucket, device)
            self._step_key = key
        return bucket

    def end(self):
        self._skip = None
        self._step_key = None
        self.bundle.release()

    def __call__(self, call: AttentionCall) -> torch.Tensor:
        if self._skip is None or self._step_key[1] != str(call.q.device):
            self.begin_step(call.sigma, call.q.device)
        if self._dense_step:
            return self._dense(call)
        q, k, v = call.bhld()
        layer = self._skip.layer(call.layer)
        out = sparse_attention_reference(q, k, v, layer, scale=call.scale)
        return call.to_host_layout(out)

    @staticmethod
    def _dense(call: AttentionCall) -> torch.Tensor:
        if call.dense is not None:
            return call.dense()
        q, k, v = call.bhld()
        return call.to_host_layout(dense_attention(q, k, v, scale=call.scale))
