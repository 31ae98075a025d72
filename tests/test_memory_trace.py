"""bench/_memory_trace.py's replay on a hand-made allocator trace (the dict torch.cuda.memory._snapshot() returns):
the peak is found where the live bytes are largest, and what was alive then is grouped by its innermost frames
outside torch, largest first."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import _memory_trace as MT  # noqa: E402


def _frames(*names):
    return [{"filename": "/x/site-packages/torch/nn/functional.py", "line": 1, "name": "linear"}] + [
        {"filename": f"/repo/{n.split(':')[0]}", "line": int(n.split(":")[1]), "name": n.split(":")[2]}
        for n in names]


def test_peak_live_lists_what_is_alive_at_the_peak():
    ev = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": _frames("model.py:10:block")},
        {"action": "alloc", "addr": 2, "size": 300, "frames": _frames("routing.py:5:route", "model.py:20:attn")},
        {"action": "free_requested", "addr": 1, "size": 100},  # not yet free: the stream still uses it
        {"action": "alloc", "addr": 3, "size": 50, "frames": _frames("model.py:10:block")},
        {"action": "free_completed", "addr": 1, "size": 100},
        {"action": "free_completed", "addr": 2, "size": 300},
        {"action": "alloc", "addr": 4, "size": 200, "frames": _frames("model.py:30:mlp")},
    ]
    out = MT.peak_live({"device_traces": [ev]}, device=0, depth=2)
    assert out["peak_bytes"] == 450 and out["peak_event"] == 3 and out["events"] == 7
    assert [(g["bytes"], g["count"]) for g in out["live"]] == [(300, 1), (150, 2)]
    assert out["live"][0]["where"] == "routing.py:5 route <- model.py:20 attn"  # torch's own frame left out
    assert out["live"][1]["where"] == "model.py:10 block"


def test_peak_live_of_an_empty_trace():
    out = MT.peak_live({"device_traces": []})
    assert out == {"peak_bytes": 0, "events": 0, "peak_event": -1, "live": []}
