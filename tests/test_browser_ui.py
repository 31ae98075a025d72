"""The example workflows and the nodes' help pages in ComfyUI's real web UI, in Debian's headless chromium.

One headless ComfyUI (COMFYUI_PATH, served with the frontend package its requirements pin) and one chromium driven
through chromedriver (tests/webdriver.py; offline: no host but 127.0.0.1 resolves). As a user would:
- every workflows/*.json is opened through the UI's file input (what File > Open and dropping a file both feed),
  with the model files it names present (empty placeholders; nothing is sampled) and the bundles it names real;
  checked: no node type is missing, no error dialog or error panel appears, no JavaScript error is logged, every
  node shows the title the workflow or ComfyUI gives it, and saving the graph gives back every widget value the
  file holds (nothing shifted, dropped or reset) with every choice widget's value among its choices;
- each of our nodes is clicked and its help opened from the selection toolbox (Node Info): the help panel shows
  that node's page from web/docs/;
- Load Mask Bundle -> Mask Bundle Preview -> Preview Image is run from the Run button on a calibrated bundle, and
  the preview images appear on the node.
Screenshots of each workflow, each help panel and the preview go to $CALIBATT_SCREENSHOTS/<ComfyUI version>/ (a
temporary folder when unset); `make screenshots` refreshes the README's (docs/screenshots/).

Skips with the reason where chromium / chromedriver or the ComfyUI trees are absent.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path

import pytest
import torch

import comfyui_harness as H
from comfyui_harness import COMFY
from webdriver import Browser, find_browser

CHROMIUM, CHROMEDRIVER, NO_BROWSER = find_browser()
pytestmark = [*H.NEEDS_COMFYUI, pytest.mark.skipif(bool(NO_BROWSER), reason=f"browser test {NO_BROWSER}")]

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
OUR_NODES = ("CalibrateSparseAttention", "LoadMaskBundle", "PatchModelAttention", "MaskBundlePreview")

# Where the stock loaders look for the files a workflow names (a widget value ending in .safetensors / .gguf).
LOADER_FOLDERS = {"UNETLoader": "diffusion_models", "CLIPLoader": "text_encoders", "VAELoader": "vae",
                  "CheckpointLoaderSimple": "checkpoints", "CLIPVisionLoader": "clip_vision",
                  "LoraLoaderModelOnly": "loras", "LoadMaskBundle": "sparse_attention"}
MODEL_FILE = re.compile(r"\.(safetensors|gguf|pt|pth|ckpt)$")

# A returning user's settings: the first-run template gallery closed, the minimap off (it covers the graph in the
# screenshots), node contents drawn at every zoom (the newer frontend draws plain boxes below a font size; the
# whole workflow on one screen is below it). Nothing here changes how a workflow loads.
USER_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
                 "LiteGraph.Canvas.MinFontSizeForLOD": 0}

APP_READY = ("return !!(window.app && window.app.graph && window.LiteGraph && document.querySelector('#comfy-file-input')"
             " && window.app.extensionManager && window.app.extensionManager.command)")


def _comfy_version() -> str:
    text = (Path(COMFY) / "comfyui_version.py").read_text()
    return re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text).group(1)


def _shot_dir() -> Path:
    root = os.environ.get("CALIBATT_SCREENSHOTS")
    root = Path(root) if root else Path(tempfile.gettempdir()) / "calibatt-screenshots"
    d = root / f"comfyui-{_comfy_version()}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def preview_bundle():
    """A bundle calibrated by the engine on planted attention (3D windows, temporal stripes, global columns; the
    windows sharpen as sigma falls), so its preview has the structure a real one has: Wan 2.1 style signature, 4
    layers x 4 heads, 4 x 8 x 8 tokens in blocks of 16, 8 steps, 3 prompts."""
    from calibatt.calibration import Calibrator, CalibrationSettings
    from synthetic import planted_layer
    from calibatt.kernels.call import AttentionCall
    from calibatt.masks import ModelSignature, TokenGrid

    grid = TokenGrid(frames=4, height=8, width=8)
    sig = ModelSignature("wan21", 4, 4, 16, 64, {"in_channels": 16, "model_type": "t2v"})
    kinds = [["local", "stripes", "global", "local"], ["stripes", "local", "local", "global"],
             ["global", "global", "stripes", "local"], ["local", "local", "local", "stripes"]]
    sigmas = torch.linspace(1.0, 0.1, 8).tolist()
    st = CalibrationSettings(preset="balanced", rho=0.5, repetition=False, block_q=16,
                             block_k=16, steps=len(sigmas), stats_row_stride=1)
    cal = Calibrator(sig, grid, st, background=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread on a busy 2-core machine makes this 20x slower
    try:
        for p in range(3):
            cal.begin_prompt(sample_sigmas=sigmas + [0.0], key=f"p{p}")
            for s in sigmas:
                for layer in range(4):
                    q, k, v = planted_layer(grid, kinds[layer], 16, prompt=p, layer=layer, sigma=s)
                    cal.observe(AttentionCall(q, k, v, "bhld", 4, layer, s, grid, scale=1.0))
            cal.end_prompt()
        return cal.finish()
    finally:
        cal.close()
        torch.set_num_threads(threads)


def _workflow_files(wf: dict) -> list[tuple[str, str]]:
    """(models/ subfolder, file name) of every model file the workflow names."""
    out = []
    for node in wf["nodes"]:
        for value in node.get("widgets_values") or []:
            if isinstance(value, str) and MODEL_FILE.search(value):
                folder = LOADER_FOLDERS.get(node["type"])
                assert folder, (f"node type {node['type']} names the file {value!r}: add its models/ folder to "
                                f"LOADER_FOLDERS in {Path(__file__).name}")
                out.append((folder, value))
    return out


@pytest.fixture(scope="module")
def ui():
    from calibatt.masks import save_bundle

    base = H.make_base_dir("calibatt-browser-")
    H.ComfyServer.prepare_base(base)
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps(USER_SETTINGS))
    bundle = preview_bundle()
    for wf_path in WORKFLOWS:
        for folder, name in _workflow_files(json.loads(wf_path.read_text())):
            target = base / "models" / folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if folder == "sparse_attention":
                save_bundle(bundle, target)
            else:
                target.touch()  # listed by the loader; never loaded (nothing is sampled)
    save_bundle(bundle, base / "models" / "sparse_attention" / "preview_demo.safetensors")
    server = H.ComfyServer(COMFY, base)
    server.start()
    # 1920 x 1200: a common screen, wide enough that the workflows fit at a zoom where node contents are drawn
    browser = Browser(CHROMIUM, CHROMEDRIVER, port=H.free_port(), width=1920, height=1200,
                      log_path=base / "chromedriver.log")
    try:
        browser.start()
        _load_page(browser, server.url)
        yield server, browser, _shot_dir()
    finally:
        browser.stop()
        server.stop()
        H.remove_base_dir(base)


# ---- UI helpers ---------------------------------------------------------------------------------------------------
def _load_page(browser: Browser, url: str):
    browser.get(url)
    browser.wait_for(APP_READY, timeout=180, what="ComfyUI's web UI to load")
    time.sleep(1.0)
    browser.console()  # drop what the frontend logs about itself while starting; each test reads its own


def _open_file(browser: Browser, path: Path, node_count: int):
    browser.send_file(browser.find("#comfy-file-input"), path)
    browser.wait_for("return window.app.graph._nodes.length === arguments[0] && "
                     "window.app.graph._nodes.every(n => n.size && n.size[0] > 0)", node_count, timeout=60,
                     what=f"{path.name} to appear on the canvas")
    time.sleep(1.0)  # dialogs and the error panel open right after the graph is configured


def _fit_view(browser: Browser):
    """The whole graph on screen, as large as it fits between the UI's bars (the frontends' own Fit View leaves wide
    margins in one version and not the other, so the screenshots would differ by version for no reason)."""
    browser.js("""
        const c = window.app.canvas, g = window.app.graph, r = c.canvas.getBoundingClientRect();
        c.deselectAll && c.deselectAll();
        const title = window.LiteGraph.NODE_TITLE_HEIGHT || 30;
        const xs = g._nodes.flatMap(n => [n.pos[0], n.pos[0] + n.size[0]]);
        const ys = g._nodes.flatMap(n => [n.pos[1] - title, n.pos[1] + n.size[1]]);
        const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
        const left = 90, top = 120, right = 50, bottom = 80;  // the sidebar, tab and menu bars, the zoom controls
        const scale = Math.min(1.0, (r.width - left - right) / (x1 - x0), (r.height - top - bottom) / (y1 - y0));
        c.ds.scale = scale;
        c.ds.offset = [left / scale - x0, top / scale - y0];
        c.setDirty(true, true);""")
    time.sleep(0.8)


def _error_texts(browser: Browser) -> list:
    """Visible dialogs, toasts and error panels that speak of missing or failing things."""
    return browser.js("""
        const sel = '.p-dialog, [role=dialog], [role=alertdialog], .p-toast-message, .comfy-modal';
        const seen = Array.from(document.querySelectorAll(sel)).filter(e => e.offsetParent !== null)
            .map(e => e.innerText.trim()).filter(t => t);
        // The newer frontend lists problems in a floating panel ("N ERRORS", "Missing Models (4)") too.
        const panels = Array.from(document.querySelectorAll('div')).filter(e => e.offsetParent !== null
            && /^\\d+ ERRORS?\\b/.test((e.innerText || '').trim()) && e.children.length < 12)
            .map(e => e.innerText.trim());
        return seen.concat(panels).filter(t => /missing|error|failed|not found|invalid/i.test(t));
    """)


def _graph_state(browser: Browser) -> dict:
    """What the UI made of the loaded graph: node types it does not know, titles, the widget values it would save,
    and choice widgets whose value is not among their choices."""
    return browser.js("""
        const g = window.app.graph, reg = window.LiteGraph.registered_node_types;
        const saved = g.serialize();
        return {
          missing: g._nodes.filter(n => !reg[n.type] || n.has_errors).map(n => n.type),
          titles: Object.fromEntries(g._nodes.map(n => [n.id, n.title])),
          values: Object.fromEntries(saved.nodes.map(n => [n.id, n.widgets_values || []])),
          bad_choices: g._nodes.flatMap(n => (n.widgets || []).filter(w => w.type === 'combo'
              && Array.isArray(w.options?.values) && !w.options.values.includes(w.value))
              .map(w => `${n.type}.${w.name} = ${w.value}`)),
        };""")


def _js_errors(browser: Browser) -> list:
    """Console errors from scripts (not the 404s of absent optional user files, which are network entries)."""
    return [e["message"] for e in browser.console()
            if e.get("level") == "SEVERE" and e.get("source") in ("javascript", "console-api")]


def _click_node_title(browser: Browser, node_id: int):
    """A real mouse click on the node's title bar (at its position on the canvas), which selects it."""
    x, y = browser.js("""
        const n = window.app.graph.getNodeById(arguments[0]); const c = window.app.canvas;
        const r = c.canvas.getBoundingClientRect();
        const [x, y] = c.ds.convertOffsetToCanvas([n.pos[0] + Math.min(60, n.size[0] / 2), n.pos[1] - 12]);
        const dpr = window.devicePixelRatio || 1;
        return [Math.round(r.left + x / dpr), Math.round(r.top + y / dpr)];
    """, node_id)
    browser._call("POST", "/actions", {"actions": [{
        "type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"},
        "actions": [{"type": "pointerMove", "x": x, "y": y, "origin": "viewport"},
                    {"type": "pointerDown", "button": 0}, {"type": "pointerUp", "button": 0}]}]})
    browser._call("DELETE", "/actions")
    browser.wait_for("return !!window.app.canvas.selected_nodes[arguments[0]]", node_id, timeout=10,
                     what=f"node {node_id} to be selected by the click")


