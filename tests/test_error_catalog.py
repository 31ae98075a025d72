"""docs/ERRORS.md lists every error and warning message in the code, and the README's Troubleshooting quotes only
messages the code really gives (scripts/error_catalog.py), so neither can drift from the code."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _catalog():
    spec = importlib.util.spec_from_file_location("error_catalog", ROOT / "scripts" / "error_catalog.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_raise_has_a_readable_message():
    _, problems = _catalog().collect()
    assert problems == []


def test_errors_md_is_generated_from_the_current_code():
    cat = _catalog()
    entries, _ = cat.collect()
    assert (ROOT / "docs" / "ERRORS.md").read_text() == cat.render(entries), \
        "docs/ERRORS.md is stale: run python scripts/error_catalog.py"


def test_every_module_with_messages_has_a_what_to_do_note():
    cat = _catalog()
    entries, _ = cat.collect()
    assert sorted({e.module for e in entries} - set(cat.MODULE_NOTES)) == []


def test_catalog_finds_the_known_messages_and_helpers():
    """A few messages of each kind, spelled as users see them: raised directly, raised through a helper (with the
    helper's default fix), and logged."""
    msgs = [e.message for e in _catalog().collect()[0]]
    assert "[path] file not found; put bundles in ComfyUI/models/sparse_attention/" in msgs
    assert any(m.startswith("[header] file is {len(head)} bytes, too short") and
               m.endswith("; re-create it with Calibrate Sparse Attention or download it again") for m in msgs)
    assert any(m.startswith("[format] format is") and "mask bundles in models/sparse_attention/" in m for m in msgs)
    assert any("Patch Model Attention: {e}; the model runs unpatched" in m for m in msgs)
    assert any(m.startswith("{self.name}: attention call without a usable layer index") for m in msgs)
    assert len(msgs) > 150


def _troubleshooting_quotes() -> list:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^- `([^`]+)`", section, re.M)


def test_readme_troubleshooting_quotes_real_messages():
    """Each Troubleshooting entry starts with a quoted message; its fixed parts must occur in one catalog message
    ("..." in a quote stands for a value the code fills in)."""
    msgs = [e.message for e in _catalog().collect()[0]]
    quotes = _troubleshooting_quotes()
    assert len(quotes) >= 8
    for q in quotes:
        parts = [p.strip() for p in q.split("...") if p.strip()]
        assert any(all(p in m for p in parts) for m in msgs), f"README Troubleshooting quotes {q!r}: not in the code"
