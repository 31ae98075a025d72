"""The community hub: bundle references, their download into models/sparse_attention/hub/, cards and the catalog.

Plain Python over huggingface_hub (hf:// references) and requests (other https:// links); no ComfyUI import. Load
Mask Bundle reaches it through nodes/hub_source.py. Command line (any checkout folder name, run from the
checkout): `python -m hub card BUNDLE` (see docs/HUB.md).

This file imports nothing on purpose: `python -m hub` imports it as a top-level package, where the relative
imports of the modules below (to masks/) cannot work; hub/__main__.py loads the checkout as a package first.
"""
