"""GPU memory and time of the attention of Wan 14B 720p denoising steps through SparseRunner: per-call skip-list
tables (kernels/tables/__init__.py) against the previous scheme (every layer's table built when a bucket begins, the
last two buckets kept, mixed layers' full-head copies kept), with cuDNN dense beside them.

Shape: batch 2 (CFG), 40 heads x 128, 75,600 tokens (21 x 45 x 80 latent), 40 layers, 128-token blocks, bf16, (B, L,
H*D) calls as ComfyUI makes them, q/k/v shared by the layers (the masks differ). Masks: real per-head window sizes
(FastVideo's Sliding Tile Attention windows for HunyuanVideo 720p, found as bench/_data.py says; not Wan's, not
CalibAtt's) mapped to Wan 720p as bench/bench_bundle_size.py does, "[5, 6, 10]" (the full grid) as dense, plus a
share of dense heads per layer (--dense-heads) so most layers are mixed, as calibrated bundles have. Without the
data file the same window vocabulary is drawn at random (labelled "synthetic" in the output).

Protocol, per scheme and repeat (alternating): a step in a dense bucket (every layer routed dense, so only
--dense-layers calls run: enough for the memory, the time is cuDNN's), then a step in each of two sparse buckets
(every layer). CUDA events around each step; peak memory by torch.cuda.max_memory_allocated over the steps minus
the allocation before them (q, k, v only); "over dense" subtracts the same peak for cuDNN dense calls (its output
and workspace), which leaves what the patch adds. Also: the tensors each scheme holds after a step, the host time
of begin_step at a bucket change, the per-layer table build time, and whether both schemes give bit-identical
outputs (same tables, same kernel).

GPU:  PYTHONUNBUFFERED=1 python3 bench/memory_step.py [--data PATH] [--repeats 2]
CPU check of this script (Triton's interpreter, tiny shape, no timing worth reading):
      python3 bench/memory_step.py --tiny
Prints one JSON to stdout; also writes memory_step.json into an output folder when the OUT environment variable
names one.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections import OrderedDict
from pathlib import Path

if "--tiny" in sys.argv:  # the Triton kernels run under the interpreter on the CPU
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1] / "scripts"))
sys.path.insert(0, str(HERE.parent))
from _pkg import git_commit, load_package  # noqa: E402

load_package()
from _data import find_sta_data, load_sta_strategy  # noqa: E402
from bench_bundle_size import TILES, block_boxes, window_mask  # noqa: E402
from calibatt.kernels import tables as BT  # noqa: E402
from calibatt.kernels.call import AttentionCall  # noqa: E402
from calibatt.kernels.dense import dense_attention  # noqa: E402
from calibatt.kernels.runner import DENSE_CUTOFF, SparseRunner  # noqa: E402
from calibatt.masks import BlockGeometry, MaskBundle, ModelSignature, TokenGrid  # noqa: E402
from calibatt.masks.packing import pack_bits, unpack_bits  # noqa: E402
from calibatt.masks.skiplists import LayerSkipList, SkipLists  # noqa: E402
from calibatt.masks.transfer import to_device_async  # noqa: E402

WEIGHT_BYTES = 14e9 * 2  # Wan 14B in bf16
BOUND_BYTES = 0.02 * WEIGHT_BYTES
# STA's window vocabulary from step 15 on, with its frequencies there (dense windows excluded): the synthetic
# fallback when the data file is absent.
SYNTH_WINDOWS = [((5, 3, 3), 20380), ((1, 6, 10), 15916), ((3, 3, 5), 7396), ((5, 1, 10), 5244), ((5, 6, 1), 1464)]


# ---------------------------------------------------------------------------------------------------------------
# the bundle
# ---------------------------------------------------------------------------------------------------------------
def build_bundle(grid, L, H, block, sta_steps, dense_share, data_path, seed, head_dim=128):
    """Bucket 0: STA step 0 (all windows dense); buckets 1.. : the given STA steps, plus round(dense_share * H)
    random dense heads per layer. Layer l takes STA layer l (mod 60), head h STA head h mod 24."""
    g = BlockGeometry(grid.video_tokens, block, block)
    boxes = block_boxes(g, grid, block)
    diag = g.diagonal()
    gen = torch.Generator().manual_seed(seed)
    strategy = load_sta_strategy(data_path)
    cache, packed, ids = {}, [], {}
    steps = [0] + list(sta_steps)
    entry = torch.empty(len(steps), L, H, dtype=torch.int32)

    def mask_id(win):
        if win not in cache:
            m = torch.ones(g.nq, g.nk, dtype=torch.bool) if win == TILES else window_mask(boxes, win, grid) | diag
            bits = pack_bits(m)
            key = bits.numpy().tobytes()
            if key not in ids:
                ids[key] = len(packed)
                packed.append(bits)
            cache[win] = ids[key]
        return cache[win]

    weights = torch.tensor([w for _, w in SYNTH_WINDOWS], dtype=torch.float)
    for b, s in enumerate(steps):
        for l in range(L):
            n_dense = 0 if b == 0 else int(round(dense_share * H))
            dense = set(torch.randperm(H, generator=gen)[:n_dense].tolist())
            for h in range(H):
                if b == 0 or h in dense:
                    win = TILES
                elif strategy is not None:
                    win = tuple(strategy[f"{s}_{l % 60}_{h % 24}"])
                else:
                    win = SYNTH_WINDOWS[int(torch.multinomial(weights, 1, generator=gen))][0]
                entry[b, l, h] = mask_id(win)
    sigmas = torch.linspace(1.0, 0.1, len(steps)).tolist()
    return MaskBundle(signature=ModelSignature("wan21", L, H, head_dim, head_dim * H), grid=grid, geometry=g,
                      calibrated_sigmas=sigmas, step_bucket=list(range(len(steps))),
                      packed_masks=torch.stack(packed), entry_mask=entry,
                      entry_rep=torch.full((len(steps), L, H), -1, dtype=torch.int32),
                      rep_anchors=torch.zeros(0, 4, dtype=torch.long),
                      rep_row_anchor=torch.zeros(0, grid.frame_tokens, dtype=torch.long),
                      settings={"source": "STA HunyuanVideo windows mapped to Wan 720p" if strategy else "synthetic"})


# ---------------------------------------------------------------------------------------------------------------
# the previous scheme, reproduced (as of commit 5442e76) for the comparison
# ---------------------------------------------------------------------------------------------------------------
def previous_mask_to_table(mask, width):
    counts = mask.sum(-1, dtype=torch.int32)
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[..., :width]
    take = torch.minimum(torch.arange(width, device=mask.device).expand(*counts.shape, width),
                         torch.clamp(counts.long() - 1, min=0)[..., None])
    dtype = torch.int16 if mask.shape[-1] <= 32767 else torch.int32
    return order.gather(-1, take).to(dtype), counts


def previous_skip_lists(bundle, bucket, device):
    """MaskBundle.skip_lists as it was: the whole bucket unpacked on the device in chunks of 2^24 elements, a
    stable argsort per chunk, every layer's table at its longest row."""
    g = bundle.geometry
    ids = bundle.entry_mask[bucket].long()
    widths = bundle.max_counts()[ids].amax(-1).tolist()
    H, L = bundle.num_heads, bundle.num_layers
    per = max(1, (1 << 24) // max(1, H * g.nq * g.nk))
    layers = []
    for l0 in range(0, L, per):
        l1 = min(L, l0 + per)
        bits = to_device_async(bundle.packed_masks[ids[l0:l1].reshape(-1)], device)
        mask = unpack_bits(bits, g.nk).view(l1 - l0, H, g.nq, g.nk)
        table, counts = previous_mask_to_table(mask, int(max(widths[l0:l1])))
        for i in range(l1 - l0):
            layers.append(LayerSkipList(g, table[i], counts[i], None))
    return SkipLists(g, layers, None)


class PreviousRunner:
    """SparseRunner's table handling before per-call tables: the bucket's skip lists from the bundle's cache of the
    last two buckets, a mixed layer's full-head table (with_full_heads) made on first use and kept for the bucket.
    Routing and the kernel launch are the library's (the Triton path only: this bench runs bf16 on CUDA)."""

    def __init__(self, bundle, cutoff=DENSE_CUTOFF):
        self.bundle = bundle
        self.cutoff = cutoff
        self.dens = bundle.entry_densities()
        self.cache = OrderedDict()
        self.key = None

    def begin_step(self, sigma, device):
        bucket = self.bundle.bucket_for_sigma(sigma)
        key = (bucket, str(device))
        if key != self.key:
            hit = self.cache.get(key)
            if hit is None:
                hit = self.cache[key] = previous_skip_lists(self.bundle, bucket, device)
                while len(self.cache) > 2:
                    self.cache.popitem(last=False)
            self.cache.move_to_end(key)
            self.skip = hit
            above = self.dens[bucket] > self.cutoff
            self.routes = ["dense" if bool(r.all()) else "mixed" if bool(r.any()) else "sparse" for r in above]
            self.flags = {l: to_device_async(above[l], device) for l, r in enumerate(self.routes) if r == "mixed"}
            self.full = {}
            self.key = key
        return bucket

    def __call__(self, call):
        from calibatt.kernels.attention.triton_fwd import sparse_attention_triton
        q, k, v = call.bhld()
        kind = self.routes[call.layer]
        if kind == "dense":
            return call.to_host_layout(dense_attention(q, k, v, scale=call.scale))
        layer = self.skip.layer(call.layer)
        if kind == "mixed":
            full = self.full.get(call.layer)
            if full is None:
                full = self.full[call.layer] = layer.with_full_heads(self.flags[call.layer])
            layer = full
        return call.to_host_layout(sparse_attention_triton(q, k, v, layer, scale=call.scale))

    def held_bytes(self):
        seen = {}
        for sl in self.cache.values():
            for lay in sl.layers:
                for t in (lay.kv_indices, lay.kv_counts):
                    seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        for lay in self.full.values():
            for t in (lay.kv_indices, lay.kv_counts):
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        for t in self.flags.values():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(seen.values())

    def end(self):
        self.cache.clear()
        self.full, self.flags, self.key, self.skip = {}, {}, None, None


# ---------------------------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------------------------
class Clock:
    """CUDA events on a GPU (GPU time, host running ahead), perf_counter on the CPU."""

    def __init__(self, cuda):
        self.cuda = cuda

    def start(self):
        if self.cuda:
            self.e0 = torch.cuda.Event(enable_timing=True)
            self.e0.record()
        else:
            self.t0 = time.perf_counter()

    def stop_ms(self):
        if self.cuda:
            e1 = torch.cuda.Event(enable_timing=True)
            e1.record()
            e1.synchronize()
            return self.e0.elapsed_time(e1)
        return (time.perf_counter() - self.t0) * 1e3


def settle(cuda):
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def alloc(cuda):
    return torch.cuda.memory_allocated() if cuda else 0


def run_steps(runner, calls, plan, cuda, clock):
    """plan: [(sigma, layers to run)]. Returns per-step rows and the peak allocation over them minus the start."""
    settle(cuda)
    base = alloc(cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rows = []
    for sigma, layers in plan:
        clock.start()
        t0 = time.perf_counter()
        bucket = runner.begin_step(sigma, calls[0].q.device)
        host_begin = (time.perf_counter() - t0) * 1e3
        for l in layers:
            runner(calls[l])  # the output is dropped at once, as the model's projection would consume it
        ms = clock.stop_ms()
        held_alloc = alloc(cuda) - base
        rows.append({"bucket": bucket, "sigma": sigma, "layers_run": len(layers), "ms": round(ms, 3),
                     "ms_per_layer": round(ms / max(1, len(layers)), 3), "begin_step_host_ms": round(host_begin, 3),
                     "held_alloc_bytes": held_alloc, "held_tensor_bytes": runner.held_bytes()})
    peak = (torch.cuda.max_memory_allocated() - base) if cuda else None
    return rows, peak


def time_builder(tables, layers, cuda, clock, rounds):
    """Per-layer table build alone (alternating layers, so every call builds)."""
    seq = [l for l in layers] * rounds
    if len(set(seq)) < 2:
        return None
    clock.start()
    for l in seq:
        tables.layer(l, full=tables._full_any[l])
    return round(clock.stop_ms() * 1e3 / len(seq), 2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU check of the script at a tiny shape (interpreter)")
    ap.add_argument("--data", default=None, help="sta_mask_strategy_hunyuan.json (default: ../shared/data, "
                    "shared/data or .benchdata in the checkout; else synthetic windows)")
    ap.add_argument("--sta-steps", default="20,40", help="STA steps of the two sparse buckets")
    ap.add_argument("--dense-heads", type=float, default=0.1, help="share of dense heads per layer (sparse buckets)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dense-layers", type=int, default=3, help="cuDNN dense calls timed, and calls run in the "
                    "all-dense bucket")
    ap.add_argument("--budget-s", type=float, default=150.0, help="skip further repeats past this wall time")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    t_start = time.time()
    cuda = not a.tiny
    if a.tiny:
        import numpy as np
        import triton.runtime.interpreter as interp
        orig = interp._patch_lang_tensor

        def patch(tensor, scope):  # Triton 3.6 interpreter + numpy 2: scalar loads are 1-element arrays
            orig(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))
        interp._patch_lang_tensor = patch
        # The interpreter stands in for the GPU: the runner's Triton path and the Triton builder run on the CPU.
        SparseRunner._triton_ok = staticmethod(lambda q: q.dtype in (torch.float16, torch.bfloat16))
        BT.RESIDENT_BYTES = 0  # streamed, as at 720p
        grid, L, H, D, B, block, dtype, dev = TokenGrid(3, 4, 10), 3, 4, 16, 2, 16, torch.float16, "cpu"
        a.dense_layers, a.repeats, a.dense_heads = 1, 1, 0.25  # one dense head of four: mixed layers
    else:
        grid, L, H, D, B, block, dtype, dev = TokenGrid(21, 45, 80), 40, 40, 128, 2, 128, torch.bfloat16, "cuda"
    clock = Clock(cuda)
    data = find_sta_data(a.data)
    sta_steps = [int(x) for x in a.sta_steps.split(",")]
    bundle = build_bundle(grid, L, H, block, sta_steps, a.dense_heads, data, a.seed, head_dim=D)
    g = bundle.geometry
    dens = bundle.entry_densities()
    above = dens > DENSE_CUTOFF
    routes = [["dense" if bool(r.all()) else "mixed" if bool(r.any()) else "sparse" for r in above[b]]
              for b in range(bundle.num_buckets)]
    N = grid.video_tokens
    gen = torch.Generator(device=dev).manual_seed(a.seed + 1)
    q, k, v = (torch.randn(B, N, H * D, generator=gen, device=dev, dtype=torch.float32).to(dtype) for _ in range(3))
    sig = bundle.calibrated_sigmas
    calls = [AttentionCall(q, k, v, "bld", H, l, sig[0], grid) for l in range(L)]
    everything = list(range(L))
    plan = [(sig[0], list(range(min(a.dense_layers, L))))] + [(sig[b], everything)
                                                              for b in range(1, bundle.num_buckets)]
    res = {"meta": {"device": torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter, --tiny)",
                    "torch": torch.__version__, "commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M"),
                    "argv": sys.argv[1:], "shape": {"batch": B, "heads": H, "head_dim": D, "tokens": N,
                                                    "grid": [grid.frames, grid.height, grid.width], "layers": L,
                                                    "block": block, "nq": g.nq, "nk": g.nk, "dtype": str(dtype)},
                    "structure": bundle.settings["source"] + (f" ({data})" if data else ""),
                    "sta_steps": sta_steps, "dense_head_share": a.dense_heads,
                    "weights_bytes": WEIGHT_BYTES, "bound_bytes": BOUND_BYTES},
           "bundle": [{"bucket": b, "density": round(float(dens[b].mean()), 4),
                       "routes": {r: routes[b].count(r) for r in ("dense", "mixed", "sparse")},
                       "widest_row": max(bundle.layer_widths(b))} for b in range(bundle.num_buckets)],
           "schemes": {}, "dense": {}, "checks": {}}

    # On the CPU (--tiny) the Triton builder runs under the interpreter, as on the GPU.
    schemes = {"previous": lambda: PreviousRunner(bundle),
               "per_call": lambda: SparseRunner(bundle, table_builder="triton" if a.tiny else None)}
    # Warm-up: compile every kernel variant (sparse and mixed layers, the builder) and cuDNN, outside the timing.
    warm_layers = sorted({routes[1].index(r) for r in ("mixed", "sparse") if r in routes[1]})
    outs = {}
    for name, make in schemes.items():
        r = make()
        r.begin_step(sig[1], q.device)
        outs[name] = [r(calls[l]) for l in warm_layers]
        r.end()
    dense_attention(*calls[0].bhld())
    res["checks"]["outputs_identical"] = all(torch.equal(x, y) for x, y in zip(outs["previous"], outs["per_call"]))
    res["checks"]["max_abs_diff"] = max(float((x.float() - y.float()).abs().max())
                                        for x, y in zip(outs["previous"], outs["per_call"]))
    del outs
    settle(cuda)

    # cuDNN dense: the baseline peak (output + workspace) and time per layer.
    def dense_step():
        settle(cuda)
        base = alloc(cuda)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        clock.start()
        for l in range(min(a.dense_layers, L)):
            qh, kh, vh = calls[l].bhld()
            calls[l].to_host_layout(dense_attention(qh, kh, vh))
        ms = clock.stop_ms()
        return ms / min(a.dense_layers, L), (torch.cuda.max_memory_allocated() - base) if cuda else None

    fallbacks = set()  # Triton paths that failed and ran their fallback (must stay empty)
    for rep in range(a.repeats):
        if rep and time.time() - t_start > a.budget_s:
            res["checks"]["skipped_repeats_from"] = rep
            break
        for name, make in schemes.items():
            runner = make()
            rows, peak = run_steps(runner, calls, plan, cuda, clock)
            fallbacks.update(str(k) for k in getattr(runner, "triton_failures", []))
            row = res["schemes"].setdefault(name, {"repeats": []})
            row["repeats"].append({"steps": rows, "peak_bytes": peak})
            if name == "per_call" and rep == 0:
                runner.begin_step(sig[-1], q.device)
                sparse_layers = [l for l in range(L) if routes[-1][l] != "dense"]
                res["checks"]["builder_us_per_layer"] = time_builder(runner._tables, sparse_layers, cuda, clock, 3)
                res["checks"]["per_call_mode"] = runner._tables.mode
            runner.end()
            del runner
            settle(cuda)
        ms, peak = dense_step()
        res["dense"].setdefault("repeats", []).append({"ms_per_layer": round(ms, 3), "peak_bytes": peak})

    dense_ms = min(r["ms_per_layer"] for r in res["dense"]["repeats"])
    dense_peak = max((r["peak_bytes"] or 0) for r in res["dense"]["repeats"]) if cuda else None
    res["dense"]["ms_per_layer_best"] = dense_ms
    res["dense"]["step_ms_estimate"] = round(dense_ms * L, 1)
    res["dense"]["peak_bytes"] = dense_peak
    for name, row in res["schemes"].items():
        reps = row["repeats"]
        row["sparse_step_ms_best"] = [min(r["steps"][i]["ms"] for r in reps) for i in range(1, len(plan))]
        row["held_tensor_bytes_max"] = max(s["held_tensor_bytes"] for r in reps for s in r["steps"])
        if cuda:
            row["held_alloc_bytes_max"] = max(s["held_alloc_bytes"] for r in reps for s in r["steps"])
            row["peak_bytes"] = max(r["peak_bytes"] for r in reps)
            row["peak_over_dense_bytes"] = row["peak_bytes"] - dense_peak
            row["peak_over_dense_share_of_weights"] = round(row["peak_over_dense_bytes"] / WEIGHT_BYTES, 5)
    prev, new = res["schemes"].get("previous"), res["schemes"].get("per_call")
    if prev and new:
        tp, tn = sum(prev["sparse_step_ms_best"]), sum(new["sparse_step_ms_best"])
        res["verdict"] = {
            "time_per_call_over_previous": round(tn / tp, 4),
            "sparse_step_speedup_vs_dense": round(dense_ms * L * len(prev["sparse_step_ms_best"]) / tn, 3),
            "held_tensor_MB": {"previous": round(prev["held_tensor_bytes_max"] / 1e6, 1),
                               "per_call": round(new["held_tensor_bytes_max"] / 1e6, 1)},
            "bound_MB": round(BOUND_BYTES / 1e6, 1)}
        if cuda:
            res["verdict"]["peak_over_dense_MB"] = {"previous": round(prev["peak_over_dense_bytes"] / 1e6, 1),
                                                    "per_call": round(new["peak_over_dense_bytes"] / 1e6, 1)}
            res["verdict"]["per_call_within_bound"] = new["peak_over_dense_bytes"] <= BOUND_BYTES
        else:
            res["verdict"]["per_call_within_bound"] = new["held_tensor_bytes_max"] <= BOUND_BYTES
    res["checks"]["triton_fallbacks"] = sorted(fallbacks)
    res["meta"]["wall_s"] = round(time.time() - t_start, 1)
    text = json.dumps(res, indent=1)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "memory_step.json").write_text(text)


if __name__ == "__main__":
    main()
