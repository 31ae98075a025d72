"""Drive a real ComfyUI (COMFYUI_PATH) headless for the integration tests.

- `tiny_wan_state_dict()`: a random Wan 2.1 T2V checkpoint small enough for CPU that ComfyUI's stock
  UNETLoader detects as WAN21_T2V (keys without prefix, dim 256 -> 2 heads of 128, text_embedding.0 [dim, 4096]).
- `TEST_NODE_SOURCE`: test-only custom nodes: random T5-shaped CONDITIONING (a real umt5-xxl cannot be made tiny)
  and a model wrapper that counts model evaluations and can press Cancel after a given one. Written into the
  temporary custom_nodes, never shipped.
- `ComfyServer`: start `main.py --cpu` on a free port with a temporary base directory, POST API-format prompts,
  wait for their history entries, stop.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
COMFY = os.environ.get("COMFYUI_PATH")


def comfy_available() -> bool:
    return bool(COMFY) and os.path.isfile(os.path.join(COMFY, "main.py"))


# The marks of every module that runs against a real ComfyUI: `pytestmark = H.NEEDS_COMFYUI`.
NEEDS_COMFYUI = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not comfy_available(),
                       reason="needs a ComfyUI checkout: set COMFYUI_PATH (docs/COMFYUI.md has the commands)"),
]
# An odd folder name: the package must not depend on being installed as "calibatt" or any fixed name.
PACKAGE_DIR_NAME = "ComfyUI-CalibAtt-test"

TEST_NODE_SOURCE = '''
"""Test-only ComfyUI nodes: random T5-shaped conditioning (one entry per requested prompt), model call counter."""
import torch


class CalibAttTestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                             "prompts": ("INT", {"default": 1, "min": 1, "max": 64}),
                             "tokens": ("INT", {"default": 512, "min": 1, "max": 512})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, seed, prompts, tokens):
        g = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, tokens, 4096, generator=g), {}] for _ in range(prompts)],)


class CalibAttTestModelCalls:
    """Counts the model evaluations of a sampling run (written to output/model_calls_<tag>.txt as they happen) and,
    with interrupt_after > 0, presses Cancel from inside the run right after that many evaluations: an interrupt at
    a known point, not after a wall-clock delay."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "tag": ("STRING", {"default": "run"}),
                             "interrupt_after": ("INT", {"default": 0, "min": 0, "max": 10000})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, model, tag, interrupt_after):
        import os

        import comfy.model_management
        import comfy.patcher_extension as pe
        import folder_paths

        path = os.path.join(folder_paths.get_output_directory(), f"model_calls_{tag}.txt")
        calls = [0]

        def count(executor, *args, **kwargs):
            out = executor(*args, **kwargs)
            calls[0] += 1
            with open(path, "w") as f:
                f.write(str(calls[0]))
            if calls[0] == interrupt_after:
                comfy.model_management.interrupt_current_processing(True)
            return out

        m = model.clone()
        m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "calibatt_test_calls", count)
        return (m,)


NODE_CLASS_MAPPINGS = {"CalibAttTestConditioning": CalibAttTestConditioning,
                       "CalibAttTestModelCalls": CalibAttTestModelCalls}
