"""Load Mask Bundle by hub reference, against a real headless ComfyUI (COMFYUI_PATH; docs/COMFYUI.md).

The ComfyUI server runs with HF_ENDPOINT pointed at tests/hub_server.py (the Hub's resolve protocol on 127.0.0.1,
plain HTTP), so its own huggingface_hub downloads from there. Checked: a workflow with hub_reference set downloads
the bundle into models/sparse_attention/hub/, patches and samples, with progress messages on the node; a catalog
entry is listed and loads; the failures users meet come back as the node's error; the interrupt button stops a
download and leaves nothing; the V1 node API does the same; and, last, a fresh ComfyUI with the server stopped
runs the same workflow from the downloaded file, bit-identically.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

import comfyui_harness as H
from comfyui_families import kind_bundle, read_latent, run_logged
from comfyui_harness import COMFY
from hub_server import Fault, HubServer

pytestmark = H.NEEDS_COMFYUI

from calibatt.hub.catalog import add_entry, entry_for  # noqa: E402
from calibatt.masks import ModelSignature, TokenGrid, save_bundle, signatures  # noqa: E402

MB = 1 << 20
REPO = "calibatt-test/tiny-bundles"
W, HGT, LEN, BLOCK, STEPS = 128, 64, 9, 16, 3  # latent [1, 16, 3, 8, 16] -> 3 x 4 x 8 tokens
GRID = TokenGrid(frames=3, height=4, width=8)
SIGNATURE = signatures.wan(num_layers=2, num_heads=2, head_dim=128, in_channels=16, out_channels=16, patch=(1, 2, 2),
                           image_embedding=False)


_FIRST = {}


def _bytes(bundle, tmp: Path, name: str) -> bytes:
    save_bundle(bundle, tmp / name)
    return (tmp / name).read_bytes()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub-bundles")
    banded = _bytes(kind_bundle(SIGNATURE, GRID, "band", BLOCK), tmp, "banded.safetensors")
    return {
        "banded.safetensors": banded,
        "catalog_banded.safetensors": banded,
        "v1_banded.safetensors": banded,
        "pinned_wrong.safetensors": banded,
        "wrong_grid.safetensors": _bytes(kind_bundle(SIGNATURE, TokenGrid(3, 4, 4), "band", BLOCK), tmp, "g"),
        "three_layers.safetensors": _bytes(kind_bundle(ModelSignature("wan21", 3, 2, 128, 256, SIGNATURE.extra),
                                                       GRID, "band", BLOCK), tmp, "l"),
        "junk.safetensors": os.urandom(21 * MB),
    }


@pytest.fixture(scope="module")
def hub(files):
    server = HubServer().start()
    server.commit = server.add_repo(REPO, files)
    big = os.urandom(40 * MB)
    server.add_repo("calibatt-test/big", {"big.safetensors": big})
    server.big_sha = hashlib.sha256(big).hexdigest()
    server.faults[server.big_sha] = Fault(rate=4 * MB)  # 10 s for the whole file
    server.faults[hashlib.sha256(files["junk.safetensors"]).hexdigest()] = Fault(rate=8 * MB)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def comfy(hub):
    from safetensors.torch import save_file

    base = H.make_base_dir()
    H.ComfyServer.prepare_base(base)
    save_file(H.tiny_wan_state_dict(), str(base / "models/diffusion_models/tiny_wan.safetensors"))
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(base / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    server = H.ComfyServer(COMFY, base, env_extra=env)
    server.start()
    yield server
    server.stop()
    H.remove_base_dir(base)


def _ref(hub, files, name, pin=True) -> str:
    sha = hashlib.sha256(files[name]).hexdigest()
    return f"hf://{REPO}/{name}@{hub.commit}#sha256={sha}" if pin else f"hf://{REPO}/{name}"


def _graph(load_inputs: dict, prefix: str, sample=True, patched_only=False) -> dict:
    p = {
        **H.tiny_wan_graph(W, HGT, LEN),
        "load": {"class_type": "LoadMaskBundle", "inputs": dict(load_inputs)},
        "patch": {"class_type": "PatchModelAttention", "inputs": {
            "model": ["unet", 0], "bundle": ["load", 0], "dense_first_percent": 0.0, "dense_last_percent": 0.0,
            "quality": 0.0}},
    }
    for model, name in ((["patch", 0], "sparse"), (["unet", 0], "dense")):
        if name == "dense" and patched_only:
            continue
        p[f"ks_{name}"] = {"class_type": "KSampler", "inputs": {
            "model": model, "seed": 3, "steps": STEPS, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["cond", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}}
        p[f"save_{name}"] = {"class_type": "SaveLatent", "inputs": {"samples": [f"ks_{name}", 0],
                                                                    "filename_prefix": f"latents/{prefix}_{name}"}}
    if not sample:
        p = {"load": p["load"], "show": {"class_type": "MaskBundlePreview", "inputs": {"bundle": ["load", 0]}},
             "save": {"class_type": "SaveImage", "inputs": {"images": ["show", 0], "filename_prefix": prefix}}}
    return p


def _error(entry) -> str:
    err = H.status_error(entry)
    assert err is not None, "the prompt was expected to fail"
    return err


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


class _Socket:
    """ComfyUI's websocket for one client id, collected on a thread (aiohttp comes with ComfyUI)."""

    def __init__(self, server):
        import asyncio

        import aiohttp

        self.client_id = uuid.uuid4().hex
        self.messages = []
        self._stop = threading.Event()
        ready = threading.Event()

        async def listen():
            async with aiohttp.ClientSession() as s:
                async with s.ws_connect(f"ws://127.0.0.1:{server.port}/ws?clientId={self.client_id}") as ws:
                    ready.set()
                    while not self._stop.is_set():
                        try:
                            msg = await ws.receive(timeout=0.2)
                        except asyncio.TimeoutError:
                            continue
                        if msg.type == aiohttp.WSMsgType.TEXT:
                            self.messages.append(json.loads(msg.data))
                        elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                            return

        self._thread = threading.Thread(target=lambda: asyncio.run(listen()), daemon=True)
        self._thread.start()
        assert ready.wait(30), "websocket did not connect"

    def close(self):
        self._stop.set()
        self._thread.join(10)


