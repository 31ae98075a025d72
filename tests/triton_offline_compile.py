"""Compile our Triton kernels for a GPU target on a machine without a GPU or driver, down to a cubin.

Run as a script (tests/test_triton_targets.py starts it in a subprocess: TRITON_INTERPRET, which the test session
sets for the CPU, must be unset when @triton.jit decorates the kernels):

    python tests/triton_offline_compile.py 80 90 ...   ->  one JSON line per compiled launch

How: the real host functions (kernels/attention/triton_fwd.py sparse_attention_triton, kernels/block_energy/triton_fwd.py
block_energy_triton, kernels/tables/triton_build.py packed_to_table_triton) run on CPU tensors with the target's tile
configuration, which `triton_common._pick_tiles` chooses from the capability we report for the target (torch.cuda.get_device_capability is answered with it, as on such a GPU).
Each kernel launch is recorded instead of run; Triton's own argument binder then specialises the recorded
arguments for the target (pointer dtypes, 16-byte alignment, constexprs, TMA descriptor types), and
triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32)) runs every stage: TTIR, TTGIR, LLVM IR, PTX, and
the ptxas bundled with the wheel (ptxas-blackwell for sm100+) to a cubin. No driver is involved: the target is
given, never asked for. A ptxas refusal is reported as such, with the PTX stage's result.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

# Representative configurations per target: (name, head_dim, dtype, text tokens, text bias, repetition, mask block,
# statistics kernels too). The first is Wan's path (video tokens only, head_dim 128, bf16, blocks of 128) with the
# calibration statistics; the second takes every other constexpr branch of the attention kernels: joint text with
# a key bias (HunyuanVideo), the text-row and anchor-row launches, float16, head_dim 64, blocks of 64.
CASES = [
    ("bf16 D128 video", 128, "bfloat16", 0, False, False, 128, True),
    ("fp16 D64 text+bias+repetition", 64, "float16", 10, True, True, 64, False),
]


def _load_package():
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "scripts"))
    from _pkg import load_package  # noqa: E402
    load_package()


def _compile(kernel, target, args, kwargs):
    """What JITFunction.run does before a launch, for an explicit target (triton 3.6 internals)."""
    from triton import knobs
    from triton.compiler import ASTSource, compile as triton_compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(kwargs, debug=False, instrumentation_mode=knobs.compilation.instrumentation_mode)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    src = ASTSource(kernel, signature, constexprs, attrs)
    try:
        return triton_compile(src, target=target, options=options.__dict__), None
    except Exception as e:  # noqa: BLE001 - a ptxas refusal: say so, keep the PTX
        if "ptxas" not in str(e).lower():
            raise
        return _ptx_only(src, target, backend, options), _ptxas_message(str(e))


def _ptxas_message(err: str) -> str:
    """ptxas' own complaint from Triton's PTXASError (its stderr follows a "`ptxas` stderr:" line)."""
    lines = err.splitlines()
    for i, line in enumerate(lines):
        if "stderr:" in line:
            said = [x.strip() for x in lines[i + 1:] if x.strip() and not x.startswith("Repro command")]
            if said:
                return said[0][:300]
    return lines[0][:300] if lines else "ptxas failed"


def _ptx_only(src, target, backend, options):
    """Run the stages up to PTX (what ptxas was handed) when ptxas refuses the target."""
    from triton._C.libtriton import ir

    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    codegen_fns = backend.get_codegen_implementation(options)
    module = src.make_ir(target, options, codegen_fns, backend.get_module_map(), context)
    stages = {}
    backend.add_stages(stages, options, src.language)
    metadata = {"hash": "ptx-only", "target": target, **options.__dict__}
    for name, stage in stages.items():
        if name == "cubin":
            break
        module = stage(module, metadata)
    return module


def _cubin_arch(cubin: bytes) -> str:
    """The SM a cubin is for, from the bundled cuobjdump (independent of what we asked for)."""
    import subprocess
    import tempfile

    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--list-elf", f.name], capture_output=True, text=True).stdout
    m = re.search(r"\.(sm_\d+[a-z]?)\.cubin", out)  # "ELF file 1: <kernel>.sm_90a.cubin"
    return m.group(1) if m else "?"


def compile_target(cc: int):
    import torch
    import triton
    from triton.backends.compiler import GPUTarget

    import calibatt.kernels.attention.triton_fwd as ta
    import calibatt.kernels.block_energy.triton_fwd as ts
    import calibatt.kernels.tables.triton_build as tt
    import calibatt.kernels.triton_common as triton_common
    from calibatt.masks import BlockGeometry, RepetitionPlan, SkipLists

    target = GPUTarget("cuda", cc, 32)
    cap = (cc // 10, cc % 10)
    torch.cuda.get_device_capability = lambda *a, **k: cap  # what the kernel module asks to pick its tiles
    cuda = torch.device("cuda")

    def tiles(head_dim, block_q, block_k, device, base=None):
        return triton_common._pick_tiles(head_dim, block_q, block_k, cuda, base, False)

    ta.pick_tiles = ts.pick_tiles = tiles
    launches = []
    kernels = [ta._sparse_video_fwd, ta._dense_rows_fwd, ts._row_lse, ts._block_mass, tt._packed_rows_to_table]
    for kern in kernels:
        kern.run = (lambda kern: lambda *args, grid, warmup, **kwargs: launches.append((kern, args, kwargs)))(kern)

    results = []
    modes = [None]
    if tiles(128, 128, 128, cuda).tma:
        # Hopper: host TMA descriptors (large calls) and in-kernel ones (calls under _TMA_MIN_PAIRS)
        modes = [0, 1 << 62]
    for name, D, dt, text, bias, rep, block, stats in CASES:
        for min_pairs in modes:
            if min_pairs is not None:
                ta._TMA_MIN_PAIRS = min_pairs
            dtype = getattr(torch, dt)
            gen = torch.Generator().manual_seed(0)
            T = 8 * 16  # frame tokens
            Nv = 3 * T + 40  # 3 frames and a bit: the last mask block is partial (TAIL_K)
            g = BlockGeometry(Nv, block, block)
            plan = None
            if rep:
                slot = torch.full((1, 2), -1, dtype=torch.int32)
                slot[0, 1] = 0
                plan = RepetitionPlan(T, slot, torch.randperm(T, generator=gen)[:4][None],
                                      torch.randint(0, 4, (1, T), generator=gen))
            layer = SkipLists.from_block_mask(torch.rand(1, 2, g.nq, g.nk, generator=gen) < 0.5, g, plan).layer(0)
            q, k, v = (torch.randn(1, 2, Nv + text, D, generator=gen).to(dtype) for _ in range(3))
            tb = torch.randn(1, text, generator=gen) if bias and text else None
            launches.clear()
            ta.sparse_attention_triton(q, k, v, layer, text_bias=tb)
            if stats and min_pairs in (None, 0):  # the statistics kernels take host descriptors only (mode 2)
                ts.block_energy_triton(q, k, g, text_bias=tb)
                # the per-call table builder (kernels/tables/__init__.py) at Wan 720p's 591 key blocks, with the
                # full-head flags of a mixed layer
                nk, nq = 591, 4
                packed = torch.randint(0, 256, (2, nq, (nk + 7) // 8), generator=gen, dtype=torch.uint8)
                tt.packed_to_table_triton(packed, nk, torch.empty(2, nq, nk, dtype=torch.int16),
                                          torch.empty(2, nq, dtype=torch.int32), torch.tensor([0, 1]))
            for kern, args, kwargs in launches:
                t0 = time.time()
                mode = kwargs.get("DESC_MODE") if min_pairs is not None else None
                label = f"{kern.fn.__name__} [{name}" + (f", DESC_MODE {mode}]" if mode is not None else "]")
                try:
                    compiled, refusal = _compile(kern, target, args, kwargs)
                except Exception as e:  # noqa: BLE001 - reported per launch
                    results.append({"cc": cc, "kernel": label, "result": "FAILED",
                                    "error": f"{type(e).__name__}: {str(e)[:2000]}",
                                    "trace": traceback.format_exc()[-3000:]})
                    continue
                if refusal is None:
                    cubin = compiled.asm["cubin"]
                    results.append({"cc": cc, "kernel": label, "result": "cubin", "bytes": len(cubin),
                                    "elf": cubin[:4] == b"\x7fELF", "arch": _cubin_arch(cubin),
                                    "ptx_target": _ptx_target(compiled.asm["ptx"]),
                                    "num_warps": compiled.metadata.num_warps,
                                    "shared": compiled.metadata.shared, "seconds": round(time.time() - t0, 2)})
                else:
                    results.append({"cc": cc, "kernel": label, "result": "ptx", "ptxas": refusal,
                                    "ptx_target": _ptx_target(compiled), "seconds": round(time.time() - t0, 2)})
    return results


def _ptx_target(ptx: str) -> str:
    for line in ptx.splitlines():
        if line.startswith(".target"):
            return line.split()[1].rstrip(",")
    return "?"


def main(argv):
    os.environ.pop("TRITON_INTERPRET", None)
    _load_package()
    import triton
    from triton import knobs
    if knobs.runtime.interpret:
        raise SystemExit("TRITON_INTERPRET is set: the kernels would be interpreted, not compiled")
    print(json.dumps({"triton": triton.__version__}), flush=True)
    for cc in (int(a) for a in argv):
        for r in compile_target(cc):
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
