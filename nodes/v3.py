"""V3 nodes (comfy_entrypoint -> ComfyExtension) for ComfyUI versions that have comfy_api.latest: thin shells."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import actions, specs
from .specs import In, NodeSpec

MaskBundleType = io.Custom(specs.BUNDLE)

_TYPES = {
    "MODEL": io.Model, "CLIP": io.Clip, "CONDITIONING": io.Conditioning, "IMAGE": io.Image, "LATENT": io.Latent,
    "STRING": io.String,
    "INT": io.Int, "FLOAT": io.Float, specs.BUNDLE: MaskBundleType,
}


def _input_v3(i: In):
    common = dict(optional=i.optional, tooltip=i.tooltip or None)
    if i.type == "COMBO":
        return io.Combo.Input(i.name, options=i.choices(), default=i.default, **common)
    if i.type == "INT":
        return io.Int.Input(i.name, default=i.default, min=i.min, max=i.max, step=i.step,
                            control_after_generate=True if i.seed else None, **common)
    if i.type == "FLOAT":
        return io.Float.Input(i.name, default=i.default, min=i.min, max=i.max, step=i.step, **common)
    if i.type == "STRING":
        return io.String.Input(i.name, default=i.default, multiline=i.multiline, **common)
    return _TYPES[i.type].Input(i.name, **common)


def schema(spec: NodeSpec) -> io.Schema:
    return io.Schema(
        node_id=spec.node_id, display_name=spec.display_name, category=specs.CATEGORY,
        description=spec.description, is_output_node=spec.output_node,
        inputs=[_input_v3(i) for i in spec.inputs],
        outputs=[_TYPES[o.type].Output(display_name=o.name, tooltip=o.tooltip) for o in spec.outputs],
    )


class LoadMaskBundle(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(specs.LOAD)

    @classmethod
    def fingerprint_inputs(cls, bundle_name, hub_reference=""):
        return actions.bundle_file_fingerprint(bundle_name, hub_reference)

    @classmethod
    def validate_inputs(cls, bundle_name, hub_reference=""):
        return actions.validate_load_inputs(bundle_name, hub_reference)

    @classmethod
    def execute(cls, bundle_name, hub_reference="") -> io.NodeOutput:
        return io.NodeOutput(*actions.load_mask_bundle(bundle_name, hub_reference))


class PatchModelAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(specs.PATCH)

    @classmethod
    def execute(cls, model, bundle, dense_first_percent=0.0, dense_last_percent=0.0, quality=0.0,
                precision="bf16") -> io.NodeOutput:
        return io.NodeOutput(actions.patch_model_attention(model, bundle, dense_first_percent, dense_last_percent,
                                                           quality, precision))


class CalibrateSparseAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(specs.CALIBRATE)

    @classmethod
    def execute(cls, **kwargs) -> io.NodeOutput:
        from .calibrate_run import calibrate_sparse_attention

        return io.NodeOutput(*calibrate_sparse_attention(**kwargs))


class MaskBundlePreview(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(specs.PREVIEW)

    @classmethod
    def execute(cls, bundle) -> io.NodeOutput:
        return io.NodeOutput(actions.preview_bundle(bundle))


NODES = [LoadMaskBundle, PatchModelAttention, CalibrateSparseAttention, MaskBundlePreview]


class CalibAttExtension(ComfyExtension):
    async def get_node_list(self) -> list:
        return list(NODES)


async def comfy_entrypoint() -> ComfyExtension:
    return CalibAttExtension()