def test_hub_reference_downloads_patches_and_samples(comfy, hub, files):
    name = "banded.safetensors"
    ref = _ref(hub, files, name)
    # bundle_name names the file the reference will create; it is not in the list yet, which the node accepts
    # when hub_reference is set (a shared workflow on a machine that has never seen the bundle).
    entry, log = run_logged(comfy, _graph({"bundle_name": f"hub/{REPO}/{name}", "hub_reference": ref}, "first"))
    path = comfy.base / "models/sparse_attention/hub" / REPO / name
    assert path.read_bytes() == files[name]
    assert f"Load Mask Bundle: {ref} downloaded to {path}" in log
    sparse, dense = read_latent(comfy, entry, "save_sparse"), read_latent(comfy, entry, "save_dense")
    assert 1e-5 < _rel(sparse, dense) < 0.5, _rel(sparse, dense)
    assert [h.host.split(":")[0] for h in hub.requests(contains=f"/{name}")] == ["127.0.0.1"]  # one HEAD
    # The file now appears in the list under the name the workflow used.
    options = comfy.get_json("/object_info/LoadMaskBundle")["LoadMaskBundle"]["input"]["required"]["bundle_name"]
    names = options[1].get("options") if options[0] == "COMBO" else options[0]
    assert f"hub/{REPO}/{name}" in names
    _FIRST["sparse"] = sparse  # compared with the offline run at the end of the module


def test_download_progress_reaches_the_node(comfy, hub, files):
    """A 21 MB file (not a bundle) served at 8 MB/s: the node's progress bar moves in huggingface_hub's 10 MB
    blocks, then the file fails validation with the loader's reason and is deleted."""
    sock = _Socket(comfy)
    try:
        prompt = _graph({"bundle_name": "x", "hub_reference": _ref(hub, files, "junk.safetensors")}, "junk",
                        sample=False)
        r = comfy.requests.post(comfy.url + "/prompt", json={"prompt": prompt, "client_id": sock.client_id},
                                timeout=60)
        assert r.status_code == 200, r.text
        entry = comfy.wait(r.json()["prompt_id"], timeout=300)
    finally:
        sock.close()
    err = _error(entry)
    assert "HubError" in err and "not a valid mask bundle" in err and "deleted" in err, err
    progress = [(m["data"]["value"], m["data"]["max"]) for m in sock.messages
                if m.get("type") == "progress" and m["data"].get("node") == "load"]
    size = 21 * MB
    assert progress and progress[-1] == (size, size), progress
    assert any(0 < v < size for v, _ in progress), progress  # at least one step before the end
    assert not (comfy.base / "models/sparse_attention/hub" / REPO / "junk.safetensors").exists()


def test_catalog_entry_is_listed_and_loads(comfy, hub, files):
    name = "catalog_banded.safetensors"
    folder = comfy.base / "models/sparse_attention"
    bundle = kind_bundle(SIGNATURE, GRID, "band", BLOCK)
    sha = hashlib.sha256(files[name]).hexdigest()
    add_entry(folder / "catalog.json", entry_for(bundle, f"hf://{REPO}/{name}@{hub.commit}", sha, len(files[name])))
    label = f"catalog/wan21/{REPO}/{name}"
    options = comfy.get_json("/object_info/LoadMaskBundle")["LoadMaskBundle"]["input"]["required"]["bundle_name"]
    names = options[1].get("options") if options[0] == "COMBO" else options[0]
    assert label in names
    entry, log = run_logged(comfy, _graph({"bundle_name": label}, "catalog", patched_only=True))
    assert (folder / "hub" / REPO / name).read_bytes() == files[name]
    assert f"#sha256={sha} downloaded to" in log


