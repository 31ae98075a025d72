"""Every error and warning message the package can give, read from the code: writes docs/ERRORS.md.

    python scripts/error_catalog.py          # rewrite docs/ERRORS.md
    python scripts/error_catalog.py --check  # exit 1 if docs/ERRORS.md is stale (tests/test_error_catalog.py)

Each `raise SomeError("...")`, each call of the modules' raising helpers (`_fail`, `fail`), each
`warnings.warn(...)`, `log.warning(...)` and `_warn_once(...)` becomes one entry: the message as written, with
`{...}` where the code fills in a value, under the module that gives it and that module's "what to do" note
(MODULE_NOTES). A raise whose message the reader cannot see (a variable, a re-raise of another error's text) must
be named in PASS_THROUGH with the reason, so nothing is left out silently; tests/test_error_catalog.py fails when
the file is stale, when a module with messages has no note, and when the README's Troubleshooting quotes a message
that is not in the code.
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "ERRORS.md"
PACKAGE_DIRS = ("nodes", "masks", "calibration", "kernels", "adapters", "tinywan", "demo", "hub", "parallel")
ROOT_MODULES = ("__init__.py",)

# Functions that raise or warn with a message their callers pass: each call is listed with the helper's own
# message template, its parameters replaced by the call's arguments (defaults read from the definition).
RAISING_HELPERS = ("_fail", "fail", "_warn_once")
# Raises whose message is not text in the code, and why they need no entry of their own.
PASS_THROUGH = {
    ("calibration/calibrator.py", "IndexError"): "sequence protocol of a lazy list (ends iteration); never shown",
    ("hub/fetch.py", "err"): "the HubError that classify() built from the client's exception; listed there",
    ("kernels/support.py", "KernelUnsupported"): "the reason triton_unsupported() returned; its messages are "
                                                 "the f-strings there",
}

# What each module's messages are about and what a user does about them, in the order the file lists modules.
MODULE_NOTES = {
    "nodes/paths.py": "Where bundles live. Put bundles in `ComfyUI/models/sparse_attention/` (or a "
                      "`sparse_attention:` path in `extra_model_paths.yaml`).",
    "nodes/calibrate_inputs.py": "Calibrate Sparse Attention's inputs: fix the widget or connection the message names.",
    "nodes/calibrate_run.py": "Calibrate Sparse Attention while it samples: the message names the input to change.",
    "nodes/actions.py": "Patch Model Attention: the model cannot be patched with this bundle; it runs unpatched "
                        "(dense) or the node stops, as the message says.",
    "nodes/comfy_glue.py": "Sampling with a patched model: calls the bundle does not describe run dense, with this "
                           "warning once.",
    "nodes/routing.py": "Sampling with a patched model: calls the bundle does not describe run dense, with this "
                        "warning once per run.",
    "nodes/model_info.py": "The model connected to the nodes: a family or variant the nodes do not support, or a "
                           "latent that does not fit it.",
    "hub/reference.py": "A hub reference that cannot be used: write it as hf://owner/repo/path/file.safetensors"
                        "[@revision][#sha256=<hex>] or an https:// link (docs/HUB.md).",
    "hub/fetch.py": "Getting a bundle from the hub: the message says what failed (network, access, size, checksum, "
                    "disk) and what to do; nothing half-downloaded is kept (docs/HUB.md).",
    "hub/catalog.py": "A catalog file or entry that is wrong: fix the file the message names, or use the bundle by "
                      "reference (docs/HUB.md).",
    "hub/card.py": "Writing a bundle card: the message names the bundle field or file to fix (docs/HUB.md).",
    "hub/cli.py": "The hub command line (`python -m hub`): the message names the argument to fix.",
    "nodes/hub_source.py": "Load Mask Bundle's hub reference or catalog entry: the message says what to change.",
    "masks/bundle_file.py": "Loading a bundle file: it is damaged, not a mask bundle, or from a newer version of "
                            "this package. Recalibrate it (or update the package); the message names the file and "
                            "the field.",
    "masks/bundle.py": "A bundle used with a model or video it was not made for: calibrate a bundle for this model, "
                       "resolution and length (the message names what differs).",
    "masks/geometry.py": "Model signature or token grid values that cannot be right (a damaged bundle, or a bug in a "
                         "host adapter).",
    "masks/bundle_schema.py": "A bundle file whose metadata breaks the format (a damaged or hand-edited file): the "
                              "message names the file and the field. Recalibrate, or fetch the bundle again.",
    "masks/bundle_limits.py": "A bundle larger than any real one (or a crafted file): refused before it is decoded; "
                              "the message names the limit. Calibrate at a supported size.",
    "kernels/call.py": "An attention call whose tensors do not fit together (a host adapter's bug): the message "
                       "names the shapes.",
    "kernels/ops.py": "The compiled-model path (TorchCompileModel): the message names what the op was handed.",
    "masks/signatures.py": "A model whose shape facts do not make a signature (a bug in a host adapter, or a model "
                           "the package does not know): the message names the value.",
    "kernels/tables/__init__.py": "Skip-list tables of one sigma bucket on the device: a caller's bug or a damaged "
                                "bundle; the message names the layer or value.",
    "kernels/tables/triton_build.py": "The Triton table builder was handed tensors it does not take (a caller's bug); "
                                "the runner falls back to the PyTorch builder when it cannot compile.",
    "masks/skiplists.py": "Skip lists that do not fit their grid (a damaged bundle or a caller's bug).",
    "masks/sigmas.py": "The bundle's sigma schedule is damaged: recalibrate.",
    "masks/atomic.py": "Writing a file atomically failed (disk full, permissions): free space or fix the folder's "
                       "permissions.",
    "calibration/settings.py": "Calibration settings out of range: the message names the setting and its range.",
    "calibration/calibrator.py": "Calibrator use out of order or on calls it was not made for (library users): "
                                 "follow begin_prompt -> observe ... -> end_prompt -> finish.",
    "calibration/hybrid.py": "The calibrated + online hybrid (a reference for the fidelity benchmark, library users): "
                             "build it from the statistics and the bundle of the same calibration run.",
    "calibration/stats.py": "Resuming a calibration from a statistics file that does not match: start a new file.",
    "kernels/layouts.py": "Attention tensors in a layout the engine does not know, or of mismatched shapes (host "
                          "adapter bug or an unsupported model).",
    "kernels/attention/naive.py": "The reference attention got tensors that do not fit the skip lists.",
    "kernels/block_energy/__init__.py": "Block-energy statistics got tensors that do not fit.",
    "kernels/block_energy/naive.py": "Block-energy statistics got tensors that do not fit.",
    "kernels/support.py": "A call the Triton kernels do not take (`KernelUnsupported`: device, dtype, head size): "
                          "the runner and the statistics run the plain-PyTorch or dense path instead, with a "
                          "warning where a compile or launch failed.",
    "kernels/triton_common.py": "`KernelUnsupported`: mask blocks the Triton tiles cannot divide; the runner falls "
                                "back as above.",
    "kernels/attention/triton_fwd.py": "The Triton attention kernel: a `ValueError` means the call itself is "
                                       "malformed (host adapter bug).",
    "kernels/block_energy/triton_fwd.py": "The Triton statistics kernel: a `ValueError` means the call itself is "
                                          "malformed.",
    "kernels/text_bias.py": "A text padding mask of a shape the engine does not take.",
    "kernels/runner.py": "The sparse runner: a failing Triton launch falls back to dense attention with this "
                         "warning; the other messages name a bundle / call mismatch.",
    "kernels/dense.py": "Dense fallback got tensors it cannot take.",
    "adapters/diffusers_wan.py": "diffusers adapter (library use): the message names the model, bundle or call "
                                 "that does not fit.",
    "tinywan/model.py": "The embedded tiny model's weights file is missing or damaged: restore tinywan/weights/ "
                        "from the repository (git checkout tinywan/weights).",
    "tinywan/text.py": "A prompt for the tiny model uses a word outside its small vocabulary.",
    "tinywan/data.py": "A prompt for the tiny model is not in its grammar (the message lists the words).",
    "tinywan/evaluate.py": "Demo / benchmark helper called with an unknown mode.",
    "demo/run_demo.py": "`make demo` / demo/run_demo.py options: fix the option the message names.",
    "parallel/heads.py": "Sequence parallelism (docs/PARALLEL.md): a Ulysses head split the message says cannot work "
                         "(more ranks than heads, bad costs); change the degrees as it says.",
    "parallel/ring.py": "Ring attention (docs/PARALLEL.md): the sequence or shard does not fit the ring; pad the "
                        "sequence or change the degree.",
    "parallel/usp.py": "Sparse attention inside yunchang / xDiT USP (docs/PARALLEL.md): the module or the process "
                       "groups are not set up as the message says.",
    "parallel/calibration.py": "Calibrating under sequence parallelism (docs/PARALLEL.md): ring degree, or ranks that "
                               "saw different prompts.",
}


def _modules() -> list[pathlib.Path]:
    files = [ROOT / m for m in ROOT_MODULES]
    for d in PACKAGE_DIRS:
        files += sorted((ROOT / d).rglob("*.py"))
    return [f for f in files if f.is_file() and "__pycache__" not in f.parts]


def _text(node) -> str | None:
    """The message as written: literal text, `{expr}` for what the code fills in; None if not text. For
    `a if cond else b`, the first form (the one with the fix)."""
    if isinstance(node, ast.IfExp):
        return _text(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        out = []
        for part in node.values:
            if isinstance(part, ast.Constant):
                out.append(str(part.value))
            else:
                out.append("{" + ast.unparse(part.value) + "}")
        return "".join(out)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        a, b = _text(node.left), _text(node.right)
        if a is None and b is None:
            return None
        return (a if a is not None else "{" + ast.unparse(node.left) + "}") + \
            (b if b is not None else "{" + ast.unparse(node.right) + "}")
    if isinstance(node, ast.IfExp):  # e.g. f"{msg}; {fix}" if fix else msg
        return _text(node.body)
    return None


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _callee(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _is_warning(call: ast.Call) -> bool:
    return (isinstance(call.func, ast.Attribute) and call.func.attr in ("warn", "warning")
            and ast.unparse(call.func.value) in ("warnings", "log", "logger", "logging"))


def _warning_text(call: ast.Call) -> str | None:
    """log.warning("%s: %s", a, b) -> "{a}: {b}"; warnings.warn(msg)."""
    if not call.args:
        return None
    fmt = _text(call.args[0])
    if fmt is None:
        return None
    for arg in call.args[1:]:
        fmt = fmt.replace("%s", "{" + ast.unparse(arg) + "}", 1).replace("%r", "{" + ast.unparse(arg) + "!r}", 1)
    return fmt


def _raise_text(call: ast.Call) -> str | None:
    """The message of `raise E(msg, field=...)`: "[field] msg" when a field is given (BundleError's form). The
    message is the first positional argument that is text: exceptions that take a code first (HubError(kind, msg),
    OSError(errno, msg)) give it second."""
    text = next((t for t in map(_text, call.args) if t is not None), None)
    if text is None:
        return None
    field = _kw(call, "field")
    if field is not None:
        f = _text(field)
        text = f"[{f if f is not None else '{' + ast.unparse(field) + '}'}] {text}"
    return text


class Entry:
    def __init__(self, module: str, where: str, kind: str, message: str):
        self.module, self.where, self.kind, self.message = module, where, kind, " ".join(message.split())


class _Helper:
    """A raising helper's message template and parameters."""

    def __init__(self, fn: ast.FunctionDef, consts: dict):
        self.params = [a.arg for a in fn.args.args]
        defaults = fn.args.defaults
        self.defaults = {}
        for name, d in zip(self.params[len(self.params) - len(defaults):], defaults):
            self.defaults[name] = consts.get(d.id) if isinstance(d, ast.Name) else _text(d)
        self.kind, self.template = None, None
        for node in ast.walk(fn):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                self.kind, self.template = _callee(node.exc), _raise_text(node.exc)
            elif isinstance(node, ast.Call) and _is_warning(node):
                self.kind, self.template = "warning", _warning_text(node)

    def message(self, call: ast.Call) -> str | None:
        if self.template is None:
            return None
        params = [p for p in self.params if p != "self"]
        bound = dict(self.defaults)
        for name, arg in zip(params, call.args):
            bound[name] = arg
        for k in call.keywords:
            bound[k.arg] = k.value
        text = self.template
        for name, value in bound.items():
            if isinstance(value, ast.AST):
                t = _text(value)
                value = t if t is not None else "{" + ast.unparse(value) + "}"
            text = text.replace("{" + name + "}", value if value is not None else "")
        return text


def collect() -> tuple[list[Entry], list[str]]:
    """(entries, problems): problems are raises whose message cannot be read and that PASS_THROUGH does not
    explain."""
    entries, problems = [], []
    for path in _modules():
        rel = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text(), filename=rel)
        consts = {t.id: _text(n.value) if _text(n.value) is not None else str(n.value.value)
                  for n in tree.body if isinstance(n, ast.Assign)
                  for t in n.targets if isinstance(t, ast.Name) and (
                      _text(n.value) is not None or (isinstance(n.value, ast.Constant)
                                                     and isinstance(n.value.value, int)))}

        for node in tree.body:  # string constants imported from a sibling module (`from .x import FIX`)
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                sibling = path.parent / (node.module.replace(".", "/") + ".py")
                if sibling.is_file():
                    theirs = {t.id: _text(n.value) for n in ast.parse(sibling.read_text()).body
                              if isinstance(n, ast.Assign) for t in n.targets
                              if isinstance(t, ast.Name) and _text(n.value) is not None}
                    consts.update({a.asname or a.name: theirs[a.name] for a in node.names if a.name in theirs})

        def add(where, kind, text):
            for name, value in consts.items():  # module constants read as the user sees them
                text = text.replace("{" + name + "}", value)
            entries.append(Entry(rel, where, kind, text))
        helpers = {n.name: _Helper(n, consts) for n in ast.walk(tree)
                   if isinstance(n, ast.FunctionDef) and n.name in RAISING_HELPERS}
        # Error factories: functions that `return SomeError(...)` for their callers to raise (the hub's). Their
        # messages are listed where they are built; `raise factory(...)` adds nothing of its own.
        factories = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                     and any(isinstance(r, ast.Return) and isinstance(r.value, ast.Call)
                             and _callee(r.value).endswith("Error") for r in ast.walk(n))}

        def visit(node, scope):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if node.name in helpers:
                    return  # its template is listed at each call
                scope = f"{scope}.{node.name}" if scope else node.name
            if isinstance(node, ast.Raise) and node.exc is not None:
                exc = node.exc
                call = exc if isinstance(exc, ast.Call) else None
                name = _callee(call) if call else ast.unparse(exc)
                text = _raise_text(call) if call is not None and name not in factories else None
                if text is not None:
                    add(scope or "(module)", name, text)
                elif call is not None and name in factories:
                    pass  # listed where the factory builds the error
                elif (rel, name) not in PASS_THROUGH:
                    problems.append(f"{rel}:{node.lineno}: raise {ast.unparse(exc)[:80]} has no readable "
                                    f"message; give it one, or name it in PASS_THROUGH with the reason")
            elif (isinstance(node, ast.Return) and isinstance(node.value, ast.Call)
                  and _callee(node.value).endswith("Error")):
                text = _raise_text(node.value)
                if text is not None:
                    add(scope or "(module)", _callee(node.value), text)
            elif isinstance(node, ast.Call):
                callee = _callee(node)
                if callee in helpers:
                    text = helpers[callee].message(node)
                    if text is not None:
                        add(scope or "(module)", helpers[callee].kind, text)
                elif _is_warning(node):
                    text = _warning_text(node)
                    if text is not None:
                        add(scope or "(module)", "warning", text)
            for child in ast.iter_child_nodes(node):
                visit(child, scope)

        visit(tree, "")
    return entries, problems


