"""The README's library quickstart runs as written: the test executes the README's own code block."""

import re
from pathlib import Path

import pytest

pytest.importorskip("diffusers", reason="the library quickstart runs the tiny diffusers Wan model; install "
                                        "diffusers==0.42.1 (make setup) to run it")

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _quickstart_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Library quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Library quickstart section should hold exactly one python block"
    return blocks[0]


def test_readme_library_quickstart_runs(tmp_path, monkeypatch, capsys):
    from calibatt.masks import load_bundle

    monkeypatch.chdir(tmp_path)  # the example writes my_bundle.safetensors into the working folder
    scope = {"__name__": "__readme__"}
    exec(compile(_quickstart_block(), "README.md (Library quickstart)", "exec"), scope)
    bundle = load_bundle(tmp_path / "my_bundle.safetensors")
    assert bundle.signature.family == "wan21" and len(bundle.step_densities()) == 6
    assert 0.0 < bundle.density < 1.0
    video = scope["video"]
    assert tuple(video.shape) == (1, 3, 4, 32, 32) and float(video.abs().max()) <= 1.0
    out = capsys.readouterr().out
    assert "wan21" in out and "torch.Size([1, 3, 4, 32, 32])" in out
