#!/usr/bin/env bash
# Make the three git-ignored folders bench/model_step.py needs on the GPU machine, small enough that they and the
# checkout travel together (64 MiB in all, measured and printed at the end):
#   .benchwheels/  the wheels its image lacks (bench/fetch_bench_wheels.sh);
#   .benchcomfy/comfyui-0.19.3.tgz  the ComfyUI 0.19.3 tree from the shared archive, unmodified files, without what
#                  the bench never reads: comfy/ and the top-level modules it imports (folder_paths, comfyui_version,
#                  node_helpers) plus LICENSE, minus the tokenizer vocabularies (no text encoder is built). 0.7 MB
#                  instead of 6.4; same top folder, so `tar xzf ... -C <dir>` gives <dir>/comfyui-0.19.3;
#   .benchdata/    the STA window file, gzipped (0.2 MB instead of 4.1; model_step.py reads either).
# Usage (repo root): bash bench/prepare_bench_carry.sh [shared folder, default ../shared or ../../shared] [python]
set -euo pipefail
SHARED=${1:-}
PY=${2:-python3}
if [ -z "$SHARED" ]; then
  for s in ../shared ../../shared; do [ -d "$s/comfyui" ] && SHARED=$s && break; done
fi
[ -n "$SHARED" ] && [ -f "$SHARED/comfyui/comfyui-0.19.3.tgz" ] || { echo "no shared folder with comfyui/comfyui-0.19.3.tgz"; exit 1; }
bash bench/fetch_bench_wheels.sh "$PY"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tar xzf "$SHARED/comfyui/comfyui-0.19.3.tgz" -C "$tmp"
mkdir -p .benchcomfy .benchdata
tar czf .benchcomfy/comfyui-0.19.3.tgz -C "$tmp" --exclude='*tokenizer*/*.json' --exclude='*tokenizer*/*.txt' \
  --exclude='*tokenizer*/*.model' --exclude='__pycache__' comfyui-0.19.3/comfy comfyui-0.19.3/folder_paths.py \
  comfyui-0.19.3/comfyui_version.py comfyui-0.19.3/node_helpers.py comfyui-0.19.3/LICENSE
gzip -9 -c "$SHARED/data/sta_mask_strategy_hunyuan.json" > .benchdata/sta_mask_strategy_hunyuan.json.gz
tracked=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
carried=$(du -cb .benchwheels .benchcomfy .benchdata | tail -1 | cut -f1)
echo "tracked $((tracked / 1024)) KiB + carried $((carried / 1024)) KiB = $(((tracked + carried) / 1048576)) MiB of 64"
