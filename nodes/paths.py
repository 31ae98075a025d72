"""The models/sparse_attention/ folder: registration with ComfyUI, listing, and safe output names."""

from __future__ import annotations

import os
import re

import folder_paths

FOLDER = "sparse_attention"
EXTENSION = ".safetensors"


def register():
    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER), is_default=True)
    # Only bundle files in ComfyUI's listings of the folder (the model library too): downloads under hub/ leave
    # huggingface_hub's .metadata / .lock records beside them.
    folder_paths.folder_names_and_paths[FOLDER][1].add(EXTENSION)


def list_bundles() -> list:
    try:
        names = folder_paths.get_filename_list(FOLDER)
    except KeyError:  # registration failed earlier; show an empty list rather than break the node list
        return []
    return sorted(n for n in names if n.lower().endswith(EXTENSION))


def bundle_path(name: str) -> str:
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        raise FileNotFoundError(f"mask bundle '{name}' is not in {', '.join(folder_paths.get_folder_paths(FOLDER))}; "
                                "put the .safetensors file there (or calibrate one) and refresh the node list")
    return path


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def output_path(filename: str) -> str:
    """Where Calibrate Sparse Attention writes `filename` (a plain file name; the extension is added)."""
    stem = filename.strip()
    if stem.lower().endswith(EXTENSION):
        stem = stem[: -len(EXTENSION)]
    stem = _SAFE.sub("_", stem).strip("._")
    if not stem:
        raise ValueError(f"output file name {filename!r} has no usable characters; use letters, digits, '-', '_'")
    folder = folder_paths.get_folder_paths(FOLDER)[0]
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, stem + EXTENSION)
