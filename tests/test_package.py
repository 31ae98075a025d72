"""Packaging facts the design card promises."""

import ast
import pathlib
import re
import subprocess
import sys

import calibatt

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENGINE = ("masks", "kernels", "calibration", "hub")


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
