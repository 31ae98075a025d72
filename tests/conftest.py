"""Import the repository root as the package `calibatt`, whatever the checkout folder is called."""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location(
    "_calibatt_pkg", pathlib.Path(__file__).resolve().parents[1] / "scripts" / "_pkg.py")
_pkg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_pkg)
_pkg.load_package()
