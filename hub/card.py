"""The bundle card: a README.md for the Hub repository holding a bundle, with a model-card metadata block.

The YAML block (written by huggingface_hub's ModelCard / ModelCardData, so the Hub reads it as model-card metadata)
has the usual keys (tags, optional license and base_model) and a `calibatt` section: model family and signature,
token grid in latent tokens, pixels and frames, steps and sigma buckets, densities per step, calibration settings,
prompts count, the package version that made the bundle and the one that wrote the card, file size and sha256,
and the reference to paste when one is given. The body says the same for people.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..version import __version__
from .catalog import entry_for, grid_facts
from .fetch import sha256_file
from .reference import parse

FAMILY_NAMES = {"wan21": "Wan 2.1", "wan22": "Wan 2.2", "mochi": "Mochi 1", "hunyuan": "HunyuanVideo",
                "ltxv": "LTX-Video", "tinywan": "tiny Wan (test model)", "generic": "generic"}


def card_metadata(bundle, sha256: str, size: int, file_name: str, reference=None) -> dict:
    """The `calibatt` section of the card's metadata block."""
    sig = bundle.signature
    settings = dict(bundle.settings or {})
    meta = {
        "format": "calibatt-mask-bundle",
        "file": file_name,
        "sha256": sha256,
        "size_bytes": int(size),
        "made_with": {"package": str((bundle.producer or {}).get("package", "calibatt")),
                      "version": str((bundle.producer or {}).get("version", "unknown"))},
        "card_written_with": __version__,
        "model": {"family": sig.family, "num_layers": sig.num_layers, "num_heads": sig.num_heads,
                  "head_dim": sig.head_dim, "dim": sig.dim, "extra": dict(sig.extra),
                  "fingerprint": sig.fingerprint()},
        "grid": {**grid_facts(bundle.grid), "patch": list(bundle.grid.patch),
                 "vae_stride": list(bundle.grid.vae_stride), "text_tokens": bundle.grid.text_tokens},
        "blocks": {"block_q": bundle.geometry.block_q, "block_k": bundle.geometry.block_k,
                   "nq": bundle.geometry.nq, "nk": bundle.geometry.nk},
        "steps": len(bundle.calibrated_sigmas),
        "sigma_buckets": bundle.num_buckets,
        "sigmas": [round(float(s), 6) for s in bundle.calibrated_sigmas],
        "step_bucket": list(bundle.step_bucket),
        "density": round(float(bundle.density), 4),
        "densities_per_step": [round(d, 4) for d in bundle.step_densities()],
        "prompts": settings.get("prompts"),
        "calibration": _calibration_facts(settings),
    }
    if reference is not None:
        meta["reference"] = reference
    return meta


def _calibration_facts(settings: dict) -> dict:
    """The card's calibration block, the same for every bundle: the bundle's record (minus the per-step eps) plus
    eps, rho, gamma, seed, sampler and share_iou at its top level. Bundles now record those once, in
    settings["calibration"]; older ones also copied them to the top level, and their copies are kept as written."""
    cal = settings.get("calibration")
    cal = cal if isinstance(cal, dict) else {}
    out = {k: v for k, v in settings.items() if k != "eps_per_step"}
    out.setdefault("eps", {k: cal.get(k) for k in ("A", "C", "k", "preset")})
    for key in ("rho", "gamma", "seed", "sampler", "share_iou"):
        out.setdefault(key, cal.get(key))
    return out


