"""Attention execution: the plain-PyTorch reference and (on CUDA) the Triton kernels, behind one dispatch."""

from .layouts import LAYOUTS, from_bhld, to_bhld
from .reference import sparse_attention_reference

__all__ = ["LAYOUTS", "from_bhld", "to_bhld", "sparse_attention_reference"]
