"""What the nodes do, once, for both node APIs (V3 classes in v3.py, V1 classes in v1.py are thin shells).

Engine work stays in masks/, kernels/ and calibration/; this module only connects it to ComfyUI objects.
"""

from __future__ import annotations

import logging
import os

from ..kernels.runner import SparseRunner, quality_cutoff
from ..masks import load_bundle
from ..masks.bundle import MaskBundle
from . import hub_source, paths
from .comfy_glue import describe_model, install
from .model_info import UnsupportedModel, family_layout, signature_from_config, video_grid_for_check
from .preview import preview_images
from .routing import AttentionRouter

log = logging.getLogger("calibatt")


# ---------------------------------------------------------------------------------------------- Load Mask Bundle
def load_mask_bundle(bundle_name: str, hub_reference: str = ""):
    """-> (MaskBundle, summary). A hub reference (when set) or a catalog entry is downloaded and verified first
    (HubError says what went wrong and what to do); a bad file raises the loader's BundleError (file, field, fix)."""
    if (hub_reference and hub_reference.strip()) or hub_source.is_catalog_label(bundle_name):
        return hub_source.load(bundle_name, hub_reference)
    path = paths.bundle_path(bundle_name)
    bundle = load_bundle(path)
    return bundle, bundle.summary()


def bundle_file_fingerprint(bundle_name: str, hub_reference: str = "") -> str:
    """Changes when the file is rewritten (e.g. re-calibrated under the same name), so ComfyUI reloads it."""
    if (hub_reference and hub_reference.strip()) or hub_source.is_catalog_label(bundle_name):
        return hub_source.fingerprint(bundle_name, hub_reference)
    try:
        st = os.stat(paths.bundle_path(bundle_name))
        return f"{st.st_mtime_ns}:{st.st_size}"
    except OSError:
        return bundle_name


def validate_load_inputs(bundle_name, hub_reference: str = ""):
    """True, or the message ComfyUI shows when the prompt is queued."""
    return hub_source.validate(bundle_name, hub_reference)


# ----------------------------------------------------------------------------------------- Patch Model Attention
def patch_model_attention(model, bundle: MaskBundle, dense_first_percent: float = 0.0,
                          dense_last_percent: float = 0.0, quality: float = 0.0, precision: str = "bf16"):
    """A clone of `model` whose self-attention follows `bundle`. Unknown model families come back unpatched with
    a warning; a bundle for another model raises BundleError now, one for another video size at sampling start."""
    if not isinstance(bundle, MaskBundle):
        raise TypeError(f"expected a MASK_BUNDLE from Load Mask Bundle or Calibrate Sparse Attention, got "
                        f"{type(bundle).__name__}")
    try:
        cfg = describe_model(model)
        layout = family_layout(cfg)
        signature = signature_from_config(cfg)
    except UnsupportedModel as e:
        log.warning("Patch Model Attention: %s; the model runs unpatched (dense attention).", e)
        return model
    bundle.check_compatible(signature, None)
    runner = SparseRunner(bundle, dense_first=float(dense_first_percent) / 100.0,
                          dense_last=float(dense_last_percent) / 100.0, dense_cutoff=quality_cutoff(quality),
                          precision=precision)
    router = AttentionRouter(signature, layout, cfg, handler=runner, step_hook=runner.begin_step,
                             name="Patch Model Attention")

    def on_begin(grid):
        bundle.check_compatible(signature, video_grid_for_check(grid, bundle.grid))
        log.info("Patch Model Attention: sparse self-attention on, %s (dense first %.0f%%, last %.0f%%, "
                 "quality %.2f, %s)", bundle.summary(), dense_first_percent, dense_last_percent, quality,
                 precision)

    return install(model, router, cfg, on_begin=on_begin, on_end=runner.end)


# ------------------------------------------------------------------------------------------- Mask Bundle Preview
def preview_bundle(bundle: MaskBundle):
    return preview_images(bundle)


__all__ = ["load_mask_bundle", "bundle_file_fingerprint", "validate_load_inputs", "patch_model_attention",
           "preview_bundle"]