def render(entries: list[Entry]) -> str:
    lines = [
        "# Every error and warning message",
        "",
        "Generated from the code by `python scripts/error_catalog.py` (tests/test_error_catalog.py fails when this",
        "file is stale). `{...}` stands for what the code fills in. Errors stop the node or call that raised them;",
        "warnings are logged and the run goes on. Bundle errors (`BundleError`) start with the file and the field,",
        "`<file>: [field] message`. The README's Troubleshooting section explains the common ones.",
        "",
    ]
    by_module: dict[str, list[Entry]] = {}
    for e in entries:
        by_module.setdefault(e.module, []).append(e)
    order = [m for m in MODULE_NOTES if m in by_module] + sorted(m for m in by_module if m not in MODULE_NOTES)
    for m in order:
        lines += [f"## `{m}`", "", MODULE_NOTES.get(m, "(no note: add one to MODULE_NOTES)"), "",
                  "| kind | where | message |", "|---|---|---|"]
        seen = set()
        for e in by_module[m]:
            key = (e.kind, e.where, e.message)
            if key in seen:
                continue
            seen.add(key)
            msg = e.message.replace("|", "\\|")
            lines.append(f"| {e.kind} | `{e.where}` | {msg} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/ERRORS.md is stale")
    a = ap.parse_args(argv)
    entries, problems = collect()
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    text = render(entries)
    if a.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print("docs/ERRORS.md is stale: run python scripts/error_catalog.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)} ({len(entries)} messages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
