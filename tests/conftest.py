"""Import the repository root as the package `calibatt`, whatever the checkout folder is called."""

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

if "calibatt" not in sys.modules:
    spec = importlib.util.spec_from_file_location("calibatt", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["calibatt"] = module
    spec.loader.exec_module(module)
