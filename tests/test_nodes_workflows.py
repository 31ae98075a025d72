"""Shipped workflows: UI format, in sync with their generator and with our nodes' widget order (no ComfyUI)."""

import importlib.util
import json
from pathlib import Path

import pytest

from calibatt.nodes import specs

ROOT = Path(__file__).resolve().parents[1]


def _builder():
    spec = importlib.util.spec_from_file_location("build_workflows", ROOT / "workflows" / "build_workflows.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", sorted(_builder().WORKFLOWS))
def test_workflow_files_match_the_generator(name):
    built = _builder().WORKFLOWS[name]()
    on_disk = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
    assert on_disk == built, f"workflows/{name}.json is stale: run python workflows/build_workflows.py"


def test_our_nodes_in_workflows_have_the_spec_widget_count():
    by_id = {s.node_id: s for s in specs.ALL}
    seen = set()
    for path in sorted((ROOT / "workflows").glob("*.json")):
        wf = json.loads(path.read_text())
        assert wf["version"] == 0.4 and isinstance(wf["links"], list)  # UI format, not the API format
        for node in wf["nodes"]:
            if node["type"] in by_id:
                seen.add(node["type"])
                assert len(node["widgets_values"]) == specs.widget_count(by_id[node["type"]]), (path.name, node)
    assert {"CalibrateSparseAttention", "LoadMaskBundle", "PatchModelAttention"} <= seen
