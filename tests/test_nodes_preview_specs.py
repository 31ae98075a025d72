"""Bundle preview images and the shared node input specs (no ComfyUI needed)."""

import re
from pathlib import Path

import torch

from calibatt.nodes import preview, specs
from helpers_core import make_bundle


def test_preview_is_a_comfy_image_batch_showing_the_bundle():
    bundle = make_bundle(L=3, H=2, steps=5, density=0.3, seed=4)
    img = preview.preview_images(bundle, size=96)
    assert img.dtype == torch.float32 and img.shape == (2, 96, 96, 3)
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    heat = preview.density_map(bundle)
    assert heat.shape == (3, 5)  # layers x calibrated steps
    per_step = torch.tensor(bundle.step_densities(), dtype=torch.float32)
    torch.testing.assert_close(heat.mean(0), per_step, rtol=1e-5, atol=1e-6)
    mask = preview.head_mask(bundle, layer=1, head=0, step=2)
    want = bundle.skip_lists(bundle.step_bucket[2]).layer(1).block_mask()[0].float()
    assert torch.equal(mask, want)
    # The mask panel is the mask itself, scaled up: white where blocks are computed.
    g = bundle.geometry
    rows = ((torch.arange(g.nq) + 0.5) * 96 / g.nq).long()
    cols = ((torch.arange(g.nk) + 0.5) * 96 / g.nk).long()
    assert torch.equal(img[1][rows][:, cols, 0], preview.head_mask(bundle))


def test_colorize_is_monotone_in_brightness():
    c = preview.colorize(torch.linspace(0, 1, 11)[None])[0]
    brightness = c @ torch.tensor([0.299, 0.587, 0.114])
    assert bool((brightness[1:] > brightness[:-1]).all())


def test_v1_inputs_keep_the_widget_order_workflows_rely_on():
    it = specs.input_types_v1(specs.PATCH)
    assert list(it["required"]) == ["model", "bundle", "dense_first_percent", "dense_last_percent", "quality"]
    assert it["required"]["dense_last_percent"] == ("FLOAT", {
        "tooltip": specs.PATCH.inputs[3].tooltip, "default": 0.0, "min": 0.0, "max": 100.0, "step": 1.0})
    cal = specs.CALIBRATE
    names = [i.name for i in cal.inputs]
    assert names.index("clip") > names.index("filename")  # optional inputs come after the required ones
    assert all(i.optional for i in cal.inputs[names.index("clip"):])
    assert specs.widget_count(cal) == sum(1 for i in cal.inputs if i.is_widget) + 1  # + seed control
    assert {s.node_id for s in specs.ALL} == {"CalibrateSparseAttention", "LoadMaskBundle", "PatchModelAttention",
                                              "MaskBundlePreview"}


def test_preset_options_only_grow_at_the_end():
    """The Calibrate node's preset list as first published stays in place; later presets (the few-step distilled
    schedule) come after it, and every preset of the engine is offered."""
    from calibatt.calibration.settings import EPS_PRESETS

    preset = next(i for i in specs.CALIBRATE.inputs if i.name == "preset")
    options = preset.choices()
    assert options[:4] == ["quality", "balanced", "fast", "custom"]
    assert "distilled" in options[4:] and set(options) == set(EPS_PRESETS) | {"custom"}
    assert len(options) == len(set(options))


def test_every_input_and_output_is_on_its_help_page():
    """The help page ComfyUI shows for a node (web/docs/<node id>.md) names each of its inputs and outputs in bold
    (alone or grouped, e.g. **width / height / length**), optional ones included, so a new input cannot ship
    undocumented."""
    root = Path(__file__).resolve().parents[1] / "web" / "docs"
    for spec in (specs.LOAD, specs.PATCH, specs.CALIBRATE, specs.PREVIEW):
        page = (root / f"{spec.node_id}.md").read_text()
        bold = set(re.findall(r"[A-Za-z_0-9]+", " ".join(re.findall(r"\*\*(.+?)\*\*", page))))
        missing = [i.name for i in (*spec.inputs, *spec.outputs) if i.name not in bold]
        assert missing == [], f"web/docs/{spec.node_id}.md does not describe {missing}"