def _open_help(browser: Browser, node_id: int) -> str:
    """Select the node, press Node Info in the selection toolbox; the help panel's text."""
    _click_node_title(browser, node_id)
    button = browser.wait_for("return document.querySelector('[data-testid=info-button]')", timeout=10,
                              what="the selection toolbox's Node Info button")
    browser.click(next(iter(button.values())))
    return browser.wait_for("""const e = document.querySelector('.node-help-content');
                               return e && e.innerText.trim().length > 20 ? e.innerText : null""",
                            timeout=20, what="the node help panel")


def _close_side_panels(browser: Browser):
    """Back to a clear canvas: the newer frontend opens help in a right side panel that stays open (a setting, so
    across page loads too); the older one in the node library tab, which a page load closes."""
    browser.js("""const s = window.app.extensionManager.setting;
                  if (s.get('Comfy.RightSidePanel.IsOpen') === true) s.set('Comfy.RightSidePanel.IsOpen', false);
                  window.app.canvas.deselectAll && window.app.canvas.deselectAll();""")
    time.sleep(0.5)


def _doc_heading_and_sentence(node_id: str) -> tuple[str, str]:
    text = (REPO / "web" / "docs" / f"{node_id}.md").read_text()
    heading = re.search(r"^# (.+)$", text, re.M).group(1).strip()
    body = text.split("\n\n", 1)[1]
    words = re.sub(r"[`*_]", "", body).split()[:6]  # the opening words, as rendered (markdown marks gone)
    return heading, " ".join(words)


