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


# The ComfyUI side of the package: nodes/ and the root __init__ (which imports nodes/ only inside ComfyUI).
COMFYUI_SIDE = "nodes"
# Folders of the repository that are not part of the package (the package never imports them).
TOOL_FOLDERS = {"tests", "bench", "demo", "scripts", "workflows"}
# ComfyUI's top-level modules and packages (what its main.py puts on sys.path).
COMFYUI_MODULES = {"comfy", "comfy_api", "comfy_api_nodes", "comfy_config", "comfy_execution", "comfy_extras",
                   "folder_paths", "nodes", "server", "execution", "node_helpers", "latent_preview", "main",
                   "comfyui_version", "cuda_malloc", "protocol", "api_server", "middleware", "app",
                   # ComfyUI's kernel package (Sol-Attn and friends): benchmarks and tests compare against it, the
                   # engine never depends on it
                   "comfy_kitchen"}


def _visible_dirs(root: pathlib.Path):
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith((".", "__")))


def package_folders(root: pathlib.Path) -> list:
    """Every folder of the package below `root`: those with an __init__.py, found from the tree (so a new one is
    covered without editing this test), recursively."""
    out = []
    for d in _visible_dirs(root):
        if (d / "__init__.py").is_file():
            out.append(d)
            out += package_folders(d)
    return out


def engine_modules(root: pathlib.Path) -> list:
    """The package's modules outside its ComfyUI side: root-level modules but the root __init__, and every package
    folder's modules but nodes/'s."""
    mods = [f for f in sorted(root.glob("*.py")) if f.name != "__init__.py"]
    for d in package_folders(root):
        if d.relative_to(root).parts[0] != COMFYUI_SIDE:
            mods += sorted(d.glob("*.py"))
    return mods


