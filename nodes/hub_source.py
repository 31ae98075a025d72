"""Load Mask Bundle's hub side: a hub reference or a catalog entry -> a verified bundle under models/sparse_attention/.

The download, verification and messages live in hub/ (no ComfyUI there); this module supplies what only ComfyUI
has: the models folder, the node's progress bar, and the interrupt button (checked as each block of bytes
arrives; an interrupt stops the transfer and leaves no partial file).
"""

from __future__ import annotations

import logging
import os
import time

import comfy.model_management
import comfy.utils
import folder_paths

from ..hub import catalog as hub_catalog
from ..hub import errors as E
from ..hub.errors import HubError
from ..hub.fetch import fetch_bundle, hub_endpoint
from ..hub.reference import parse
from . import paths

log = logging.getLogger("calibatt")

CATALOG_FILE = "catalog.json"


def models_root() -> str:
    """Downloads go to the first models/sparse_attention folder (the default one, which ComfyUI lists)."""
    folder = folder_paths.get_folder_paths(paths.FOLDER)[0]
    os.makedirs(folder, exist_ok=True)
    return folder


def catalog_entries() -> list:
    """The shipped catalog, then a catalog.json in each models/sparse_attention folder; broken files are logged
    and skipped so the node list still loads."""
    try:
        folders = folder_paths.get_folder_paths(paths.FOLDER)
    except KeyError:
        folders = []
    files = [hub_catalog.SHIPPED] + [os.path.join(f, CATALOG_FILE) for f in folders]
    return hub_catalog.read_catalogs(files, on_error=lambda e: log.warning("Load Mask Bundle: %s", e))


def catalog_labels() -> list:
    return [e.label() for e in hub_catalog.for_family(catalog_entries())]


def _catalog_entry(label: str):
    for e in catalog_entries():
        if e.label() == label:
            return e
    return None


def is_catalog_label(name) -> bool:
    return isinstance(name, str) and name.startswith(hub_catalog.LABEL_ROOT + "/")


class _NodeProgress:
    """ComfyUI's progress bar for the download, and the interrupt check, once per block of bytes."""

    def __init__(self):
        self.bar = None
        self.last = 0.0

    def __call__(self, done: int, total):
        comfy.model_management.throw_exception_if_processing_interrupted()
        if total is None and done == 0:
            return
        final = total is not None and done >= total
        now = time.monotonic()
        if not final and now - self.last < 0.1:  # 0.3.x sends every update to the browser
            return
        self.last = now
        if self.bar is None:
            self.bar = comfy.utils.ProgressBar(max(total or 0, done, 1))
        self.bar.update_absolute(done, max(total or 0, done, 1))


def load(bundle_name: str, hub_reference: str = ""):
    """-> (MaskBundle, summary) for a hub reference (wins when set) or a catalog label."""
    entry = None
    if hub_reference and hub_reference.strip():
        reference = hub_reference.strip()
    else:
        entry = _catalog_entry(bundle_name)
        if entry is None:
            raise HubError(E.CATALOG, f"'{bundle_name}' is no longer in any catalog (models/sparse_attention/"
                                      f"{CATALOG_FILE} or the package's hub/catalog.json); pick another bundle or "
                                      "paste its reference into hub_reference")
        reference = entry.pinned_reference()
    bundle, got = fetch_bundle(reference, models_root(), progress=_NodeProgress())
    if entry is not None:
        hub_catalog.check_bundle(entry, bundle)
    how = "downloaded to" if got.downloaded else "found in"
    log.info("Load Mask Bundle: %s %s %s (%d bytes, sha256 %s)", got.reference.canonical(), how, got.path,
             got.size, got.sha256)
    return bundle, f"{bundle.summary()} | {got.reference.canonical(with_sha256=False)} sha256 {got.sha256[:16]}"


def fingerprint(bundle_name: str, hub_reference: str = "") -> str:
    """Changes when the reference changes or its local file appears, changes or disappears (no network here)."""
    ref_text = hub_reference.strip() if hub_reference else ""
    if not ref_text:
        entry = _catalog_entry(bundle_name)
        ref_text = entry.pinned_reference() if entry is not None else bundle_name
    try:
        ref = parse(ref_text, endpoint=hub_endpoint())
        st = os.stat(os.path.join(models_root(), *ref.relpath().parts))
        return f"{ref_text}|{st.st_mtime_ns}:{st.st_size}"
    except (HubError, OSError):
        return f"{ref_text}|absent"


def validate(bundle_name, hub_reference="") -> "bool | str":
    """ComfyUI's input check: a reference must parse; without one, the name must be a local bundle or a catalog
    entry. (Declaring bundle_name here lets a shared workflow name a bundle that is not downloaded yet.)"""
    if hub_reference and hub_reference.strip():
        try:
            parse(hub_reference, endpoint=hub_endpoint())
        except HubError as e:
            return str(e)
        return True
    if isinstance(bundle_name, str) and bundle_name:
        if is_catalog_label(bundle_name):
            found = bundle_name in catalog_labels()
        else:  # get_full_path takes either separator and looks in every sparse_attention folder
            found = (bundle_name.lower().endswith(paths.EXTENSION)
                     and folder_paths.get_full_path(paths.FOLDER, bundle_name) is not None)
        if found:
            return True
    return (f"mask bundle '{bundle_name}' is not in models/sparse_attention/: put the file there, calibrate one, "
            "pick a catalog entry, or paste a hub reference (hf://owner/repo/file.safetensors) into hub_reference")
