"""`python -m hub ...` from the checkout (any folder name), or `python -m <package>.hub ...` from its parent.

Run as the top-level package `hub`, the relative imports into masks/ have no parent package: load the checkout
as the package `calibatt` first (as scripts/_pkg.py does) and run calibatt.hub.cli.
"""

import sys

if __package__ in (None, "", "hub"):
    import importlib.util
    import pathlib

    _root = pathlib.Path(__file__).resolve().parents[1]
    if "calibatt" not in sys.modules:
        _spec = importlib.util.spec_from_file_location("calibatt", _root / "__init__.py",
                                                       submodule_search_locations=[str(_root)])
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["calibatt"] = _module
        _spec.loader.exec_module(_module)
    from calibatt.hub.cli import main
else:
    from .cli import main

sys.exit(main())
