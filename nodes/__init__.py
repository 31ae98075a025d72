"""ComfyUI nodes of the package.

Importing this package needs no ComfyUI: the ComfyUI-facing modules (registry, v1, v3, comfy_glue, paths,
actions, calibrate_run) are imported only by the root __init__ when ComfyUI loads the custom node, while
model_info, routing, preview and specs are plain and unit-tested on their own.
"""