def _body(meta: dict, title: str) -> str:
    m, g = meta["model"], meta["grid"]
    family = FAMILY_NAMES.get(m["family"], m["family"])
    extra = "".join(f", {k}={v}" for k, v in sorted(m["extra"].items()))
    use = (f"Paste this into **Load Mask Bundle**'s `hub_reference` input:\n\n```\n{meta['reference']}\n```\n\n"
           if meta.get("reference") else
           "Load it with **Load Mask Bundle** (`hub_reference`: `hf://<owner>/<repo>/"
           f"{meta['file']}@<commit>#sha256={meta['sha256']}`), or put the file in "
           "`ComfyUI/models/sparse_attention/`.\n\n")
    steps = " | ".join(f"{d:.3f}" for d in meta["densities_per_step"])
    calib = meta["calibration"]
    eps = calib.get("eps", {})
    lines = [
        f"# {title}",
        "",
        f"A CalibAtt sparse-attention mask bundle for **{family}** at **{g['width']}x{g['height']} px, "
        f"{g['frames']} frames**, calibrated for **{meta['steps']} sampling steps**. Patched into the model with "
        "**Patch Model Attention**, self-attention computes only the attention blocks listed here "
        f"(on average {meta['density']:.1%} of them).",
        "",
        "## Use",
        "",
        use + "The bundle only fits the model, resolution and length below; anything else is refused with the "
        "reason when you patch or sample.",
        "",
        "## Fits",
        "",
        "| | |",
        "|---|---|",
        f"| model family | {m['family']} ({family}) |",
        f"| signature | {m['num_layers']} layers x {m['num_heads']} heads x {m['head_dim']}, hidden {m['dim']}"
        f"{extra} (fingerprint `{m['fingerprint']}`) |",
        f"| video | {g['width']}x{g['height']} px, {g['frames']} frames = {g['latent_tokens'][0]}x"
        f"{g['latent_tokens'][1]}x{g['latent_tokens'][2]} latent tokens |",
        f"| steps | {meta['steps']} in {meta['sigma_buckets']} sigma buckets (any sampler; sigmas map to the "
        "nearest calibrated one) |",
        f"| blocks | {meta['blocks']['block_q']}x{meta['blocks']['block_k']} tokens |",
        "",
        "## Density per step",
        "",
        "Share of attention blocks computed, noisiest step first:",
        "",
        steps,
        "",
        "## Calibration",
        "",
        f"- prompts: {meta['prompts']}",
        f"- eps schedule: preset {eps.get('preset')}, A {eps.get('A')}, C {eps.get('C')}, k {eps.get('k')}",
        f"- vote rho {calib.get('rho')}, repetition gamma {calib.get('gamma')}, anchors {calib.get('anchors')}, "
        f"seed {calib.get('seed')}, sampler {calib.get('sampler')}",
        f"- made with {meta['made_with']['package']} {meta['made_with']['version']}",
        "",
        "## Verify",
        "",
        f"`{meta['file']}`: {meta['size_bytes']} bytes, sha256 `{meta['sha256']}`. Load Mask Bundle checks this "
        "hash before reading the file when the reference ends in `#sha256=`.",
        "",
    ]
    return "\n".join(lines)


def write_card(bundle_path, *, out_dir=None, reference: Optional[str] = None, title: Optional[str] = None,
               license: Optional[str] = None, base_model: Optional[str] = None):
    """Write README.md (into out_dir, default the bundle's folder) for the bundle at `bundle_path`.
    -> (README path, metadata dict, CatalogEntry or None when no reference is given)."""
    from huggingface_hub import ModelCard, ModelCardData

    from ..masks import load_bundle

    bundle_path = Path(bundle_path)
    bundle = load_bundle(bundle_path)
    sha, size = sha256_file(bundle_path), bundle_path.stat().st_size
    ref = parse(reference).with_sha256(sha) if reference else None
    if ref is not None and ref.filename.rsplit("/", 1)[-1] != bundle_path.name:
        from .errors import BAD_REFERENCE, HubError

        raise HubError(BAD_REFERENCE, f"names the file '{ref.path[-1]}', but the bundle is '{bundle_path.name}'; "
                                      "upload it under the name the reference gives", reference=reference)
    meta = card_metadata(bundle, sha, size, bundle_path.name, ref.canonical() if ref else None)
    g = meta["grid"]
    title = title or (f"CalibAtt mask bundle: {FAMILY_NAMES.get(bundle.signature.family, bundle.signature.family)}"
                      f", {g['width']}x{g['height']}, {g['frames']} frames, {meta['steps']} steps")
    data = {"tags": ["calibatt", "sparse-attention", "mask-bundle", "comfyui", bundle.signature.family],
            "calibatt": meta}
    if license:
        data["license"] = license
    if base_model:
        data["base_model"] = base_model
    card = ModelCard(f"---\n{ModelCardData(**data).to_yaml()}\n---\n\n{_body(meta, title)}")
    out = Path(out_dir) if out_dir is not None else bundle_path.parent
    out.mkdir(parents=True, exist_ok=True)
    readme = out / "README.md"
    card.save(readme)
    entry = entry_for(bundle, ref, sha, size, title) if ref is not None else None
    return readme, meta, entry
