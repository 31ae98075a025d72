"""Sequence parallelism (several GPUs) for calibrated sparse attention: what an existing distributed engine (xDiT's
yunchang USP: Ulysses and Ring) needs to run our skip lists and to calibrate. Plain PyTorch (torch.distributed);
no ComfyUI import and no engine import (yunchang modules are patched through their attributes). docs/PARALLEL.md.
Layering: masks -> kernels -> calibration -> parallel."""

from .calibration import SequenceParallelCalibration
from .heads import HeadAssignment, SlotLayout, assign_heads, contiguous_heads, head_costs, slice_layer
from .ring import RingPlan, merge_partial, partial_attention, ring_sparse_attention
from .usp import SequenceParallelSparse

__all__ = ["HeadAssignment", "SlotLayout", "assign_heads", "contiguous_heads", "head_costs", "slice_layer",
           "RingPlan", "merge_partial", "partial_attention", "ring_sparse_attention", "SequenceParallelSparse",
           "SequenceParallelCalibration"]
