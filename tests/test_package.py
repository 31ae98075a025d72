"""Packaging facts the design card promises."""

import ast
import pathlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import calibatt

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENGINE = ("masks", "kernels", "calibration")


def test_imports_without_comfyui_and_exposes_engine():
    # In a fresh interpreter: under COMFYUI_PATH other test modules import ComfyUI into this one.
    code = ("import sys; sys.path.insert(0, sys.argv[1] + '/scripts'); import _pkg; _pkg.load_package(); "
            "import calibatt; from calibatt.masks import load_bundle, save_bundle; "
            "from calibatt.kernels import sparse_attention_reference; "
            "from calibatt.calibration import Calibrator; "
            "assert not hasattr(calibatt, 'NODE_CLASS_MAPPINGS'), 'nodes registered outside ComfyUI'; "
            "bad = sorted(m for m in sys.modules if m == 'comfy' or m.startswith('comfy.') or m == 'folder_paths'); "
            "assert not bad, bad; print('ok')")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_loads_from_any_folder_name(tmp_path):
    """Copy the package under a folder name that is not a valid identifier, as custom_nodes/ allows."""
    import shutil
    dst = tmp_path / "ComfyUI-CalibAtt copy"
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(".*", "output", "*.safetensors", "tests"))
    code = ("import importlib.util, sys; p=sys.argv[1]; "
            "s=importlib.util.spec_from_file_location('x_mod', p + '/__init__.py', submodule_search_locations=[p]); "
            "m=importlib.util.module_from_spec(s); sys.modules['x_mod']=m; s.loader.exec_module(m); "
            "from x_mod.masks import MaskBundle; print(m.__version__)")
    out = subprocess.run([sys.executable, "-c", code, str(dst)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == calibatt.__version__


def test_engine_never_imports_comfyui():
    for pkg in ENGINE:
        for f in (ROOT / pkg).rglob("*.py"):
            tree = ast.parse(f.read_text())
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for n in names:
                    top = n.split(".")[0]
                    assert top not in ("comfy", "folder_paths", "comfy_api", "nodes", "server"), f"{f}: {n}"


def test_no_pickle_anywhere():
    pat = re.compile(r"\b(import pickle|torch\.load\(|torch\.save\(|pickle\.(loads?|dumps?)\()")
    for f in ROOT.rglob("*.py"):
        # hidden folders are venvs (.venv, .venv-comfy) and tool caches, not the package
        if any(part.startswith(".") for part in f.relative_to(ROOT).parts) or f.name == "test_package.py":
            continue
        assert not pat.search(f.read_text()), f"pickle-based I/O in {f}"


def test_requirements_do_not_pull_torch():
    reqs = [l.strip() for l in (ROOT / "requirements.txt").read_text().splitlines()
            if l.strip() and not l.strip().startswith("#")]
    assert not any(re.match(r"(torch|torchvision|torchaudio)\b", r) for r in reqs), reqs


def test_versions_agree():
    py = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{calibatt.__version__}"' in py


PLACEHOLDER = "UNKNOWN-UNTIL-PUBLISHED"


def _tested_comfyui_versions() -> list:
    """ComfyUI versions make test / CI run against: the archives in ../shared/comfyui or the extracted trees."""
    found = set()
    for folder in (ROOT.parent / "shared" / "comfyui", Path.home() / ".cache" / "calibatt" / "comfyui"):
        for p in folder.glob("comfyui-*"):
            m = re.fullmatch(r"comfyui-(\d+(?:\.\d+)*)(?:\.tgz)?", p.name)
            if m:
                found.add(tuple(int(x) for x in m.group(1).split(".")))
    return sorted(found)


def test_pyproject_is_complete_for_the_comfy_registry():
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project, comfy = meta["project"], meta["tool"]["comfy"]
    name = project["name"]
    # the registry's rules for a node id: < 100 characters of [A-Za-z0-9._-], no two special characters in a row,
    # starts with a letter; and its advice: no "ComfyUI" in it
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]*", name) and not re.search(r"[._-]{2}", name)
    assert "comfyui" not in name.lower()
    assert project["version"] == calibatt.__version__ and re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert len(project["description"]) > 40 and project["license"] and project["requires-python"]
    assert project["dependencies"] == []  # requirements.txt is empty on purpose, see test above
    assert comfy["DisplayName"]
    for folder in comfy["includes"]:
        assert (ROOT / folder).is_dir(), folder
    assert {"web", "workflows"} <= set(comfy["includes"])
    # fields that cannot be known before the first publication carry one documented placeholder
    unknown = [k for k, v in (("Repository", project["urls"]["Repository"]), ("PublisherId", comfy["PublisherId"]))
               if v == PLACEHOLDER]
    if unknown:
        publishing = (ROOT / "docs" / "COMFYUI.md").read_text().split("## Publishing", 1)
        assert len(publishing) == 2 and PLACEHOLDER in publishing[1], "docs/COMFYUI.md must say what to fill in"
        assert all(k in publishing[1] for k in unknown)
    else:
        assert project["urls"]["Repository"].startswith("https://")


def test_requires_comfyui_is_the_oldest_version_the_tests_run_against():
    import tomllib

    versions = _tested_comfyui_versions()
    if not versions:
        pytest.skip("no ComfyUI trees here (../shared/comfyui or ~/.cache/calibatt/comfyui) to compare with")
    comfy = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["comfy"]
    assert comfy["requires-comfyui"] == ">=" + ".".join(map(str, versions[0]))


def test_readme_screenshots_exist_and_are_the_browser_tests():
    """The README's pictures are files the browser test writes (tests/test_browser_ui.py; make screenshots): a
    workflow of workflows/, a node's help, or Mask Bundle Preview's output."""
    readme = (ROOT / "README.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme)
    assert images, "the README shows no screenshots"
    workflows = {p.stem for p in (ROOT / "workflows").glob("*.json")}
    nodes = {p.stem for p in (ROOT / "web" / "docs").glob("*.md")}
    for rel in images:
        path = ROOT / rel
        assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG", rel
        assert re.fullmatch(r"docs/screenshots/comfyui-[0-9.]+/[^/]+\.png", rel), rel
        stem = path.stem
        assert stem in workflows or stem == "mask_bundle_preview" or \
            (stem.startswith("help_") and stem[5:] in nodes), f"{rel} is not a picture the browser test takes"
