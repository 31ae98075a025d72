"""Import the repository root as the package `calibatt`, whatever the checkout folder is called."""

import importlib.util
import os
import pathlib
import sys

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    # Triton fixes interpreted-or-compiled when a @triton.jit function is decorated, triton.language's own helpers
    # (tl.zeros, ...) included, so it must be set before ANY test module imports triton (diffusers does, at
    # collection); the interpreter test modules set it too late when they are collected after such a module.
    os.environ["TRITON_INTERPRET"] = "1"

# `python -m pytest` from the checkout puts the repository root on sys.path, which makes our kernels/, masks/ and
# nodes/ importable as top-level packages. diffusers probes for the Hugging Face `kernels` package on CUDA machines
# and would import ours instead (seen on the device: "attempted relative import beyond top-level package").
_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != _ROOT]

_spec = importlib.util.spec_from_file_location(
    "_calibatt_pkg", pathlib.Path(__file__).resolve().parents[1] / "scripts" / "_pkg.py")
_pkg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_pkg)
_pkg.load_package()


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Run a module single-threaded, then restore: with tiny tensors, 2 intra-op threads on a busy 2-core machine
    wait on each other (measured 30x slower). Modules opt in with pytestmark = usefixtures("one_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