def _expected_titles(wf: dict, info: dict) -> dict:
    out = {}
    for n in wf["nodes"]:
        title = n.get("title") or (info.get(n["type"]) or {}).get("display_name")
        if title:
            out[n["id"]] = title
    return out


# ---- tests --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("wf_path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_opens_in_the_ui(ui, wf_path):
    server, browser, shots = ui
    wf = json.loads(wf_path.read_text())
    browser.console()
    _open_file(browser, wf_path, len(wf["nodes"]))

    state = _graph_state(browser)
    assert state["missing"] == [], f"{wf_path.name}: missing node types in the UI: {state['missing']}"
    assert _error_texts(browser) == [], f"{wf_path.name}: the UI reports: {_error_texts(browser)}"
    assert _js_errors(browser) == [], f"{wf_path.name}: JavaScript errors while loading"
    info = server.object_info()
    want_titles = _expected_titles(wf, info)
    got_titles = {int(k): v for k, v in state["titles"].items()}
    assert {k: got_titles.get(k) for k in want_titles} == want_titles
    for n in wf["nodes"]:
        assert state["values"][str(n["id"])] == n["widgets_values"], \
            f"{wf_path.name}: {n['type']} (node {n['id']}) widget values changed on load"
    assert state["bad_choices"] == [], f"{wf_path.name}: choice widgets with values not offered"
    _fit_view(browser)
    browser.screenshot(shots / f"{wf_path.stem}.png")


