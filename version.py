"""Single source of the package version (pyproject.toml carries the same string; a test keeps them equal)."""

__version__ = "0.1.0"
