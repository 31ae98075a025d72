"""Block-sparse attention over a skip list: the plain-PyTorch reference (naive.py) and the Triton forward
(triton_fwd.py, imported lazily by kernels/runner.py so that importing the package never imports Triton)."""

from .naive import sparse_attention_reference

__all__ = ["sparse_attention_reference"]
