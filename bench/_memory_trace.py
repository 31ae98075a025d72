"""What is alive on the GPU at a run's peak, from PyTorch's allocator history (bench/model_step.py --memory-trace).

`record()` turns the caching allocator's history on (torch.cuda.memory._record_memory_history, Python stacks);
`peak_live(snapshot)` replays the snapshot's trace of one device (alloc / free events in order), finds the moment
the live bytes peak, and returns what was alive then, grouped by where it was allocated (the innermost frames in
files that are not torch's own), largest first. Comparing a patched case's list with the dense case's names the
tensor behind a difference in peak memory. Pure Python over the snapshot's dicts: tests/test_memory_trace.py runs it
on a hand-made trace on the CPU.
"""

from __future__ import annotations

_FREE = ("free_completed",)
_SKIP_FILES = ("/torch/", "/triton/", "<frozen", "/contextlib.py", "/functools.py")


def record(max_entries: int = 500_000) -> None:
    import torch
    torch.cuda.memory._record_memory_history(max_entries=max_entries, stacks="python")


def stop_and_snapshot() -> dict:
    import torch
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    return snap


def _where(frames, depth: int) -> str:
    keep = [f for f in frames or [] if not any(s in f.get("filename", "") for s in _SKIP_FILES)]
    return " <- ".join(f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']} {f['name']}" for f in keep[:depth]) \
        or "(no Python frame outside torch)"


def peak_live(snapshot: dict, device: int = 0, top: int = 15, depth: int = 3) -> dict:
    """{'peak_bytes', 'events', 'peak_event', 'live': [{'bytes', 'count', 'where'}, ...] (largest first)} for the
    live bytes the trace itself accounts for (blocks allocated before recording began are not in it)."""
    trace = snapshot.get("device_traces", [])
    events = trace[device] if device < len(trace) else []
    live, cur, peak, peak_at = {}, 0, 0, -1
    for i, e in enumerate(events):
        act = e.get("action")
        if act == "alloc":
            live[e["addr"]] = e
            cur += e["size"]
            if cur > peak:
                peak, peak_at = cur, i
        elif act in _FREE and e["addr"] in live:
            cur -= live.pop(e["addr"])["size"]
    # replay again up to the peak to list what was alive there
    live = {}
    for e in events[:peak_at + 1]:
        if e.get("action") == "alloc":
            live[e["addr"]] = e
        elif e.get("action") in _FREE:
            live.pop(e["addr"], None)
    groups = {}
    for e in live.values():
        key = _where(e.get("frames"), depth)
        g = groups.setdefault(key, {"bytes": 0, "count": 0, "where": key})
        g["bytes"] += e["size"]
        g["count"] += 1
    ranked = sorted(groups.values(), key=lambda g: -g["bytes"])
    return {"peak_bytes": peak, "events": len(events), "peak_event": peak_at, "live": ranked[:top]}
