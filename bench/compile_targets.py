"""Check that the Triton kernels compile for Ampere (sm80) and Ada (sm89) as well as Hopper, on a Hopper machine.

Triton compiles for the target the driver reports; here that report (and torch's capability, which picks the tile
table) is replaced by the target under test, so the whole pipeline runs for it down to ptxas' cubin for that
architecture. Triton fixes a device's target the first time it compiles for it, so each target runs in its own
process. Launching an sm80/sm89 cubin on an sm90 GPU is impossible (no binary for this GPU), so for those
targets the expected outcome is: compiled, then refused at module load. Hopper runs and is compared with the
reference.

GPU only: python3 bench/compile_targets.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from _pkg import load_package  # noqa: E402

load_package()
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from calibatt.kernels.attention.naive import sparse_attention_reference  # noqa: E402
from calibatt.masks import BlockGeometry, SkipLists  # noqa: E402


def attempt(cc, head_dim, dtype):
    import calibatt.kernels.attention.triton_fwd as ta
    import calibatt.kernels.block_energy.triton_fwd as ts

    real_cap = torch.cuda.get_device_capability
    driver = triton.runtime.driver.active
    real_target = driver.get_current_target
    torch.cuda.get_device_capability = lambda *a, **k: cc
    driver.get_current_target = lambda: GPUTarget("cuda", cc[0] * 10 + cc[1], 32)
    results = {}
    try:
        g = BlockGeometry(1000, 128, 128)
        mask = torch.rand(1, 4, g.nq, g.nk) < 0.4
        layer = SkipLists.from_block_mask(mask, g).layer(0).to("cuda")
        q, k, v = (torch.randn(1, 4, 1010, head_dim, device="cuda", dtype=dtype) for _ in range(3))
        for name, fn in (("attention", lambda: ta.sparse_attention_triton(q, k, v, layer)),
                         ("stats", lambda: ts.block_energy_triton(q, k, g))):
            try:
                out = fn()
                torch.cuda.synchronize()
                if name == "attention":
                    ref = sparse_attention_reference(q, k, v, layer).float()
                    err = float((out.float() - ref).norm() / ref.norm())
                    results[name] = f"compiled and ran, rel err {err:.1e}"
                else:
                    results[name] = "compiled and ran"
            except Exception as e:  # noqa: BLE001 - classify: compile failures vs refusal to load on this GPU
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                loadish = any(s in msg.lower() for s in ("no kernel image", "no binary", "invalid ptx",
                                                         "device kernel image is invalid", "cuda error",
                                                         "unsupported ptx", "launch"))
                results[name] = ("compiled; not loadable on this GPU (" + msg + ")") if loadish else \
                    ("FAILED: " + msg)
    finally:
        torch.cuda.get_device_capability = real_cap
        driver.get_current_target = real_target
    return results


def one_target(cc):
    ok = True
    for hd in (64, 128):
        for dt in (torch.float16, torch.bfloat16):
            r = attempt(cc, hd, dt)
            print(f"sm{cc[0]}{cc[1]} head_dim {hd} {str(dt)[6:]}: {r}", flush=True)
            ok &= not any(v.startswith("FAILED") for v in r.values())
    return ok


def main():
    import subprocess
    if len(sys.argv) > 2 and sys.argv[1] == "--cc":
        major, minor = (int(x) for x in sys.argv[2].split("."))
        sys.exit(0 if one_target((major, minor)) else 1)
    print("device", torch.cuda.get_device_name(), "triton", triton.__version__, "torch", torch.__version__)
    ok = True
    for cc in ("9.0", "8.0", "8.9"):
        ok &= subprocess.run([sys.executable, __file__, "--cc", cc]).returncode == 0
    print("ALL COMPILED" if ok else "SOME TARGET FAILED")


if __name__ == "__main__":
    main()
