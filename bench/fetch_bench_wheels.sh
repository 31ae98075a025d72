#!/usr/bin/env bash
# Recreate .benchwheels/: the Python 3.12 x86-64 wheels that bench/model_step.py needs on the GPU machine beyond its
# image (torch, triton, numpy, einops, safetensors, scipy, psutil, Pillow, pyyaml, tqdm are there): what
# `import comfy.model_management, comfy.ldm.wan.model, comfy.model_patcher, comfy.samplers` of ComfyUI 0.19.3 needs,
# plus comfy-kitchen for the Sol-Attn peer. comfy-kitchen's wheel (68 MB) is rewritten without backends/hip (the
# ROCm build, 30 MB, never loaded under a CUDA torch); backends/ascend stays (the package imports it at load).
# The folder (git-ignored) goes to the GPU machine with the checkout; bench/prepare_bench_carry.sh prints what they
# weigh together.
# Usage (repo root): bash bench/fetch_bench_wheels.sh [python]
set -euo pipefail
PY=${1:-python3}
DEST=.benchwheels
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$DEST" \
  comfy-kitchen==0.2.40 comfy-aimdo==0.6.0 torchsde==0.2.6 trampoline==0.1.2
"$PY" - "$DEST" <<'EOF'
import base64, hashlib, pathlib, sys, zipfile

dest = pathlib.Path(sys.argv[1])
for whl in dest.glob("comfy_kitchen-*.whl"):
    with zipfile.ZipFile(whl) as z:
        names = [i for i in z.infolist() if "/backends/hip/" not in i.filename]
        if len(names) == len(z.infolist()):
            continue  # already stripped
        record = next(i.filename for i in names if i.filename.endswith(".dist-info/RECORD"))
        tmp = whl.with_suffix(".tmp")
        rows = []
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as out:
            for info in names:
                if info.filename == record:
                    continue
                data = z.read(info)
                out.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
                if not info.filename.endswith("/"):
                    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                    rows.append(f"{info.filename},sha256={digest},{len(data)}")
            rows.append(f"{record},,")
            out.writestr(record, "\n".join(rows) + "\n")
    tmp.replace(whl)
    print(f"{whl.name}: backends/hip removed, {whl.stat().st_size / 2**20:.1f} MiB")
EOF
du -ch "$DEST"/*.whl
