"""Attention execution: the plain-PyTorch reference and (on CUDA) the Triton kernels, behind one dispatch.

The Triton modules (triton_attention, triton_stats, triton_tables) are imported lazily by the dispatchers
(runner.py, stats.py, bucket_tables.py), so importing the package never compiles or even imports Triton.
"""

from .layouts import LAYOUTS, from_bhld, to_bhld
from .attention.naive import sparse_attention_reference

__all__ = ["LAYOUTS", "from_bhld", "to_bhld", "sparse_attention_reference"]
