"""Plain-PyTorch skip-list table builder: the specification `triton_build.py` must match (kept key blocks of each
row ascending, padded to the table width by repeating the last, full heads listing every key block).

The function itself lives in masks/skiplists.py (`packed_to_table`) because `MaskBundle.skip_lists` builds whole
buckets with it and masks/ does not import kernels/; it is named here so that every op of kernels/ has its
reference beside its Triton version, as attention/ and block_energy/ do."""

from ...masks.skiplists import packed_to_table

__all__ = ["packed_to_table"]
