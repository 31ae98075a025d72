"""Attention execution: the plain-PyTorch reference and (on CUDA) the Triton kernels, behind one dispatch.

The Triton modules (attention/triton_fwd.py, attention/triton_fp8.py, block_energy/triton_fwd.py,
tables/triton_build.py, and triton_common.py which they share) are imported lazily by the dispatchers (runner.py,
block_energy/__init__.py, tables/__init__.py), so importing the package never compiles or even imports Triton.
"""

from .layouts import LAYOUTS, from_bhld, to_bhld
from .attention.naive import sparse_attention_reference

__all__ = ["LAYOUTS", "from_bhld", "to_bhld", "sparse_attention_reference"]
