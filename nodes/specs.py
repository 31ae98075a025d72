"""One description of each node's inputs and outputs, rendered to both ComfyUI node APIs (v1.py, v3.py).

Keeping the list in one place keeps the two APIs' widget order identical, which shared workflows depend on
(UI-format workflows store widget values by position).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Union

from ..kernels.support import PRECISIONS

BUNDLE = "MASK_BUNDLE"
CATEGORY = "sampling/sparse attention"


@dataclass(frozen=True)
class In:
    name: str
    type: str  # MODEL, CLIP, CONDITIONING, MASK_BUNDLE, INT, FLOAT, STRING, COMBO
    tooltip: str = ""
    optional: bool = False
    default: object = None
    min: Optional[float] = None
    max: Optional[float] = None
    step: Optional[float] = None
    multiline: bool = False
    options: Union[None, list, Callable[[], list]] = None  # COMBO choices (a callable is evaluated per request)
    seed: bool = False  # INT with ComfyUI's "control after generate" widget

    @property
    def is_widget(self) -> bool:
        return self.type in ("INT", "FLOAT", "STRING", "COMBO", "BOOLEAN")

    def choices(self) -> list:
        return list(self.options() if callable(self.options) else (self.options or []))


@dataclass(frozen=True)
class Out:
    name: str
    type: str
    tooltip: str = ""


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    display_name: str
    description: str
    inputs: tuple
    outputs: tuple
    output_node: bool = False
    extra: dict = field(default_factory=dict)


def widget_count(spec: NodeSpec) -> int:
    """Entries a UI-format workflow stores in widgets_values for this node (seed widgets add their control)."""
    return sum(1 + (1 if i.seed else 0) for i in spec.inputs if i.is_widget)


def _input_v1(i: In):
    opts = {"tooltip": i.tooltip}
    if i.type == "COMBO":
        if i.default is not None:
            opts["default"] = i.default
        return (i.choices(), opts)
    if i.is_widget:
        for key in ("default", "min", "max", "step"):
            val = getattr(i, key)
            if val is not None:
                opts[key] = val
        if i.multiline:
            opts["multiline"] = True
        if i.seed:
            opts["control_after_generate"] = True
    return (i.type, opts)


def input_types_v1(spec: NodeSpec) -> dict:
    """V1 INPUT_TYPES for a spec (also what /object_info shows for it)."""
    out = {"required": {}}
    for i in spec.inputs:
        out.setdefault("optional" if i.optional else "required", {})[i.name] = _input_v1(i)
    return out


def _bundles():
    from . import hub_source, paths

    return paths.list_bundles() + hub_source.catalog_labels()


def _samplers():
    import comfy.samplers

    return list(comfy.samplers.KSampler.SAMPLERS)


def _schedulers():
    import comfy.samplers

    return list(comfy.samplers.KSampler.SCHEDULERS)


# The options as first published; later presets are appended after them, never inserted, so the list the UI shows
# keeps its order from release to release (a saved workflow stores the chosen name).
_PRESETS_FIRST = ("quality", "balanced", "fast", "custom")


def _presets():
    from ..calibration.settings import CUSTOM, EPS_PRESETS

    return list(_PRESETS_FIRST) + [p for p in (*EPS_PRESETS, CUSTOM) if p not in _PRESETS_FIRST]


def _selections():
    from ..calibration.settings import SELECTIONS

    return list(SELECTIONS)


LOAD = NodeSpec(
    "LoadMaskBundle", "Load Mask Bundle",
    "Load a calibrated sparse-attention mask bundle from models/sparse_attention/, from a catalog entry, or by "
    "hub reference (downloaded once into models/sparse_attention/hub/, verified, then loaded offline).",
    inputs=(
        In("bundle_name", "COMBO", "Mask bundle file in models/sparse_attention/, or a catalog entry "
           "(catalog/<model family>/...: downloaded when first used).", options=_bundles),
        In("hub_reference", "STRING", "Optional: hf://owner/repo/file.safetensors[@revision][#sha256=<hex>] or an "
           "https:// link. When set it wins over bundle_name: the file is downloaded into "
           "models/sparse_attention/hub/ (private repos: HF_TOKEN or hf auth login) and checked before use.",
           optional=True, default=""),
    ),
    outputs=(Out("bundle", BUNDLE, "The mask bundle, for Patch Model Attention."),
             Out("summary", "STRING", "Model, video size, steps, density of the bundle.")),
)

PATCH = NodeSpec(
    "PatchModelAttention", "Patch Model Attention",
    "Run the model's self-attention block-sparse, following a calibrated mask bundle. Cross-attention and "
    "anything the bundle does not cover stay dense. Remove the node to get dense attention back.",
    inputs=(
        In("model", "MODEL", "The video model (Wan 2.1/2.2, Mochi, HunyuanVideo, LTX-Video)."),
        In("bundle", BUNDLE, "A bundle calibrated for this model, resolution and length."),
        In("dense_first_percent", "FLOAT", "Run the first N% of the sampler's steps dense (more quality, less "
           "speed).", default=0.0, min=0.0, max=100.0, step=1.0),
        In("dense_last_percent", "FLOAT", "Run the last N% of the sampler's steps dense (helps few-step LoRAs "
           "keep fine detail).", default=0.0, min=0.0, max=100.0, step=1.0),
        # Not the calibration preset "quality" (Calibrate Sparse Attention's eps schedule), though it shares the
        # name: renaming it would break saved workflows, which name it (API-format prompts; widgets turned into
        # inputs link by name), so the tooltip tells them apart.
        In("quality", "FLOAT", "0 follows the bundle as calibrated. Raising it runs the densest heads dense: every "
           "head whose mask computes more than (1 - quality) of its key blocks; 1 is fully dense. Trades speed "
           "for fidelity without re-calibrating (unlike the calibration preset of the same name).", default=0.0,
           min=0.0, max=1.0, step=0.05),
        # Optional and last: workflows saved before it load unchanged and run bf16.
        In("precision", "COMBO", "Arithmetic of the computed blocks. bf16 (default) as dense attention. 8-bit "
           "runs faster at some error: int8-qk (Q.K in int8, from Ampere), int8 (Q.K in int8, P.V in fp8), "
           "fp8-qk and fp8 (Q.K in fp8; fp8 also P.V), the fp8 ones from Ada/Hopper. Each layer's first call is "
           "checked against bf16: a layer over 5% relative error runs its Q.K-only variant (fp8 -> fp8-qk, int8 -> "
           "int8-qk) if that is within 5%, else bf16; a GPU without the format runs bf16 (one warning). Video "
           "self-attention only; text tokens and dense layers stay bf16.", optional=True,
           default="bf16", options=list(PRECISIONS)),
    ),
    outputs=(Out("model", "MODEL", "The patched model (a clone; the input model is unchanged)."),),
)

CALIBRATE = NodeSpec(
    "CalibrateSparseAttention", "Calibrate Sparse Attention",
    "Sample each calibration prompt once with attention statistics on, pick the key blocks that carry the "
    "attention mass, and save them as a mask bundle in models/sparse_attention/. Run once per model, "
    "resolution and length.",
    inputs=(
        In("model", "MODEL", "The video model to calibrate."),
        In("prompts", "STRING", "Calibration prompts, one per line (16-64 varied prompts are typical).",
           default="", multiline=True),
        In("width", "INT", "Video width in pixels (as in your generation workflow).", default=832, min=16,
           max=8192, step=16),
        In("height", "INT", "Video height in pixels.", default=480, min=16, max=8192, step=16),
        In("length", "INT", "Video length in frames.", default=81, min=1, max=1024, step=4),
        In("steps", "INT", "Sampling steps (use the ones you generate with).", default=30, min=1, max=1000),
        In("cfg", "FLOAT", "Classifier-free guidance scale.", default=5.0, min=0.0, max=100.0, step=0.1),
        In("sampler_name", "COMBO", "Sampler.", options=_samplers, default="uni_pc"),
        In("scheduler", "COMBO", "Scheduler.", options=_schedulers, default="simple"),
        In("seed", "INT", "Noise seed of the first prompt (prompt i uses seed + i).", default=0, min=0,
           max=0xffffffffffffffff, seed=True),
        In("preset", "COMBO", "Threshold schedule eps(t): quality keeps more attention mass, fast less; custom "
           "uses eps_A / eps_C / eps_k; distilled is for few-step distilled models (LightX2V-style 4 steps).",
           options=_presets, default="balanced"),
        In("eps_A", "FLOAT", "custom preset: mass kept at the last steps.", default=0.84, min=0.01, max=1.0,
           step=0.001),
        In("eps_C", "FLOAT", "custom preset: mass kept at the first step.", default=0.99, min=0.01, max=1.0,
           step=0.001),
        In("eps_k", "FLOAT", "custom preset: decay rate of eps(t).", default=16.0, min=0.0, max=100.0, step=0.1),
        In("rho", "FLOAT", "Keep a block if at least this share of the prompts needed it.", default=0.5, min=0.01,
           max=1.0, step=0.01),
        In("filename", "STRING", "Bundle file name in models/sparse_attention/ (.safetensors is added).",
           default="wan21_t2v_832x480x81"),
        In("clip", "CLIP", "Text encoder for the prompts.", optional=True),
        In("negative_prompt", "STRING", "Negative prompt (with the CLIP).", optional=True, default="",
           multiline=True),
        In("positive", "CONDITIONING", "Precomputed prompts: each entry is one more calibration prompt.",
           optional=True),
        In("negative", "CONDITIONING", "Precomputed negative (else negative_prompt, else zeros).", optional=True),
        In("block_size", "INT", "Advanced: tokens per attention block (128 for real models; 16-32 only for tiny "
           "test models).", optional=True, default=128, min=16, max=256, step=16),
        In("latent", "LATENT", "Optional starting latent, e.g. from Wan22ImageToVideoLatent (Wan 2.2 TI2V-5B "
           "image-to-video keeps its start frame in the latent). Its shape sets the video size (width / height / "
           "length are then ignored) and its noise mask is honoured.", optional=True),
        # Optional and last: workflows saved before it load unchanged and select per row.
        In("selection", "COMBO", "Advanced: how eps picks blocks. row (default, the paper's): every query block of "
           "every head keeps the blocks carrying eps of its attention. global: one mass threshold per step over "
           "all layers and heads, so concentrated heads give blocks to diffuse ones; measured better below "
           "density 0.8 on content-following heads (up to +7 dB), slightly worse above. Not with multi-GPU "
           "(Ulysses) calibration.", optional=True, default="row", options=_selections),
    ),
    outputs=(Out("bundle", BUNDLE, "The calibrated bundle (also saved to disk)."),
             Out("preview", "IMAGE", "Density per layer x step, and one head's block mask."),
             Out("summary", "STRING", "What was calibrated and how sparse it is.")),
    output_node=True,
)

PREVIEW = NodeSpec(
    "MaskBundlePreview", "Mask Bundle Preview",
    "Images of a mask bundle: density heat map (layers down, steps across) and one head's block mask.",
    inputs=(In("bundle", BUNDLE, "The mask bundle to show."),),
    outputs=(Out("preview", "IMAGE", "Density per layer x step, and one head's block mask."),),
)

ALL = (LOAD, PATCH, CALIBRATE, PREVIEW)
