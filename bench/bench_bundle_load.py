"""What loading a crafted bundle file costs: wall time and peak memory of load_bundle, each file in a fresh process.

Files (tests/bundle_fuzz.py builds them): the issue's decode-amplification files (16,384 x 16,384 blocks, every
mask XOR-identical to its parent; 0.3, 1.1 and 8.4 MB), then the most a file of a given size can make the loader
decode under the budget (bundle_limits: max(64 MiB, 16 x the payload)): distinct 4,096 x 4,096-block masks one
block apart (about 2 KB each in the file, 2 MiB decoded), padded with uncompressed random masks to reach the file
size.

Usage: python bench/bench_bundle_load.py [--sizes 0.1,8,100] [--out results.json]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from _pkg import git_commit  # noqa: E402

_CHILD = r"""
import sys, time, json
sys.path.insert(0, {tests!r})
import bundle_fuzz  # loads the package
from calibatt.masks import load_bundle, BundleError

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
open("/proc/self/clear_refs", "w").write("5")
base = rss("VmRSS")
t0 = time.perf_counter()
try:
    b = load_bundle({path!r})
    result = "loaded %d masks, %.0f MiB decoded" % (b.num_unique_masks, b.packed_masks.numel() / 2**20)
except BundleError as e:
    result = "refused [%s]" % e.field
print(json.dumps({{"seconds": time.perf_counter() - t0, "peak_mb": rss("VmHWM") - base, "result": result}}))
"""


def measure(path: Path) -> dict:
    code = _CHILD.format(tests=str(ROOT / "tests"), path=str(path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if out.returncode:
        return {"seconds": None, "peak_mb": None, "result": "child failed: " + out.stderr[-300:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="0.1,8,100", help="file sizes in MB for the worst-case files")
    ap.add_argument("--out")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    import bundle_fuzz as fz
    from calibatt.masks import bundle_limits as lim

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = [(f"issue: 16,384 blocks, XOR-identical, {mb} MB",
                  lambda mb=mb: fz.amplification_file_of_size(16384, int(mb * 1e6))) for mb in (0.3, 1.1, 8.4)]
        for mb in (float(x) for x in a.sizes.split(",")):
            size = lim.mask_bytes(4096, 4096)
            stored = max(0, int(mb * 1e6) - (64 << 10)) // size
            # the payload is at least the stored masks: the budget they buy, less one mask of margin
            decodable = lim.decode_budget(stored * size) // size - 1
            cases.append((f"worst case within the budget, {mb:g} MB file",
                          lambda s=stored, d=decodable: fz.amplification_file(4096, max(2, d - s), identical=False,
                                                                              stored_random=s)))
        for name, build in cases:
            t0 = time.perf_counter()
            data = build()
            built = time.perf_counter() - t0
            p = Path(tmp) / "case.safetensors"
            p.write_bytes(data)
            r = measure(p)
            r.update(case=name, file_mb=round(len(data) / 1e6, 2), build_s=round(built, 1))
            rows.append(r)
            print(f"{name}: {r['file_mb']} MB file -> {r['result']} in "
                  f"{r['seconds'] if r['seconds'] is None else round(r['seconds'], 2)} s, peak +{r['peak_mb']} MB",
                  flush=True)
    report = {"commit": git_commit(), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
