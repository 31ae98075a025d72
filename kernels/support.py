"""Which calls the Triton kernels take, in one place, and the one exception for a call they do not take.

A call outside this (CPU tensors, float32, a head_dim the kernels were not built for, mask blocks without a
power-of-two divisor >= 16) is valid input: the dispatchers (runner.py, block_energy/) run the plain-PyTorch
reference or dense attention instead. KernelUnsupported is raised only for such calls, never for bad input (which
raises a plain ValueError), so a dispatcher can tell "fall back" from "the caller made a mistake" by type.
KernelHealth remembers, per runner, which (device, dtype, head_dim) failed to compile or launch, so one failure on
an untested GPU costs one warning and that shape runs dense attention from then on (runner.py).
"""

from __future__ import annotations

from typing import Optional

import torch

TRITON_HEAD_DIMS = (16, 32, 64, 128)
TRITON_DTYPES = (torch.float16, torch.bfloat16)
# Precision of the computed blocks (kernels/attention/triton_fp8.py): bf16 as given, or 8-bit Q·K (e4m3 or int8)
# with P·V in e4m3 or bf16. name -> (Q·K in int8 (else e4m3), P·V in e4m3 (else bf16)).
QUANTIZED = {"fp8": (False, True), "fp8-qk": (False, False), "int8": (True, True), "int8-qk": (True, False)}
PRECISIONS = ("bf16",) + tuple(QUANTIZED)
# The runner's next try for a layer over the error bound: the same Q·K with P·V in bf16 (kernels/runner.py).
QK_ONLY = {"fp8": "fp8-qk", "int8": "int8-qk"}


def precision_capability(precision: str) -> tuple:
    """The smallest CUDA capability a precision runs on: int8 tensor cores from Ampere (sm80), e4m3 from Ada
    (sm89); bf16 everywhere the kernels run."""
    if precision == "bf16":
        return (0, 0)
    qk_int8, pv_fp8 = QUANTIZED[precision]
    return (8, 9) if pv_fp8 or not qk_int8 else (8, 0)


# 8-bit Q·K needs at least this head_dim (the e4m3 / int8 MMA's K dimension).
MIN_8BIT_HEAD_DIM = 32


def precision_unsupported(precision: str, device: torch.device, head_dim: int) -> Optional[str]:
    """None if the Triton kernel can compute blocks in `precision` for this call, else why not: the one check for
    8-bit support (the kernel asks it and raises KernelUnsupported, which the runner catches). Triton's
    interpreter emulates every format."""
    if precision == "bf16":
        return None
    if head_dim < MIN_8BIT_HEAD_DIM:
        return f"precision {precision} needs head_dim >= {MIN_8BIT_HEAD_DIM}, this call has {head_dim}"
    import sys
    if "triton" in sys.modules:  # (the interpreter is a Triton setting; no Triton loaded, no interpreter)
        from .triton_common import interpreting
        if interpreting():
            return None
    need = precision_capability(precision)
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < need:
        return (f"precision {precision} needs a GPU with its 8-bit tensor cores (CUDA capability "
                f"{need[0]}.{need[1]}+: int8 from Ampere, e4m3 from Ada / Hopper); this call runs on {device}")
    return None


# The largest relative error (L2, over a call's whole output) an FP8 layer may have against the same layer in bf16
# for the runner to keep it in FP8; checked on each layer's first call of a run (docs/BENCHMARKS.md, "FP8").
FP8_ERROR_BOUND = 0.05


class KernelUnsupported(ValueError):
    """The call is valid but outside what the Triton kernels handle (device, dtype, head_dim, mask block size)."""


def triton_unsupported(*tensors: torch.Tensor, need_cuda: bool = True) -> Optional[str]:
    """Why the Triton kernels cannot take these q/k/v tensors, or None when they can: on a CUDA device (unless
    need_cuda is False: the interpreter tests), float16 or bfloat16 all alike, head_dim 16, 32, 64 or 128 all
    alike. Reads shapes and dtypes only (no host sync)."""
    first = tensors[0]
    if need_cuda and not first.is_cuda:
        return f"tensors on {first.device}, the Triton kernels need a CUDA GPU"
    if first.dtype not in TRITON_DTYPES or any(t.dtype != first.dtype for t in tensors):
        return ("the Triton kernels take float16 or bfloat16 tensors of one dtype, got "
                + "/".join(str(t.dtype) for t in tensors))
    D = first.shape[-1]
    if D not in TRITON_HEAD_DIMS or any(t.shape[-1] != D for t in tensors):
        return (f"head_dim {'/'.join(str(t.shape[-1]) for t in tensors)} is not supported by the Triton kernels "
                f"({', '.join(map(str, TRITON_HEAD_DIMS))})")
    return None


def check_triton(*tensors: torch.Tensor, need_cuda: bool = True):
    """Raise KernelUnsupported with the reason unless the Triton kernels take these tensors."""
    reason = triton_unsupported(*tensors, need_cuda=need_cuda)
    if reason is not None:
        raise KernelUnsupported(reason)


class KernelHealth:
    """Which Triton paths failed at run time (compile or launch errors on a GPU the kernels were not tried on),
    per key, e.g. ("attention", device, dtype, head_dim). Owned by one runner: no module-level state."""

    def __init__(self):
        self._failed: set = set()

    def ok(self, key) -> bool:
        return key not in self._failed

    @property
    def failures(self) -> list:
        """The keys that failed so far (benchmarks and tests report them)."""
        return sorted(self._failed, key=str)

    def mark_failed(self, key):
        """Record a failure (the caller warns, naming the path and its fallback)."""
        self._failed.add(key)
