"""Mask bundles and compiled skip lists: the "which blocks" side of the engine (plain PyTorch, no ComfyUI)."""

from .bundle import FORMAT, FORMAT_VERSION, MaskBundle
from .bundle_file import load_bundle, save_bundle
from .errors import BundleError
from .geometry import ModelSignature, TokenGrid
from .skiplists import BlockGeometry, LayerRepetition, LayerSkipList, RepetitionPlan, SkipLists, mask_to_table

__all__ = [
    "FORMAT", "FORMAT_VERSION", "MaskBundle", "load_bundle", "save_bundle", "BundleError", "ModelSignature",
    "TokenGrid", "BlockGeometry", "LayerRepetition", "LayerSkipList", "RepetitionPlan", "SkipLists",
    "mask_to_table",
]
