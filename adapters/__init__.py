"""Engine-side host adapters outside ComfyUI (optional dependencies, imported on demand)."""
