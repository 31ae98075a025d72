"""Pick the node API for the running ComfyUI and register models/sparse_attention/.

V3 (comfy_entrypoint) where comfy_api.latest provides it, else the V1 NODE_CLASS_MAPPINGS. Only one of the two is
exported: ComfyUI 0.3.x loads V1 first when both exist. CALIBATT_NODE_API=v1 forces the V1 classes (used to test
the fallback on a ComfyUI that has V3).
"""

from __future__ import annotations

import logging
import os

from . import paths

log = logging.getLogger("calibatt")

paths.register()


def v3_available() -> bool:
    try:
        from comfy_api.latest import ComfyExtension, io  # noqa: F401
    except Exception:  # any import problem means: use V1
        return False
    return all(hasattr(io, name) for name in ("ComfyNode", "Schema", "Custom", "NodeOutput"))


API = "v3" if os.environ.get("CALIBATT_NODE_API", "auto").lower() != "v1" and v3_available() else "v1"

if API == "v3":
    from .v3 import comfy_entrypoint

    NODE_CLASS_MAPPINGS = None
    NODE_DISPLAY_NAME_MAPPINGS = None
else:
    from .v1 import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    comfy_entrypoint = None