def comfyui_imports(path: pathlib.Path, root: pathlib.Path) -> list:
    """Sentences for every import in `path` (a module of the package rooted at `root`) that reaches ComfyUI or the
    package's ComfyUI side: absolute imports of ComfyUI's modules, relative imports resolved against the module's
    package (`from ..nodes import x` in masks/ resolves to nodes), and constant-string __import__ /
    importlib.import_module calls."""
    package = list(path.relative_to(root).parent.parts)  # __package__ of a module and of an __init__ alike
    where = path.relative_to(root)
    out = []

    def absolute(name: str, line: int):
        parts = name.split(".")
        if parts[0] in COMFYUI_MODULES or parts[:2] == ["calibatt", COMFYUI_SIDE]:
            out.append(f"{where}:{line}: imports {name}")

    def relative(level: int, module, names, line: int):
        if level - 1 > len(package):
            out.append(f"{where}:{line}: relative import beyond the package (level {level})")
            return
        base = package[:len(package) - (level - 1)]
        targets = [base + module.split(".")] if module else [base + [n] for n in names]
        for t in targets:
            if t[0] == COMFYUI_SIDE:
                out.append(f"{where}:{line}: imports {'.' * level}{module or ''} "
                           f"(resolves to {'.'.join(t)}, the ComfyUI side)")

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                absolute(a.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                absolute(node.module or "", node.lineno)
            else:
                relative(node.level, node.module, [a.name for a in node.names], node.lineno)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if name in ("__import__", "import_module"):
                target = node.args[0].value
                if target.startswith("."):
                    level = len(target) - len(target.lstrip("."))
                    relative(level, target.lstrip(".") or None, [], node.lineno)
                else:
                    absolute(target, node.lineno)
    return out


def test_engine_never_imports_comfyui():
    mods = engine_modules(ROOT)
    covered = {m.relative_to(ROOT).parts[0] for m in mods if len(m.relative_to(ROOT).parts) > 1}
    assert {"masks", "kernels", "calibration", "adapters", "tinywan", "parallel"} <= covered, covered
    problems = [p for f in mods for p in comfyui_imports(f, ROOT)]
    assert not problems, "\n".join(problems)


def test_every_folder_with_python_is_a_package_folder_or_a_tool():
    """A new folder of Python code without an __init__.py would escape the import check above."""
    for d in _visible_dirs(ROOT):
        if d.name not in TOOL_FOLDERS and any(d.rglob("*.py")):
            assert (d / "__init__.py").is_file(), (
                f"{d.name}/ holds Python code but no __init__.py: make it a package folder (then the import "
                f"check covers it) or, if the package never imports it, add it to TOOL_FOLDERS")


def test_the_import_check_catches_planted_violations(tmp_path):
    """The checker on a temporary package: each planted violation is reported, allowed imports are not."""
    files = {
        "__init__.py": "from .nodes import registry\n",  # the root __init__ may
        "version.py": "__version__ = '0'\n",
        "nodes/__init__.py": "",
        "nodes/glue.py": "import comfy.model_management\nimport folder_paths\n",  # the ComfyUI side may
        "masks/__init__.py": "from .geometry import TokenGrid\n",
        "masks/geometry.py": "from ..kernels import call\nfrom . import errors\nimport torch\n",
        "masks/bad_relative.py": "from ..nodes import model_info\n",
        "masks/bad_relative_name.py": "from .. import nodes\n",
        "masks/bad_absolute.py": "from comfy import model_management\n",
        "masks/deep/__init__.py": "from ...nodes.routing import AttentionRouter\n",
        "masks/beyond.py": "from ...outside import x\n",
        "kernels/__init__.py": "",
        "kernels/call.py": "import importlib\nm = importlib.import_module('comfy.ops')\n",
        # A folder nobody listed anywhere: covered because it is a package folder.
        "newengine/__init__.py": "",
        "newengine/thing.py": "def f():\n    import comfy_api.latest\n",
        "root_bad.py": "from .nodes import specs\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = {p.split(":")[0]: p for f in engine_modules(tmp_path) for p in comfyui_imports(f, tmp_path)}
    assert sorted(found) == sorted(["masks/bad_relative.py", "masks/bad_relative_name.py", "masks/bad_absolute.py",
                                    "masks/deep/__init__.py", "masks/beyond.py", "kernels/call.py",
                                    "newengine/thing.py", "root_bad.py"]), found
    assert "imports ..nodes (resolves to nodes, the ComfyUI side)" in found["masks/bad_relative.py"]
    assert "imports .. (resolves to nodes, the ComfyUI side)" in found["masks/bad_relative_name.py"]
    assert "resolves to nodes.routing" in found["masks/deep/__init__.py"]
    assert "beyond the package" in found["masks/beyond.py"]
    assert "comfy.ops" in found["kernels/call.py"] and "comfy_api.latest" in found["newengine/thing.py"]


# The engine's layers, lowest first: each package folder may import only the folders listed for it (and the root
# modules, e.g. version.py); nodes/ (the ComfyUI side) may import anything. A new package folder must be placed here.
ENGINE_LAYERS = {
    "masks": set(),
    "kernels": {"masks"},
    "calibration": {"masks", "kernels"},
    "hub": {"masks"},
    "adapters": {"masks", "kernels", "calibration"},
    "tinywan": {"masks", "kernels", "calibration", "adapters"},
    "parallel": {"masks", "kernels", "calibration"},
}


def package_imports(path: pathlib.Path, root: pathlib.Path) -> list:
    """(top-level folder or module of the package, line) of every import in `path` that reaches the package rooted
    at `root`: relative imports resolved against the module's package, absolute `calibatt.x` imports, and
    constant-string __import__ / importlib.import_module calls."""
    package = list(path.relative_to(root).parent.parts)
    out = []

    def relative(level: int, module, names, line: int):
        base = package[:max(0, len(package) - (level - 1))]
        for t in ([base + module.split(".")] if module else [base + [n] for n in names]):
            out.append((t[0], line))

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name.split(".")[1], node.lineno) for a in node.names
                    if a.name.startswith("calibatt.")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                relative(node.level, node.module, [a.name for a in node.names], node.lineno)
            elif (node.module or "").startswith("calibatt."):
                out.append((node.module.split(".")[1], node.lineno))
            elif node.module == "calibatt":
                out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            target = node.args[0].value
            if name in ("__import__", "import_module"):
                if target.startswith("."):
                    relative(len(target) - len(target.lstrip(".")), target.lstrip(".") or None, [], node.lineno)
                elif target.startswith("calibatt."):
                    out.append((target.split(".")[1], node.lineno))
    return out


def layer_violations(root: pathlib.Path) -> list:
    """Sentences for every import of an engine module that goes up or across the layers of ENGINE_LAYERS, and for
    every package folder ENGINE_LAYERS does not place."""
    folders = {d.name for d in _visible_dirs(root) if (d / "__init__.py").is_file()}
    out = [f"{d}/ is a package folder with no place in ENGINE_LAYERS: add it (the folders it may import)"
           for d in sorted(folders - set(ENGINE_LAYERS) - {COMFYUI_SIDE})]
    for f in engine_modules(root):
        parts = f.relative_to(root).parts
        if len(parts) == 1:
            continue  # root modules (version.py) import nothing of the package
        allowed = ENGINE_LAYERS.get(parts[0], set()) | {parts[0]}
        for target, line in package_imports(f, root):
            if target in folders and target not in allowed:
                out.append(f"{f.relative_to(root)}:{line}: imports {target} (the {parts[0]} layer may import "
                           f"{', '.join(sorted(allowed - {parts[0]})) or 'no other folder'})")
    return out


def test_engine_layers_import_downward():
    assert not layer_violations(ROOT), "\n".join(layer_violations(ROOT))


def test_the_layer_check_catches_planted_violations(tmp_path):
    files = {
        "__init__.py": "", "version.py": "",
        "nodes/__init__.py": "from ..calibration import x\n",  # the ComfyUI side may import anything
        "masks/__init__.py": "from ..version import v\n",
        "masks/up.py": "from ..kernels import call\n",
        "masks/up_abs.py": "def f():\n    from calibatt.calibration import Calibrator\n",
        "kernels/__init__.py": "from ..masks import geometry\n",
        "kernels/deep/__init__.py": "from ...calibration import stats\n",
        "calibration/__init__.py": "import importlib\nimportlib.import_module('..tinywan', __package__)\n",
        "tinywan/__init__.py": "from ..adapters import x\nfrom ..calibration import y\n",
        "adapters/__init__.py": "from .. import tinywan\n",
        "hub/__init__.py": "from ..masks import x\n",
        "newlayer/__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = layer_violations(tmp_path)
    where = sorted(p.split(":")[0].split(" ")[0] for p in found)
    assert where == sorted(["masks/up.py", "masks/up_abs.py", "kernels/deep/__init__.py", "calibration/__init__.py",
                            "adapters/__init__.py", "newlayer/"]), found
    assert any("masks/up.py:1: imports kernels (the masks layer may import no other folder)" == p for p in found)


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
