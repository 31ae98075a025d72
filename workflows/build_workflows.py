"""Write the shipped UI-format workflows (workflows/*.json; ComfyUI lists a custom node's workflows/ folder as its templates).

Run from the repository root: `python workflows/build_workflows.py`. The widget order of our nodes comes from
nodes/specs.py (the same table the nodes are built from); tests/test_nodes_comfyui.py checks every node type and
widget count against a live ComfyUI's /object_info.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import _pkg  # noqa: E402

_pkg.load_package()
from calibatt.hub.reference import parse  # noqa: E402
from calibatt.nodes import specs  # noqa: E402

# The bundle the hub example loads. REPLACE-ME is the project's Hub account (as in pyproject.toml): set it, pin the
# published commit and add #sha256=... (python -m hub card prints the pinned reference) when the bundle is uploaded.
HUB_EXAMPLE = "hf://REPLACE-ME/calibatt-bundles/wan21_t2v_1.3B_832x480x81.safetensors@main"

PROMPTS = "\n".join([
    "A golden retriever runs along a beach at sunset, waves rolling in, slow motion.",
    "Aerial drone shot over a dense pine forest covered in morning fog.",
    "A chef slices vegetables quickly on a wooden board in a busy restaurant kitchen.",
    "Time-lapse of clouds drifting over snowy mountain peaks.",
    "A street musician plays violin in a rainy city square at night, neon reflections.",
    "Close-up of a hummingbird hovering near a red flower.",
    "A red sports car drives along a winding coastal road, camera tracking from the side.",
    "Children fly colourful kites in a green park on a windy day.",
    "An astronaut floats inside a space station, Earth visible through the window.",
    "A cat stretches and yawns on a sunny windowsill.",
    "Waves crash against a lighthouse during a storm, dramatic lighting.",
    "A ballet dancer spins on a dark stage under a single spotlight.",
    "A busy Tokyo crosswalk seen from above, hundreds of people crossing.",
    "Macro shot of coffee being poured into a white cup, steam rising.",
    "A horse gallops across an open prairie, dust in the air.",
    "An old steam train crosses a stone bridge in autumn.",
])
NEGATIVE = ("blurry, low quality, static, overexposed, worst quality, jpeg artifacts, deformed, extra limbs, "
            "watermark, text")


class Graph:
    def __init__(self):
        self.nodes, self.links = [], []

    def node(self, type_, pos, widgets, inputs=(), outputs=(), size=(320, 120), title=None):
        """inputs: [(name, TYPE)], outputs: [(name, TYPE)]; connect with link()."""
        n = {"id": len(self.nodes) + 1, "type": type_, "pos": list(pos), "size": list(size), "flags": {},
             "order": len(self.nodes), "mode": 0,
             "inputs": [{"name": a, "type": t, "link": None} for a, t in inputs],
             "outputs": [{"name": a, "type": t, "links": [], "slot_index": i} for i, (a, t) in enumerate(outputs)],
             "properties": {"Node name for S&R": type_}, "widgets_values": list(widgets)}
        if title:
            n["title"] = title
        self.nodes.append(n)
        return n

    def link(self, src, src_slot, dst, dst_name):
        kind = src["outputs"][src_slot]["type"]
        slot = next(i for i, x in enumerate(dst["inputs"]) if x["name"] == dst_name)
        lid = len(self.links) + 1
        self.links.append([lid, src["id"], src_slot, dst["id"], slot, kind])
        src["outputs"][src_slot]["links"].append(lid)
        dst["inputs"][slot]["link"] = lid

    def note(self, pos, text, size=(420, 260)):
        return self.node("MarkdownNote", pos, [text], size=size, title="Read me")

    def dump(self) -> dict:
        return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, json.dumps([n["type"] for n in self.nodes]))),
                "revision": 0, "last_node_id": len(self.nodes), "last_link_id": len(self.links),
                "nodes": self.nodes, "links": self.links, "groups": [], "config": {},
                "extra": {"ds": {"scale": 0.75, "offset": [40, 420]}}, "version": 0.4}


def _io(spec):
    return ([(i.name, i.type) for i in spec.inputs if not i.is_widget],
            [(o.name, o.type) for o in spec.outputs])


def _ours(g, spec, pos, values: dict, size=(340, 200)):
    """Our node with widget values in spec order (seed widgets get their 'fixed' control value)."""
    ins, outs = _io(spec)
    widgets = []
    for i in spec.inputs:
        if i.is_widget:
            widgets.append(values.get(i.name, i.default))
            if i.seed:
                widgets.append("fixed")
    assert len(widgets) == specs.widget_count(spec)
    return g.node(spec.node_id, pos, widgets, ins, outs, size=size)


def _wan_loaders(g, unet, x=0, y=0, shift=8.0):
    u = g.node("UNETLoader", (x, y), [unet, "default"], outputs=[("MODEL", "MODEL")])
    ms = g.node("ModelSamplingSD3", (x + 360, y), [shift], inputs=[("model", "MODEL")], outputs=[("MODEL", "MODEL")])
    g.link(u, 0, ms, "model")
    return ms


def _text(g, clip, pos, text, title):
    n = g.node("CLIPTextEncode", pos, [text], inputs=[("clip", "CLIP")], outputs=[("CONDITIONING", "CONDITIONING")],
               size=(400, 160), title=title)
    g.link(clip, 0, n, "clip")
    return n


def _clip(g, pos):
    return g.node("CLIPLoader", pos, ["umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan", "default"],
                  outputs=[("CLIP", "CLIP")])


def _decode_save(g, latent_src, pos, prefix):
    vae = g.node("VAELoader", (pos[0], pos[1] + 160), ["wan_2.1_vae.safetensors"], outputs=[("VAE", "VAE")])
    dec = g.node("VAEDecode", pos, [], inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=[("IMAGE", "IMAGE")])
    g.link(latent_src, 0, dec, "samples")
    g.link(vae, 0, dec, "vae")
    save = g.node("SaveAnimatedWEBP", (pos[0] + 360, pos[1]), [prefix, 16.0, False, 90, "default"],
                  inputs=[("images", "IMAGE")], size=(400, 400))
    g.link(dec, 0, save, "images")


def wan21_calibrate():
    g = Graph()
    g.note((0, -320), "## Calibrate sparse attention for Wan 2.1 T2V 1.3B, 832x480, 81 frames\n\n"
           "Run once per model, resolution and length. Writes `models/sparse_attention/"
           "wan21_t2v_1.3B_832x480x81.safetensors`; then use the *Wan 2.1 T2V sparse* workflow.\n\n"
           "Use the same sampler, scheduler, steps and shift as when you generate. 16-64 varied prompts, one per "
           "line. The preview shows density per layer (rows) and step (columns), and one head's block mask.")
    model = _wan_loaders(g, "wan2.1_t2v_1.3B_fp16.safetensors")
    clip = _clip(g, (0, 200))
    cal = _ours(g, specs.CALIBRATE, (760, 0), {
        "prompts": PROMPTS, "width": 832, "height": 480, "length": 81, "steps": 30, "cfg": 6.0,
        "sampler_name": "uni_pc", "scheduler": "simple", "seed": 0, "preset": "balanced",
        "filename": "wan21_t2v_1.3B_832x480x81", "negative_prompt": NEGATIVE, "block_size": 128},
        size=(420, 620))
    g.link(model, 0, cal, "model")
    g.link(clip, 0, cal, "clip")
    prev = g.node("PreviewImage", (1220, 0), [], inputs=[("images", "IMAGE")], size=(400, 420))
    g.link(cal, 1, prev, "images")
    return g.dump()


def hub_model_entry(reference: str) -> dict:
    """The node's properties.models entry for a hub bundle: ComfyUI's frontend checks `name` against the files of
    `directory` when the workflow opens and offers to download `url` for a missing one."""
    ref = parse(reference)
    entry = {"name": str(ref.relpath()), "url": ref.web_url(), "directory": "sparse_attention"}
    if ref.sha256:
        entry.update(hash=ref.sha256, hash_type="sha256")
    return entry


def _wan21_sparse(note: str, load_values: dict, models=None):
    g = Graph()
    g.note((0, -320), note)
    model = _wan_loaders(g, "wan2.1_t2v_1.3B_fp16.safetensors")
    bundle = _ours(g, specs.LOAD, (0, 160), load_values, size=(360, 110))
    if models:
        bundle["properties"]["models"] = models
    patch = _ours(g, specs.PATCH, (760, 0), {"dense_first_percent": 0.0, "dense_last_percent": 0.0},
                  size=(340, 130))
    g.link(model, 0, patch, "model")
    g.link(bundle, 0, patch, "bundle")
    clip = _clip(g, (0, 320))
    pos = _text(g, clip, (360, 320), "A red fox trots through fresh snow in a birch forest, soft morning light.",
                "Positive")
    neg = _text(g, clip, (360, 520), NEGATIVE, "Negative")
    lat = g.node("EmptyHunyuanLatentVideo", (360, 720), [832, 480, 81, 1], outputs=[("LATENT", "LATENT")])
    ks = g.node("KSampler", (1140, 0), [0, "fixed", 30, 6.0, "uni_pc", "simple", 1.0],
                inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                        ("latent_image", "LATENT")], outputs=[("LATENT", "LATENT")], size=(320, 270))
    g.link(patch, 0, ks, "model")
    g.link(pos, 0, ks, "positive")
    g.link(neg, 0, ks, "negative")
    g.link(lat, 0, ks, "latent_image")
    _decode_save(g, ks, (1500, 0), "wan21_sparse")
    return g.dump()


def wan21_sparse():
    return _wan21_sparse(
        "## Wan 2.1 T2V 1.3B with calibrated sparse attention\n\n"
        "*Load Mask Bundle* reads `models/sparse_attention/`; the bundle must match the model, resolution and "
        "length (calibrate one with the *Wan 2.1 T2V calibrate* workflow). Bypass *Patch Model Attention* "
        "(Ctrl+B) to compare with dense attention. Raise *dense_last_percent* if fine detail suffers, e.g. "
        "with few-step LoRAs.",
        {"bundle_name": "wan21_t2v_1.3B_832x480x81.safetensors"})


def wan21_sparse_hub():
    ref = parse(HUB_EXAMPLE)
    return _wan21_sparse(
        "## Wan 2.1 T2V 1.3B with a bundle from the hub\n\n"
        "*Load Mask Bundle* downloads the bundle named in *hub_reference* into "
        f"`models/sparse_attention/{ref.relpath()}` on the first run, checks it, and loads it from there "
        "afterwards (also offline). Paste another reference (`hf://owner/repo/file.safetensors@revision"
        "#sha256=...`, from a bundle's card or `python -m hub list`) to use another bundle; it must match the "
        "model, resolution and length. Private repositories need HF_TOKEN or `hf auth login`.",
        {"bundle_name": str(ref.relpath()), "hub_reference": HUB_EXAMPLE}, models=[hub_model_entry(HUB_EXAMPLE)])


def wan22_two_experts():
    g = Graph()
    g.note((0, -360), "## Wan 2.2 T2V A14B (two experts) with sparse attention\n\n"
           "Each expert has its own bundle: calibrate each expert model separately (Calibrate Sparse Attention "
           "with that expert, same resolution, length, steps and shift). A bundle is keyed by sigma, so the "
           "high-noise expert uses the early-step masks of its bundle and the low-noise expert the late ones. "
           "KSamplerAdvanced splits the 20 steps at step 10.")
    hi = _wan_loaders(g, "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", 0, 0)
    lo = _wan_loaders(g, "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors", 0, 420)
    b_hi = _ours(g, specs.LOAD, (0, 160), {"bundle_name": "wan22_t2v_high_noise_1280x720x81.safetensors"},
                 size=(380, 110))
    b_lo = _ours(g, specs.LOAD, (0, 580), {"bundle_name": "wan22_t2v_low_noise_1280x720x81.safetensors"},
                 size=(380, 110))
    p_hi = _ours(g, specs.PATCH, (760, 0), {}, size=(340, 130))
    p_lo = _ours(g, specs.PATCH, (760, 420), {}, size=(340, 130))
    for m, b, p in ((hi, b_hi, p_hi), (lo, b_lo, p_lo)):
        g.link(m, 0, p, "model")
        g.link(b, 0, p, "bundle")
    clip = _clip(g, (0, 800))
    pos = _text(g, clip, (360, 800), "A paper boat drifts down a rain-soaked street gutter, macro lens, cinematic.",
                "Positive")
    neg = _text(g, clip, (360, 1000), NEGATIVE, "Negative")
    lat = g.node("EmptyHunyuanLatentVideo", (360, 1200), [1280, 720, 81, 1], outputs=[("LATENT", "LATENT")])
    ks_in = [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
             ("latent_image", "LATENT")]
    k_hi = g.node("KSamplerAdvanced", (1140, 0), ["enable", 0, "fixed", 20, 3.5, "euler", "simple", 0, 10, "enable"],
                  inputs=ks_in, outputs=[("LATENT", "LATENT")], size=(320, 340), title="KSampler (high noise)")
    k_lo = g.node("KSamplerAdvanced", (1500, 0),
                  ["disable", 0, "fixed", 20, 3.5, "euler", "simple", 10, 10000, "disable"],
                  inputs=ks_in, outputs=[("LATENT", "LATENT")], size=(320, 340), title="KSampler (low noise)")
    g.link(p_hi, 0, k_hi, "model")
    g.link(p_lo, 0, k_lo, "model")
    for k in (k_hi, k_lo):
        g.link(pos, 0, k, "positive")
        g.link(neg, 0, k, "negative")
    g.link(lat, 0, k_hi, "latent_image")
    g.link(k_hi, 0, k_lo, "latent_image")
    _decode_save(g, k_lo, (1860, 0), "wan22_sparse")
    return g.dump()


WORKFLOWS = {
    "wan21_t2v_calibrate": wan21_calibrate,
    "wan21_t2v_sparse": wan21_sparse,
    "wan21_t2v_sparse_hub": wan21_sparse_hub,
    "wan22_t2v_two_experts_sparse": wan22_two_experts,
}


def main():
    # One folder only: ComfyUI scans example_workflows/, workflows/ and others, and lists each copy separately.
    for name, build in WORKFLOWS.items():
        (ROOT / "workflows" / f"{name}.json").write_text(json.dumps(build(), indent=1) + "\n")
    print(f"wrote {len(WORKFLOWS)} workflows to workflows/")


if __name__ == "__main__":
    main()
