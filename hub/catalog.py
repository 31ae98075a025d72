"""The bundle catalog: a JSON list of published bundles that Load Mask Bundle offers by model family.

    {"format": "calibatt-bundle-catalog", "version": 1, "bundles": [
      {"reference": "hf://owner/repo/wan21_832x480x81.safetensors@<commit>", "sha256": "<64 hex>",
       "family": "wan21", "fingerprint": "<signature fingerprint>",
       "grid": {"latent_tokens": [21, 30, 52], "width": 832, "height": 480, "frames": 81},
       "steps": 30, "density": 0.352, "size": 1310720, "title": "Wan 2.1 T2V 1.3B, 832x480, 81 frames"}]}

`python -m hub card BUNDLE --reference ... --catalog FILE` writes an entry. The package ships hub/catalog.json;
a `catalog.json` in any models/sparse_attention/ folder adds entries. An entry's label in Load Mask Bundle's list
is `catalog/<family>/<owner>/<repo>/<file>`; choosing it downloads the file pinned by the entry's sha256, and the
bundle must then match the entry's family, fingerprint, grid and steps.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Optional

from . import errors as E
from .errors import HubError
from .reference import HUB_DIR, Reference, parse

FORMAT = "calibatt-bundle-catalog"
VERSION = 1
SHIPPED = Path(__file__).resolve().parent / "catalog.json"
LABEL_ROOT = "catalog"
_HEX64 = re.compile(r"[0-9a-f]{64}")


def grid_facts(grid) -> dict:
    """A TokenGrid in the units users know: latent tokens, and pixels and frames of the video it comes from."""
    pt, ph, pw = grid.patch
    st, sh, sw = grid.vae_stride
    return {"latent_tokens": [grid.frames, grid.height, grid.width], "width": grid.width * pw * sw,
            "height": grid.height * ph * sh, "frames": (grid.frames * pt - 1) * st + 1}


@dataclass(frozen=True)
class CatalogEntry:
    reference: str  # canonical, without "#sha256=" (the sha256 field pins it)
    sha256: str
    family: str
    fingerprint: str
    grid: dict
    steps: int
    density: float
    size: int
    title: str = ""

    def ref(self) -> Reference:
        return parse(self.reference).with_sha256(self.sha256)

    def pinned_reference(self) -> str:
        return self.ref().canonical()

    def label(self) -> str:
        """Its name in Load Mask Bundle's list: catalog/<family>/ + the file's place under hub/."""
        rel = self.ref().relpath().relative_to(HUB_DIR)
        return str(PurePosixPath(LABEL_ROOT, self.family, rel))

    def describe(self) -> str:
        g = self.grid
        return (f"{self.title or self.label()}: {self.family}, {g['width']}x{g['height']} px, {g['frames']} frames, "
                f"{self.steps} steps, density {self.density:.3f}, {self.size / (1 << 20):.1f} MB")

    def to_dict(self) -> dict:
        d = {"reference": self.reference, "sha256": self.sha256, "family": self.family,
             "fingerprint": self.fingerprint, "grid": dict(self.grid), "steps": self.steps,
             "density": self.density, "size": self.size}
        if self.title:
            d["title"] = self.title
        return d

    @classmethod
    def from_dict(cls, d, where: str) -> "CatalogEntry":
        def bad(field, why):
            return HubError(E.CATALOG, f"catalog {where}: field '{field}' {why}; fix or remove the entry")

        if not isinstance(d, dict):
            raise bad("(entry)", "must be a JSON object")
        for name, kind in (("reference", str), ("sha256", str), ("family", str), ("fingerprint", str),
                           ("grid", dict), ("steps", int), ("density", (int, float)), ("size", int)):
            if not isinstance(d.get(name), kind) or isinstance(d.get(name), bool):
                raise bad(name, "is missing or of the wrong type")
        try:
            ref = parse(d["reference"])
        except HubError as e:
            raise bad("reference", f"is not a valid reference ({e})") from None
        sha = d["sha256"].lower()
        if not _HEX64.fullmatch(sha):
            raise bad("sha256", "must be 64 hex digits")
        if ref.sha256 is not None and ref.sha256 != sha:
            raise bad("reference", "pins another sha256 than the sha256 field")
        from ..masks.geometry import KNOWN_FAMILIES

        if d["family"] not in KNOWN_FAMILIES:
            raise bad("family", f"must be one of {', '.join(KNOWN_FAMILIES)}")
        g = d["grid"]
        tokens = g.get("latent_tokens")
        if not (isinstance(tokens, list) and len(tokens) == 3 and all(isinstance(x, int) and x > 0 for x in tokens)
                and all(isinstance(g.get(k), int) and g[k] > 0 for k in ("width", "height", "frames"))):
            raise bad("grid", "needs latent_tokens [frames, height, width] and width, height, frames (positive)")
        if d["steps"] < 1 or d["size"] < 1 or not 0.0 < float(d["density"]) <= 1.0:
            raise bad("steps/size/density", "must be positive (density in (0, 1])")
        return cls(ref.canonical(with_sha256=False), sha, d["family"], d["fingerprint"],
                   {"latent_tokens": list(tokens), "width": g["width"], "height": g["height"],
                    "frames": g["frames"]}, d["steps"], float(d["density"]), d["size"], str(d.get("title", "")))


def entry_for(bundle, reference, sha256: str, size: int, title: str = "") -> CatalogEntry:
    """The catalog entry describing `bundle` published at `reference` (str or Reference)."""
    ref = parse(reference) if isinstance(reference, str) else reference
    if ref.sha256 is not None and ref.sha256 != sha256:
        raise HubError(E.CATALOG, f"the reference pins sha256 {ref.sha256}, but the bundle file has {sha256}",
                       reference=ref.canonical())
    return CatalogEntry(ref.canonical(with_sha256=False), sha256, bundle.signature.family,
                        bundle.signature.fingerprint(), grid_facts(bundle.grid), len(bundle.calibrated_sigmas),
                        round(float(bundle.density), 4), int(size), title)


def check_bundle(entry: CatalogEntry, bundle):
    """The downloaded bundle must be what the entry says (the sha256 already ties the file to the entry; this
    catches an entry written for another file)."""
    facts = {"family": bundle.signature.family, "fingerprint": bundle.signature.fingerprint(),
             "latent_tokens": grid_facts(bundle.grid)["latent_tokens"], "steps": len(bundle.calibrated_sigmas)}
    said = {"family": entry.family, "fingerprint": entry.fingerprint, "latent_tokens": entry.grid["latent_tokens"],
            "steps": entry.steps}
    wrong = [f"{k}: the catalog says {said[k]}, the bundle has {facts[k]}" for k in facts if facts[k] != said[k]]
    if wrong:
        raise HubError(E.CATALOG, "the catalog entry does not describe this bundle (" + "; ".join(wrong)
                       + "). The catalog is wrong: report it to its publisher, or use the bundle by reference",
                       reference=entry.pinned_reference())


# ------------------------------------------------------------------------------------------------------ files
def load_catalog(path) -> list:
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise HubError(E.CATALOG, f"catalog {path} cannot be read ({e.strerror})") from None
    except ValueError as e:
        raise HubError(E.CATALOG, f"catalog {path} is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION \
            or not isinstance(doc.get("bundles"), list):
        raise HubError(E.CATALOG, f"catalog {path} must be {{\"format\": \"{FORMAT}\", \"version\": {VERSION}, "
                                  "\"bundles\": [...]}")
    return [CatalogEntry.from_dict(d, f"{path} entry {i}") for i, d in enumerate(doc["bundles"])]


def read_catalogs(paths, on_error: Optional[Callable[[HubError], None]] = None) -> list:
    """Entries of every catalog file that exists, in order; a broken file is reported to on_error and skipped.
    A label already taken by an earlier entry is skipped (one entry per file)."""
    out, seen = [], set()
    for p in paths:
        if not Path(p).is_file():
            continue
        try:
            entries = load_catalog(p)
        except HubError as e:
            if on_error is None:
                raise
            on_error(e)
            continue
        for e in entries:
            if e.label() not in seen:
                seen.add(e.label())
                out.append(e)
    return out


def for_family(entries, family: Optional[str] = None) -> list:
    """The entries that fit a model family (all of them for None), sorted by label."""
    return sorted((e for e in entries if family in (None, "", e.family)), key=lambda e: e.label())


def add_entry(path, entry: CatalogEntry) -> Path:
    """Write `entry` into the catalog at `path` (created if absent), replacing an entry for the same file."""
    from ..masks.atomic import atomic_write_bytes

    path = Path(path)
    entries = load_catalog(path) if path.is_file() else []
    entries = [e for e in entries if e.label() != entry.label()] + [entry]
    doc = {"format": FORMAT, "version": VERSION, "bundles": [e.to_dict() for e in entries]}
    return atomic_write_bytes(path, (json.dumps(doc, indent=2) + "\n").encode())
