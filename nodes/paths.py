"""The models/sparse_attention/ folder: registration with ComfyUI, listing, and safe output names."""

from __future__ import annotations

import os

import folder_paths

from ..masks.atomic import remove_stale_partials
from .calibrate_inputs import EXTENSION, bundle_file_name

FOLDER = "sparse_attention"


def register():
    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER), is_default=True)
    # Only bundle files in ComfyUI's listings of the folder (the model library too): downloads under hub/ leave
    # huggingface_hub's .metadata / .lock records beside them.
    folder_paths.folder_names_and_paths[FOLDER][1].add(EXTENSION)


def list_bundles() -> list:
    """Bundle names for the node's list; temp files of saves a crash interrupted over a day ago are removed."""
    try:
        for folder in folder_paths.get_folder_paths(FOLDER):
            remove_stale_partials(folder)
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


def output_path(filename: str) -> str:
    """Where Calibrate Sparse Attention writes `filename` (a plain file name; the extension is added); a name the
    file system would refuse is a ValueError now, not after the calibration."""
    name = bundle_file_name(filename)
    folder = folder_paths.get_folder_paths(FOLDER)[0]
    return os.path.join(folder, name)
