"""Where the bench scripts find FastVideo's STA window file (sta_mask_strategy_hunyuan.json), and how they read it.

One search order for every script, so a file put in one place serves them all: an explicit path first, else
.benchdata/ in the checkout (the gzipped copy bench/prepare_bench_carry.sh makes for a GPU machine), else
shared/data beside the checkout, inside it, or beside the folder that holds it. Each may hold the file plain or
gzipped.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_NAME = "sta_mask_strategy_hunyuan.json"


def data_folders():
    return (ROOT / ".benchdata", ROOT.parent / "shared/data", ROOT / "shared/data", ROOT.parents[1] / "shared/data")


def find_sta_data(arg=None):
    """The STA window file: `arg` when given (not checked: the caller reports a missing file), else the first of
    data_folders() that holds it, plain or gzipped; None when none does (the callers then draw synthetic windows
    or stop with their own message)."""
    if arg:
        return Path(arg)
    for folder in data_folders():
        for name in (DATA_NAME, DATA_NAME + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def load_sta_strategy(path):
    """The window table {"step_layer_head": [t, h, w]} of `path` (plain or gzipped JSON); None for None."""
    if path is None:
        return None
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return json.loads(raw)