'''


def tiny_wan_state_dict(dim: int = 256, layers: int = 2, ffn: int = 512, in_dim: int = 16, out_dim: int = 16,
                        seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def w(*shape, scale=None):
        fan_in = shape[1] if len(shape) > 1 else shape[0]
        if len(shape) == 5:
            fan_in = shape[1] * shape[2] * shape[3] * shape[4]
        s = scale if scale is not None else fan_in ** -0.5
        return (torch.randn(*shape, generator=g) * s).to(torch.float16)

    def b(n):
        return (torch.randn(n, generator=g) * 0.02).to(torch.float16)

    def ones(n):
        return torch.ones(n, dtype=torch.float16)

    sd = {
        "patch_embedding.weight": w(dim, in_dim, 1, 2, 2), "patch_embedding.bias": b(dim),
        "text_embedding.0.weight": w(dim, 4096), "text_embedding.0.bias": b(dim),
        "text_embedding.2.weight": w(dim, dim), "text_embedding.2.bias": b(dim),
        "time_embedding.0.weight": w(dim, 256), "time_embedding.0.bias": b(dim),
        "time_embedding.2.weight": w(dim, dim), "time_embedding.2.bias": b(dim),
        "time_projection.1.weight": w(6 * dim, dim), "time_projection.1.bias": b(6 * dim),
        "head.modulation": w(1, 2, dim, scale=0.1), "head.head.weight": w(out_dim * 4, dim),
        "head.head.bias": b(out_dim * 4),
    }
    for i in range(layers):
        p = f"blocks.{i}."
        sd[p + "modulation"] = w(1, 6, dim, scale=0.1)
        for att in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                sd[f"{p}{att}.{proj}.weight"] = w(dim, dim)
                sd[f"{p}{att}.{proj}.bias"] = b(dim)
            sd[f"{p}{att}.norm_q.weight"] = ones(dim)
            sd[f"{p}{att}.norm_k.weight"] = ones(dim)
        sd[p + "norm3.weight"] = ones(dim)
        sd[p + "norm3.bias"] = b(dim)
        sd[p + "ffn.0.weight"] = w(ffn, dim)
        sd[p + "ffn.0.bias"] = b(ffn)
        sd[p + "ffn.2.weight"] = w(dim, ffn)
        sd[p + "ffn.2.bias"] = b(dim)
    return sd


def tiny_wan_graph(width: int = 128, height: int = 64, length: int = 9, *, prompts: int = 1, seed: int = 7,
                   tokens: int = 512) -> dict:
    """The API-format nodes every tiny-Wan test graph starts with: the checkpoint tiny_wan_state_dict writes (as
    models/diffusion_models/tiny_wan.safetensors), `prompts` test conditionings and their zeroed negative, and an
    empty latent of width x height x length px (128x64x9 -> latent [1, 16, 3, 8, 16] -> 3 x 4 x 8 = 96 tokens)."""
    return {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_wan.safetensors",
                                                        "weight_dtype": "default"}},
        "cond": {"class_type": "CalibAttTestConditioning", "inputs": {"seed": seed, "prompts": prompts,
                                                                     "tokens": tokens}},
        "neg": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["cond", 0]}},
        "latent": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": width, "height": height,
                                                                       "length": length, "batch_size": 1}},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """One headless ComfyUI with its own base directory (models/, custom_nodes/, output/ under `base`)."""

    def __init__(self, comfy_path: str, base: Path, env_extra: dict | None = None, python: str | None = None,
                 extra_args: list | None = None):
        import requests  # ComfyUI's venv has it; the import lives here so collecting the tests never needs it

        self.requests = requests
        self.comfy_path = Path(comfy_path)
        self.base = Path(base)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.python = python or sys.executable
        self.env_extra = dict(env_extra or {})
        self.extra_args = list(extra_args or [])  # more main.py flags, e.g. a global attention backend
        self.proc = None
        self.log_path = self.base / "comfyui.log"

    # ---- layout ---------------------------------------------------------------------------------------------
    @staticmethod
    def prepare_base(base: Path) -> Path:
        for sub in ("custom_nodes", "models/diffusion_models", "models/sparse_attention", "input", "output"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        pkg = base / "custom_nodes" / PACKAGE_DIR_NAME
        if not pkg.exists():
            pkg.symlink_to(REPO, target_is_directory=True)
        test_node = base / "custom_nodes" / "calibatt_test_nodes.py"
        test_node.write_text(TEST_NODE_SOURCE)
        return base

    # ---- process --------------------------------------------------------------------------------------------
    def start(self, timeout: float = 180.0):
        env = dict(os.environ)
        env.update(self.env_extra)
        env.setdefault("OMP_NUM_THREADS", "2")
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--database-url", "sqlite:///:memory:",
               "--disable-auto-launch"] + self.extra_args
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_path, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.requests.get(self.url + "/system_stats", timeout=2).ok:
                    return self
            except self.requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---- API --------------------------------------------------------------------------------------------------
    def object_info(self) -> dict:
        r = self.requests.get(self.url + "/object_info", timeout=60)
        r.raise_for_status()
        return r.json()

    def get_json(self, route: str):
        r = self.requests.get(self.url + route, timeout=60)
        r.raise_for_status()
        return r.json()

    def queue(self, prompt: dict) -> str:
        r = self.requests.post(self.url + "/prompt", json={"prompt": prompt, "client_id": uuid.uuid4().hex},
                               timeout=60)
        if r.status_code != 200:
            raise RuntimeError(f"prompt rejected ({r.status_code}): {r.text}")
        return r.json()["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            h = self.get_json(f"/history/{prompt_id}")
            if prompt_id in h:
                entry = h[prompt_id]
                if entry.get("status", {}).get("completed") is not None or entry.get("outputs"):
                    return entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running the prompt:\n{self.log_tail()}")
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        return self.wait(self.queue(prompt), timeout)


def status_error(entry: dict) -> str | None:
    """The exception message of a failed prompt, or None if it succeeded."""
    status = entry.get("status", {})
    if status.get("status_str") == "success":
        return None
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            return f"{data.get('exception_type')}: {data.get('exception_message')}"
    return json.dumps(status)[:2000]


def make_base_dir(prefix: str = "calibatt-comfy-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


def remove_base_dir(base: Path):
    shutil.rmtree(base, ignore_errors=True)