@pytest.mark.parametrize("node_id", OUR_NODES)
def test_node_help_opens_from_the_canvas(ui, node_id):
    _, browser, shots = ui
    heading, opening = _doc_heading_and_sentence(node_id)
    browser.js("""window.app.graph.clear();
                  const n = window.LiteGraph.createNode(arguments[0]); n.pos = [120, 160];
                  window.app.graph.add(n); window.app.canvas.setDirty(true, true);""", node_id)
    # at 100 %, in the middle of the canvas: clear of the side panels a previous help may have left open
    browser.js("""const c = window.app.canvas, r = c.canvas.getBoundingClientRect(), n = window.app.graph._nodes[0];
                  c.ds.scale = 1.0; c.ds.offset = [r.width * 0.4 - n.pos[0], r.height * 0.35 - n.pos[1]];
                  c.setDirty(true, true);""")
    time.sleep(0.5)
    node = browser.js("return window.app.graph._nodes[0].id")
    text = _open_help(browser, node)
    flat = " ".join(text.split())
    assert heading in flat and opening in flat, f"help panel for {node_id} shows: {flat[:300]}"
    browser.screenshot(shots / f"help_{node_id}.png")
    _close_side_panels(browser)


def test_mask_bundle_preview_runs_from_the_run_button(ui):
    server, browser, shots = ui
    _load_page(browser, server.url)  # a fresh page, no side panel left open by the help tests
    _close_side_panels(browser)
    browser.js("""
        const g = window.app.graph; g.clear();
        const load = window.LiteGraph.createNode('LoadMaskBundle'); load.pos = [40, 120]; g.add(load);
        const prev = window.LiteGraph.createNode('MaskBundlePreview'); prev.pos = [420, 120]; g.add(prev);
        const show = window.LiteGraph.createNode('PreviewImage'); show.pos = [800, 120]; show.size = [760, 440];
        g.add(show);
        load.widgets.find(w => w.name === 'bundle_name').value = 'preview_demo.safetensors';
        load.connect(0, prev, 0); prev.connect(0, show, 0);
        window.app.canvas.setDirty(true, true);""")
    run = browser.js("""return Array.from(document.querySelectorAll('button'))
                          .find(b => b.offsetParent !== null && b.innerText.trim() === 'Run')""")
    assert run, "no Run button in the UI"
    browser.click(next(iter(run.values())))
    images = browser.wait_for("""const n = window.app.graph._nodes.find(n => n.type === 'PreviewImage');
                                 return n && n.imgs && n.imgs.length && n.imgs.every(i => i.complete && i.naturalWidth)
                                   ? n.imgs.map(i => [i.naturalWidth, i.naturalHeight]) : null""",
                              timeout=180, what="the preview images on the Preview Image node")
    assert len(images) == 2 and all(w >= 64 and h >= 64 for w, h in images), images
    assert _error_texts(browser) == [] and _js_errors(browser) == []
    _fit_view(browser)
    browser.screenshot(shots / "mask_bundle_preview.png")


def test_the_checks_see_a_broken_workflow(ui, tmp_path):
    """The same checks on a workflow with a node type no one registered and a bundle that is not there: the UI
    flags the node as missing and says so, and the bundle choice is not among the choices."""
    server, browser, _ = ui
    wf = json.loads((REPO / "workflows" / "wan21_t2v_sparse.json").read_text())
    for n in wf["nodes"]:
        if n["type"] == "ModelSamplingSD3":
            n["type"] = n["properties"]["Node name for S&R"] = "CalibAttNoSuchNode"
        if n["type"] == "LoadMaskBundle":
            n["widgets_values"] = ["not_in_the_folder.safetensors"]
    broken = tmp_path / "broken_workflow.json"
    broken.write_text(json.dumps(wf))
    _open_file(browser, broken, len(wf["nodes"]))
    state = _graph_state(browser)
    assert "CalibAttNoSuchNode" in state["missing"]
    assert any("CalibAttNoSuchNode" in t or "missing" in t.lower() for t in _error_texts(browser))
    assert "LoadMaskBundle.bundle_name = not_in_the_folder.safetensors" in state["bad_choices"]
    _load_page(browser, server.url)  # leave no dialog behind for the next test
