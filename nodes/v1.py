"""V1 node classes (NODE_CLASS_MAPPINGS) for ComfyUI versions without the V3 API: thin shells over actions."""

from __future__ import annotations

from . import actions, specs
from .specs import NodeSpec, input_types_v1


class _Base:
    SPEC: NodeSpec = None
    CATEGORY = specs.CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return input_types_v1(cls.SPEC)


def declare(spec: NodeSpec):
    """Class decorator: the V1 class attributes ComfyUI reads, from the spec."""
    def apply(cls):
        cls.SPEC = spec
        cls.RETURN_TYPES = tuple(o.type for o in spec.outputs)
        cls.RETURN_NAMES = tuple(o.name for o in spec.outputs)
        cls.OUTPUT_TOOLTIPS = tuple(o.tooltip for o in spec.outputs)
        cls.DESCRIPTION = spec.description
        cls.OUTPUT_NODE = spec.output_node
        cls.FUNCTION = "run"
        return cls
    return apply


@declare(specs.LOAD)
class LoadMaskBundle(_Base):
    def run(self, bundle_name, hub_reference=""):
        return actions.load_mask_bundle(bundle_name, hub_reference)

    @classmethod
    def IS_CHANGED(cls, bundle_name, hub_reference=""):
        return actions.bundle_file_fingerprint(bundle_name, hub_reference)

    @classmethod
    def VALIDATE_INPUTS(cls, bundle_name, hub_reference=""):
        return actions.validate_load_inputs(bundle_name, hub_reference)


@declare(specs.PATCH)
class PatchModelAttention(_Base):
    def run(self, model, bundle, dense_first_percent=0.0, dense_last_percent=0.0, quality=0.0,
            precision="bf16"):
        return (actions.patch_model_attention(model, bundle, dense_first_percent, dense_last_percent, quality,
                                              precision),)


@declare(specs.CALIBRATE)
class CalibrateSparseAttention(_Base):
    def run(self, **kwargs):
        from .calibrate_run import calibrate_sparse_attention

        return calibrate_sparse_attention(**kwargs)


@declare(specs.PREVIEW)
class MaskBundlePreview(_Base):
    def run(self, bundle):
        return (actions.preview_bundle(bundle),)


NODE_CLASS_MAPPINGS = {c.SPEC.node_id: c for c in (LoadMaskBundle, PatchModelAttention, CalibrateSparseAttention,
                                                    MaskBundlePreview)}
NODE_DISPLAY_NAME_MAPPINGS = {k: c.SPEC.display_name for k, c in NODE_CLASS_MAPPINGS.items()}