@pytest.mark.parametrize("load, words", [
    ({"bundle_name": "x", "hub_reference": f"hf://{REPO}/missing.safetensors"},
     ["HubError", "file 'missing.safetensors' does not exist", "(404)"]),
    ({"bundle_name": "x", "hub_reference": f"hf://{REPO}/pinned_wrong.safetensors#sha256={'0' * 64}"},
     ["HubError", "checksum mismatch"]),
    ({"bundle_name": "x", "hub_reference": "hf://calibatt-test/private-or-missing/b.safetensors"},
     ["HubError", "(401)", "hf auth login"]),
    ({"bundle_name": "x", "hub_reference": f"hf://{REPO}/three_layers.safetensors"},
     ["BundleError", "bundle was calibrated for 3 layers; this model has 2"]),
    ({"bundle_name": "x", "hub_reference": f"hf://{REPO}/wrong_grid.safetensors"},
     ["BundleError", "bundle was calibrated for a 4x4-token frame; this video has 4x8 (resolution differs)"]),
])
def test_failures_reach_the_user(comfy, hub, load, words):
    err = _error(comfy.run(_graph(load, "fail", patched_only=True)))
    for w in words:
        assert w in err, err


def test_a_bad_reference_is_refused_when_queued(comfy):
    with pytest.raises(RuntimeError) as info:
        comfy.queue(_graph({"bundle_name": "x", "hub_reference": f"hf://{REPO}/../../evil.safetensors"}, "bad",
                           patched_only=True))
    assert "(400)" in str(info.value) and "'..'" in str(info.value)
    with pytest.raises(RuntimeError) as info:  # no reference and a name that is nowhere
        comfy.queue(_graph({"bundle_name": "nowhere.safetensors", "hub_reference": ""}, "bad", patched_only=True))
    assert "mask bundle 'nowhere.safetensors' is not in models/sparse_attention/" in str(info.value)


def test_interrupt_stops_the_download_and_leaves_nothing(comfy, hub):
    pid = comfy.queue(_graph({"bundle_name": "x", "hub_reference": "hf://calibatt-test/big/big.safetensors"},
                             "big", sample=False))
    deadline = time.time() + 120
    while time.time() < deadline and not hub.requests("GET", hub.big_sha):
        time.sleep(0.1)
    assert hub.requests("GET", hub.big_sha), "the download did not start"
    time.sleep(0.5)
    comfy.requests.post(comfy.url + "/interrupt", timeout=30)
    entry = comfy.wait(pid, timeout=300)
    kinds = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds, kinds
    time.sleep(1.0)
    assert hub.requests("GET", hub.big_sha)[-1].sent < 40 * MB  # stopped well before the end of the file
    folder = comfy.base / "models/sparse_attention/hub/calibatt-test/big"
    leftovers = [p.name for p in folder.rglob("*") if p.is_file() and not p.name.endswith((".lock", ".gitignore",
                                                                                            "CACHEDIR.TAG"))]
    assert leftovers == [], leftovers


def test_v1_node_api_downloads_too(comfy, hub, files):
    base = H.make_base_dir()
    try:
        from safetensors.torch import save_file

        H.ComfyServer.prepare_base(base)
        save_file(H.tiny_wan_state_dict(), str(base / "models/diffusion_models/tiny_wan.safetensors"))
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(base / "hf-home"), "CALIBATT_NODE_API": "v1"}
        with H.ComfyServer(COMFY, base, env_extra=env) as v1:
            name = "v1_banded.safetensors"
            entry = v1.run(_graph({"bundle_name": "x", "hub_reference": _ref(hub, files, name)}, "v1",
                                  patched_only=True))
            assert H.status_error(entry) is None, H.status_error(entry)
            assert (base / "models/sparse_attention/hub" / REPO / name).read_bytes() == files[name]
            err = _error(v1.run(_graph({"bundle_name": "x", "hub_reference": f"hf://{REPO}/gone.safetensors"},
                                       "v1_fail", patched_only=True)))
            assert "does not exist" in err
    finally:
        H.remove_base_dir(base)


def test_same_workflow_in_a_fresh_comfyui_with_the_server_stopped(comfy, hub, files):
    """Runs last: stops the hub server and restarts ComfyUI (empty node cache), then runs the first workflow again,
    plus the same bundle by an unpinned reference (huggingface_hub's own fallback to the file it placed)."""
    hub.stop()
    comfy.stop()
    comfy.start()
    name = "banded.safetensors"
    prompt = _graph({"bundle_name": f"hub/{REPO}/{name}", "hub_reference": _ref(hub, files, name)}, "offline")
    prompt["load_unpinned"] = {"class_type": "LoadMaskBundle", "inputs": {
        "bundle_name": "x", "hub_reference": _ref(hub, files, name, pin=False)}}
    prompt["preview_unpinned"] = {"class_type": "MaskBundlePreview", "inputs": {"bundle": ["load_unpinned", 0]}}
    prompt["save_unpinned"] = {"class_type": "SaveImage", "inputs": {"images": ["preview_unpinned", 0],
                                                                     "filename_prefix": "unpinned"}}
    entry, log = run_logged(comfy, prompt)
    assert f"found in {comfy.base / 'models/sparse_attention/hub' / REPO / name}" in log
    assert torch.equal(read_latent(comfy, entry, "save_sparse"), _FIRST["sparse"])
