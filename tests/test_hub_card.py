"""hub/: the bundle card (README.md with model-card metadata), catalog entries and files, and the command line run
from a checkout whose folder name is not a Python identifier."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from calibatt.hub import errors as E
from calibatt.hub.catalog import (CatalogEntry, SHIPPED, add_entry, check_bundle, entry_for, for_family,
                                  grid_facts, load_catalog, read_catalogs)
from calibatt.hub.card import write_card
from calibatt.hub.errors import HubError
from calibatt.masks import TokenGrid, load_bundle, save_bundle
from helpers_core import make_bundle

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
GRID = TokenGrid(frames=21, height=30, width=52)  # Wan 2.1 at 832x480, 81 frames


@pytest.fixture
def bundle_file(tmp_path):
    path = tmp_path / "pub" / "wan21_832x480x81.safetensors"
    path.parent.mkdir()
    b = make_bundle(grid=TokenGrid(frames=3, height=6, width=8), steps=4)
    b.settings = {"prompts": 16, "seed": 3, "rho": 0.5, "gamma": 0.87, "anchors": 5, "sampler": "uni_pc",
                  "eps": {"A": 0.84, "C": 0.99, "k": 16.0, "preset": "balanced"}, "steps": 4,
                  "eps_per_step": [0.99, 0.9, 0.86, 0.85]}
    save_bundle(b, path)
    return path


def test_card_reads_the_calibration_record_of_either_layout(bundle_file, tmp_path):
    """Bundles record the settings once, in settings["calibration"]; the fixture's bundle has the older layout, which
    copied eps, rho, gamma, seed and sampler to the top level. Both give the same card facts."""
    from calibatt.calibration import CalibrationSettings

    old = load_bundle(bundle_file)
    new = load_bundle(bundle_file)
    g = new.geometry
    cal = CalibrationSettings(preset="balanced", seed=3, sampler="uni_pc", block_q=g.block_q,
                              block_k=g.block_k).to_dict()
    new.settings = {"calibration": cal, "anchors": 5, "prompts": 16, "steps": 4,
                    "eps_per_step": old.settings["eps_per_step"]}
    path = tmp_path / "new" / bundle_file.name
    path.parent.mkdir()
    save_bundle(new, path)
    cards = []
    for p in (bundle_file, path):
        readme, meta, _ = write_card(p)
        c = meta["calibration"]
        assert c["eps"] == {"A": 0.84, "C": 0.99, "k": 16.0, "preset": "balanced"}, c["eps"]
        assert (c["rho"], c["gamma"], c["seed"], c["sampler"], c["anchors"]) == (0.5, 0.87, 3, "uni_pc", 5)
        text = readme.read_text()
        cards.append(text[text.index("## Calibration"):text.index("- made with")])
    assert cards[0] == cards[1], cards


def test_card_carries_the_metadata_block(bundle_file):
    from huggingface_hub import ModelCard

    ref = f"hf://me/bundles/{bundle_file.name}@{COMMIT}"
    readme, meta, entry = write_card(bundle_file, reference=ref, license="apache-2.0",
                                     base_model="Wan-AI/Wan2.1-T2V-1.3B")
    bundle = load_bundle(bundle_file)
    sha = hashlib.sha256(bundle_file.read_bytes()).hexdigest()
    card = ModelCard.load(readme)  # read back with huggingface_hub's own parser, as the Hub does
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0" and data["base_model"] == "Wan-AI/Wan2.1-T2V-1.3B"
    assert {"calibatt", "sparse-attention", "wan21"} <= set(data["tags"])
    c = data["calibatt"]
    assert c["sha256"] == sha and c["size_bytes"] == bundle_file.stat().st_size
    assert c["model"]["family"] == "wan21" and c["model"]["num_layers"] == 2 and c["model"]["num_heads"] == 3
    assert c["model"]["fingerprint"] == bundle.signature.fingerprint()
    assert c["grid"]["latent_tokens"] == [3, 6, 8] and (c["grid"]["width"], c["grid"]["height"]) == (128, 96)
    assert c["grid"]["frames"] == 9
    assert c["steps"] == 4 and c["sigma_buckets"] == bundle.num_buckets and c["step_bucket"] == bundle.step_bucket
    assert c["densities_per_step"] == [round(d, 4) for d in bundle.step_densities()]
    assert c["prompts"] == 16 and c["calibration"]["eps"]["preset"] == "balanced"
    assert c["made_with"] == {"package": "calibatt", "version": bundle.producer["version"]}
    assert c["reference"] == f"{ref}#sha256={sha}"
    body = card.text
    assert f"{ref}#sha256={sha}" in body and "128x96 px, 9 frames" in body and sha in body
    assert entry.to_dict() == {"reference": ref, "sha256": sha, "family": "wan21",
                               "fingerprint": bundle.signature.fingerprint(),
                               "grid": {"latent_tokens": [3, 6, 8], "width": 128, "height": 96, "frames": 9},
                               "steps": 4, "density": round(bundle.density, 4), "size": c["size_bytes"],
                               "title": entry.title}


def test_card_refuses_a_reference_for_another_file(bundle_file):
    with pytest.raises(HubError, match="upload it under the name the reference gives"):
        write_card(bundle_file, reference="hf://me/bundles/other.safetensors")


def test_grid_facts_in_pixels_and_frames():
    assert grid_facts(GRID) == {"latent_tokens": [21, 30, 52], "width": 832, "height": 480, "frames": 81}


def _entry(family="wan21", name="a.safetensors", **kw) -> CatalogEntry:
    d = {"reference": f"hf://me/bundles/{name}@{COMMIT}", "sha256": "ab" * 32, "family": family,
         "fingerprint": "f" * 16, "grid": {"latent_tokens": [21, 30, 52], "width": 832, "height": 480,
                                           "frames": 81}, "steps": 30, "density": 0.35, "size": 1000}
    d.update(kw)
    return CatalogEntry.from_dict(d, "test")


def test_catalog_file_add_replace_and_filter(tmp_path):
    cat = tmp_path / "catalog.json"
    add_entry(cat, _entry())
    add_entry(cat, _entry(family="hunyuan", name="h.safetensors"))
    add_entry(cat, _entry(density=0.3))  # the same file again: replaces
    entries = load_catalog(cat)
    assert [e.label() for e in entries] == ["catalog/hunyuan/me/bundles/h.safetensors",
                                            "catalog/wan21/me/bundles/a.safetensors"]
    assert [e.density for e in for_family(entries, "wan21")] == [0.3]
    assert [e.family for e in for_family(entries)] == ["hunyuan", "wan21"]
    assert for_family(entries, "ltxv") == []
    assert entries[1].pinned_reference() == f"hf://me/bundles/a.safetensors@{COMMIT}#sha256={'ab' * 32}"
    doc = json.loads(cat.read_text())
    assert doc["format"] == "calibatt-bundle-catalog" and doc["version"] == 1


@pytest.mark.parametrize("change, words", [
    ({"sha256": "12"}, "'sha256' must be 64 hex"),
    ({"family": "sdxl"}, "'family' must be one of"),
    ({"reference": "hf://me/bundles/../a.safetensors"}, "'reference' is not a valid reference"),
    ({"reference": "hf://me/b/a.safetensors#sha256=" + "cd" * 32}, "pins another sha256"),
    ({"grid": {"width": 832}}, "'grid' needs latent_tokens"),
    ({"steps": "30"}, "'steps' is missing or of the wrong type"),
    ({"density": 1.5}, "density in (0, 1]"),
])
def test_catalog_entries_are_checked(change, words):
    with pytest.raises(HubError) as info:
        _entry(**change)
    assert info.value.kind == E.CATALOG and words in str(info.value), str(info.value)


def test_a_broken_catalog_file_is_reported_and_skipped(tmp_path):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    add_entry(good, _entry())
    bad.write_text('{"format": "calibatt-bundle-catalog", "version": 1, "bundles": [{"family": "wan21"}]}')
    errors = []
    entries = read_catalogs([bad, good, tmp_path / "absent.json", good], on_error=errors.append)
    assert [e.label() for e in entries] == ["catalog/wan21/me/bundles/a.safetensors"]  # once, though listed twice
    assert len(errors) == 1 and "bad.json entry 0" in str(errors[0])
    with pytest.raises(HubError, match="not valid JSON"):
        (tmp_path / "x.json").write_text("{")
        load_catalog(tmp_path / "x.json")


def test_the_shipped_catalog_is_valid():
    assert isinstance(load_catalog(SHIPPED), list)


def test_a_catalog_entry_must_describe_the_bundle(bundle_file):
    bundle = load_bundle(bundle_file)
    sha = hashlib.sha256(bundle_file.read_bytes()).hexdigest()
    entry = entry_for(bundle, f"hf://me/bundles/{bundle_file.name}", sha, bundle_file.stat().st_size)
    check_bundle(entry, bundle)  # its own entry fits
    wrong = CatalogEntry.from_dict({**entry.to_dict(), "family": "wan22", "steps": 30}, "test")
    with pytest.raises(HubError) as info:
        check_bundle(wrong, bundle)
    assert "family: the catalog says wan22, the bundle has wan21" in str(info.value)
    assert "steps: the catalog says 30, the bundle has 4" in str(info.value)


def _run(args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})


def test_command_line_from_a_checkout_with_any_folder_name(bundle_file, tmp_path):
    odd = tmp_path / "custom_nodes" / "ComfyUI-CalibAtt copy"  # not a Python identifier
    odd.parent.mkdir()
    odd.symlink_to(ROOT, target_is_directory=True)
    cat = tmp_path / "catalog.json"
    ref = f"hf://me/bundles/{bundle_file.name}@{COMMIT}"
    out = _run(["hub", "card", str(bundle_file), "--reference", ref, "--catalog", str(cat), "--out",
                str(tmp_path / "card")], cwd=odd)
    assert out.returncode == 0, out.stderr
    sha = hashlib.sha256(bundle_file.read_bytes()).hexdigest()
    assert f"reference: {ref}#sha256={sha}" in out.stdout
    assert (tmp_path / "card" / "README.md").read_text().startswith("---\n")
    assert [e.pinned_reference() for e in load_catalog(cat)] == [f"{ref}#sha256={sha}"]

    out = _run(["hub", "list", "--catalog", str(cat), "--family", "wan21"], cwd=odd)
    assert out.returncode == 0 and f"catalog/wan21/me/bundles/{bundle_file.name}" in out.stdout, out.stderr
    out = _run(["hub", "list", "--catalog", str(cat), "--family", "ltxv"], cwd=odd)
    assert "no catalog entries for family ltxv" in out.stdout

    # From custom_nodes/, a folder name that is an identifier also works as `python -m <folder>.hub`.
    (tmp_path / "custom_nodes" / "calibatt_nodes").symlink_to(ROOT, target_is_directory=True)
    out = _run(["calibatt_nodes.hub", "list", "--catalog", str(cat)], cwd=tmp_path / "custom_nodes")
    assert out.returncode == 0 and bundle_file.name in out.stdout, out.stderr

    out = _run(["hub", "card", str(tmp_path / "missing.safetensors")], cwd=odd)
    assert out.returncode == 2 and "file not found" in out.stderr
