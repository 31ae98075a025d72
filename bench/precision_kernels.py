"""8-bit computed blocks and head_dim 64 tiles against cuDNN dense and our bf16 kernel, in one device run.

Sections (each a JSON row; the run stops starting new sections after --budget-s):
  1. speed: Wan 720p (B 2, 40 heads x 128, 75,600 tokens) and 480p (32,760) with 3-D local-window masks at
     --densities and 1.0; cuDNN SDPA dense, ours in every precision (bf16; Q·K in e4m3 or int8, P·V in e4m3 or
     bf16: kernels/support.py QUANTIZED); time,
     effective TFLOP/s, and the relative error of each against an independent float32 masked softmax on sampled
     query blocks and against our bf16 output;
  2. head_dim 64 (32 heads, LTX-Video's shape, 32,760 tokens): tile variants at density 1.0 and 0.38 against cuDNN;
     and tile variants for the 8-bit precisions at Wan 720p;
  3. error sweep for the FP8 bound: many random and structured inputs (Gaussian, scaled peaky scores, a shared key
     offset, heavy-tailed values, text tokens first and last with a padding bias, a repetitive head), smaller
     shapes, rel error of fp8 / fp8-qk against float32 reference attention on the same skip list.
Usage (device): PYTHONUNBUFFERED=1 python3 bench/precision_kernels.py [--budget-s 420]
CPU check of the script: python3 bench/precision_kernels.py --smoke (interpreter, tiny shapes, no timing).
Writes precision_kernels.json into an output folder when the OUT environment variable names one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels as BK  # noqa: E402  (loads the package, the interpreter patches under --smoke)

import torch  # noqa: E402

if BK.SMOKE:  # the interpreter's own e4m3 rounding is wrong; the tests' patch fixes it (tests/triton_interp.py)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from triton_interp import interpreted_kernels
    interpreted_kernels()
from calibatt.kernels.attention import triton_fwd as TA  # noqa: E402
from calibatt.kernels.attention.naive import sparse_attention_reference  # noqa: E402
from calibatt.kernels.dense import dense_attention  # noqa: E402
from calibatt.masks import BlockGeometry, RepetitionPlan, SkipLists  # noqa: E402

SMOKE = BK.SMOKE
DEV = BK.DEV
OUT = os.environ.get("OUT")
RES = {"meta": {}, "speed": [], "hd64": [], "errors": [], "q8_tiles": []}
T0 = time.time()


def save():
    if OUT:
        with open(os.path.join(OUT, "precision_kernels.json"), "w") as f:
            json.dump(RES, f, indent=1)


def emit(section, row):
    RES[section].append(row)
    print(json.dumps({section: row}), flush=True)
    save()


def speed(N, H, D, densities, B=2):
    grid = BK.GRIDS[N]
    g = BlockGeometry(N, 128, 128)
    gen = torch.Generator(device=DEV).manual_seed(N)
    dt = torch.float16 if SMOKE else torch.bfloat16
    q, k, v = (torch.randn(B, H, N, D, device=DEV, generator=gen).to(dt) for _ in range(3))
    dense_ms = BK.bench_ms(lambda: dense_attention(q, k, v))
    for dens in densities:
        m = (torch.ones(H, g.nq, g.nk, dtype=torch.bool, device=DEV) if dens >= 1.0
             else BK.local_window_mask(H, g, dens, grid, 7, DEV))
        layer = BK.layer_from_mask(m, g).to(DEV)
        cd = BK.computed_density(layer)
        qbs = [0, g.nq // 2, g.nq - 1]
        ref = BK.masked_rows_ref(q, k, v, m, g, 1 / math.sqrt(D), qbs)
        outs = {}
        for prec in PRECS:
            out = TA.sparse_attention_triton(q, k, v, layer, precision=prec)
            outs[prec] = out
            err = max(BK.rel(out[:, :, qb * 128:min(qb * 128 + 128, N)], ref[qb]) for qb in qbs)
            ms = BK.bench_ms(lambda: TA.sparse_attention_triton(q, k, v, layer, precision=prec))
            bf16_ms = ms if prec == "bf16" else bf16_ms
            emit("speed", dict(N=N, H=H, D=D, B=B, density=round(cd, 4), precision=prec, ms=ms, dense_ms=dense_ms,
                               vs_dense=dense_ms / ms, vs_bf16=bf16_ms / ms, tflops=BK.tflops(B, H, N, D, cd, ms),
                               cudnn_tflops=BK.tflops(B, H, N, D, 1.0, dense_ms), err_vs_fp32=err,
                               err_vs_bf16=BK.rel(out, outs["bf16"])))
        del outs
        BK._empty()


PRECS = ("bf16", "fp8-qk", "fp8", "int8-qk", "int8")
# The table's tile (None) first; the 2026-12-01 sweep's other candidates (docs/BENCHMARKS.md) after it.
HD64_TILES = [None, TA.TileConfig(128, 128, 8, 3, 2), TA.TileConfig(128, 64, 4, 4, 2)]
# 8-bit tiles are half the bytes: more stages fit, and one warpgroup may suffice.
Q8_TILES = [TA.TileConfig(128, 128, 8, 4, 2), TA.TileConfig(128, 128, 4, 3, 2), TA.TileConfig(128, 128, 8, 2, 2),
            TA.TileConfig(128, 64, 8, 3, 2)]


def hd64(N=32760, H=32, D=64, B=2, densities=(1.0, 0.38)):
    grid = BK.GRIDS[N]
    g = BlockGeometry(N, 128, 128)
    gen = torch.Generator(device=DEV).manual_seed(64)
    dt = torch.float16 if SMOKE else torch.bfloat16
    q, k, v = (torch.randn(B, H, N, D, device=DEV, generator=gen).to(dt) for _ in range(3))
    dense_ms = BK.bench_ms(lambda: dense_attention(q, k, v))
    layers = {d: BK.layer_from_mask(torch.ones(H, g.nq, g.nk, dtype=torch.bool, device=DEV) if d >= 1.0
                                    else BK.local_window_mask(H, g, d, grid, 3, DEV), g).to(DEV) for d in densities}
    want = {d: sparse_attention_reference(q[:, :2], k[:, :2], v[:, :2], _heads(layers[d], 2)) for d in densities}
    for tiles in HD64_TILES if not SMOKE else HD64_TILES[:2]:
        for prec in ("bf16", "fp8", "int8", "int8-qk") if tiles is None else ("bf16",):
            for d, layer in layers.items():
                try:
                    out = TA.sparse_attention_triton(q, k, v, layer, tiles=tiles, precision=prec)
                    err = BK.rel(out[:, :2], want[d])
                    ms = BK.bench_ms(lambda: TA.sparse_attention_triton(q, k, v, layer, tiles=tiles, precision=prec))
                    cd = BK.computed_density(layer)
                    emit("hd64", dict(tiles=None if tiles is None else tiles.as_dict(), precision=prec,
                                      density=round(cd, 4), ms=ms, dense_ms=dense_ms, err=err,
                                      efficiency_vs_cudnn=BK.tflops(B, H, N, D, cd, ms)
                                      / BK.tflops(B, H, N, D, 1.0, dense_ms)))
                except Exception as e:  # noqa: BLE001 - a tile that does not compile is a result
                    emit("hd64", dict(tiles=None if tiles is None else tiles.as_dict(), precision=prec, density=d,
                                      error=repr(e)[:300]))
    BK._empty()


def q8_tiles(N=75600, H=40, D=128, B=2, density=0.38):
    """Tile variants for the 8-bit precisions at Wan 720p (the table's 128x128 / 8 warps / 3 stages is the base)."""
    grid = BK.GRIDS[N]
    g = BlockGeometry(N, 128, 128)
    gen = torch.Generator(device=DEV).manual_seed(8)
    dt = torch.float16 if SMOKE else torch.bfloat16
    q, k, v = (torch.randn(B, H, N, D, device=DEV, generator=gen).to(dt) for _ in range(3))
    layer = BK.layer_from_mask(BK.local_window_mask(H, g, density, grid, 7, DEV), g).to(DEV)
    cd = BK.computed_density(layer)
    base = {p: BK.bench_ms(lambda: TA.sparse_attention_triton(q, k, v, layer, precision=p)) for p in ("bf16", "int8")}
    for tiles in Q8_TILES if not SMOKE else Q8_TILES[:1]:
        for prec in ("int8", "fp8"):
            try:
                ms = BK.bench_ms(lambda: TA.sparse_attention_triton(q, k, v, layer, tiles=tiles, precision=prec))
                emit("q8_tiles", dict(tiles=tiles.as_dict(), precision=prec, density=round(cd, 4), ms=ms,
                                      table_bf16_ms=base["bf16"], table_int8_ms=base["int8"],
                                      vs_bf16=base["bf16"] / ms))
            except Exception as e:  # noqa: BLE001
                emit("q8_tiles", dict(tiles=tiles.as_dict(), precision=prec, error=repr(e)[:300]))
    BK._empty()


def _heads(layer, n):
    """The first n heads of a layer without repetition (the reference on a slice of the heads)."""
    return type(layer)(layer.geometry, layer.kv_indices[:n], layer.kv_counts[:n], None)


def error_sweep(cases):
    """rel error of each precision against float32 reference attention on the same skip list."""
    dt = torch.float16 if SMOKE else torch.bfloat16
    for i, (name, make) in enumerate(cases):
        gen = torch.Generator(device="cpu").manual_seed(100 + i)
        layer, q, k, v, kw = make(gen)
        layer = layer.to(DEV)
        q, k, v = (t.to(DEV, dt) for t in (q, k, v))
        kw = {key: (val.to(DEV) if isinstance(val, torch.Tensor) else val) for key, val in kw.items()}
        ref = sparse_attention_reference(q.float(), k.float(), v.float(), layer, **kw)
        row = {"case": name}
        for prec in PRECS:
            out = TA.sparse_attention_triton(q, k, v, layer, precision=prec, **kw)
            row[prec] = BK.rel(out, ref)
        emit("errors", row)


def _case(H, frames, T, D, n_text, density, block, *, scale_q=1.0, k_offset=0.0, heavy_v=False, text_first=False,
          bias=False, rep=False):
    def make(gen):
        n = frames * T
        g = BlockGeometry(n, block, block)
        plan = None
        if rep:
            slot = torch.full((1, H), -1, dtype=torch.int32)
            slot[0, 1] = 0
            plan = RepetitionPlan(T, slot, torch.randperm(T, generator=gen)[:6][None],
                                  torch.randint(0, 6, (1, T), generator=gen))
        layer = SkipLists.from_block_mask(torch.rand(1, H, g.nq, g.nk, generator=gen) < density, g, plan).layer(0)
        N = n + n_text
        q = torch.randn(2, H, N, D, generator=gen) * scale_q
        k = torch.randn(2, H, N, D, generator=gen) + k_offset * torch.randn(1, H, 1, D, generator=gen)
        v = torch.randn(2, H, N, D, generator=gen)
        if heavy_v:
            v = v * torch.exp(torch.randn(2, H, N, 1, generator=gen))  # log-normal token norms
        kw = {}
        if text_first and n_text:
            kw["video_start"] = n_text
        if bias and n_text:
            b = torch.zeros(2, n_text)
            b[1, n_text // 2:] = -1e4  # the second prompt's padding
            kw["text_bias"] = b
        return layer, q, k, v, kw
    return make


def cases():
    small = dict(H=4, frames=6, T=700, D=128, block=128)
    if SMOKE:
        small = dict(H=2, frames=3, T=40, D=32, block=32)
    out = []
    for seed_density in (0.2, 0.5, 1.0):
        out.append((f"gaussian d{seed_density}", _case(n_text=0, density=seed_density, **small)))
    out += [
        ("peaky scores (q x4)", _case(n_text=0, density=0.4, scale_q=4.0, **small)),
        ("very peaky scores (q x8)", _case(n_text=0, density=0.4, scale_q=8.0, **small)),
        ("shared key offset x5", _case(n_text=0, density=0.4, k_offset=5.0, **small)),
        ("heavy-tailed values", _case(n_text=0, density=0.4, heavy_v=True, **small)),
        ("text last + padding bias", _case(n_text=77, density=0.4, bias=True, **small)),
        ("text first + padding bias", _case(n_text=77, density=0.4, bias=True, text_first=True, **small)),
        ("repetitive head + text", _case(n_text=33, density=0.3, rep=True, **small)),
    ]
    if not SMOKE:
        out.append(("head_dim 64", _case(n_text=0, density=0.4, H=4, frames=6, T=700, D=64, block=128)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--budget-s", type=float, default=420)
    ap.add_argument("--densities", default="0.38,0.25")
    ap.add_argument("--sections", default="errors,speed720,hd64,q8tiles,speed480")
    a = ap.parse_args()
    import triton
    RES["meta"] = dict(torch=torch.__version__, triton=triton.__version__, date=time.strftime("%Y-%m-%d %H:%M:%S"),
                       device="cpu (interpreter smoke)" if SMOKE else torch.cuda.get_device_name(), argv=sys.argv)
    print(json.dumps(RES["meta"]), flush=True)
    dens = [float(x) for x in a.densities.split(",")] + [1.0]
    for sec in a.sections.split(","):
        if time.time() - T0 > a.budget_s:
            RES["meta"].setdefault("skipped", []).append(sec)
            continue
        if sec == "errors":
            error_sweep(cases())
        elif sec == "speed720":
            speed(400 if SMOKE else 75600, 2 if SMOKE else 40, 32 if SMOKE else 128, dens)
        elif sec == "speed480":
            speed(300 if SMOKE else 32760, 2 if SMOKE else 40, 32 if SMOKE else 128, dens)
        elif sec == "q8tiles":
            q8_tiles(*((400, 2, 32, 1, 0.5) if SMOKE else ()))
        elif sec == "hd64":
            if SMOKE:
                hd64(N=300, H=2, D=64, B=1, densities=(1.0,))
            else:
                hd64()
    RES["meta"]["wall_s"] = round(time.time() - T0, 1)
    save()
    print(json.dumps({"done": RES["meta"]}), flush=True)


if __name__ == "__main__":
    main()
