"""CalibAtt sparse attention for ComfyUI video models.

The repository root is the ComfyUI custom-node package (any folder name works: every import inside is
relative). Importing it without ComfyUI gives the plain-PyTorch engine (masks, kernels, calibration); inside
ComfyUI it also registers the nodes (V3 comfy_entrypoint where available, else V1 NODE_CLASS_MAPPINGS).
"""

import sys

from .version import __version__


def _inside_comfyui() -> bool:
    # ComfyUI imports its own modules (folder_paths, comfy.*) before it loads custom nodes.
    return "folder_paths" in sys.modules and "comfy" in sys.modules


if _inside_comfyui():
    from .nodes import registry as _registry

    WEB_DIRECTORY = "./web"
    if _registry.API == "v3":
        comfy_entrypoint = _registry.comfy_entrypoint
        __all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
    else:
        NODE_CLASS_MAPPINGS = _registry.NODE_CLASS_MAPPINGS
        NODE_DISPLAY_NAME_MAPPINGS = _registry.NODE_DISPLAY_NAME_MAPPINGS
        __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
