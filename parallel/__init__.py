"""Sequence parallelism (several GPUs) for calibrated sparse attention: the pieces an existing distributed engine
(xDiT / yunchang USP) needs to run our skip lists. Plain PyTorch (torch.distributed); no ComfyUI, no engine import
at module level (parallel/usp.py imports yunchang only when asked to patch it). docs/PARALLEL.md."""

from .heads import HeadAssignment, assign_heads, contiguous_heads, head_costs, slice_layer
from .ring import RingPlan, merge_partial, partial_attention, ring_sparse_attention
from .usp import SequenceParallelSparse

__all__ = ["HeadAssignment", "assign_heads", "contiguous_heads", "head_costs", "slice_layer", "RingPlan",
           "merge_partial", "partial_attention", "ring_sparse_attention", "SequenceParallelSparse"]
