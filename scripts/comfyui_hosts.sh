#!/usr/bin/env bash
# Prepare the real ComfyUI hosts that the integration tests run against (docs/COMFYUI.md, "Tests").
#
#   scripts/comfyui_hosts.sh SHARED_DIR TREES_DIR VENV
#
# - Extracts every SHARED_DIR/comfyui/comfyui-<version>.tgz into TREES_DIR/comfyui-<version> (outside the
#   repository: ComfyUI's code is a test fixture, never part of this package), again only when the archive changed.
# - Builds one venv for all of them: torch 2.14.1 + torchvision 0.29.1 (the pair that imports on the CPU here; see
#   ../shared/comfyui/README.md) and the union of the trees' requirements without their torch* lines. The newest
#   tree's requirements are a superset of the older ones' except for the frontend packages, which only the browser
#   serves: those an older tree pins differently are installed into that tree's own folder (see below). Rebuilt only
#   when a requirements file or this script changes.
# gguf is for the test that loads a model through ComfyUI-GGUF (its node code is a fixture outside the repository);
# diffusers for the test that moves bundles between the diffusers adapter and ComfyUI (test_nodes_comfyui_cross_host).
# Prints the tree folders, one per line, oldest version first.
set -euo pipefail
shared=$1 trees=$2 venv=$3
torch_pins="torch==2.14.1 torchvision==0.29.1"
test_tools="pytest==9.2.0 pytest-timeout==2.4.0 hypothesis==6.170.15 requests gguf==0.19.0 diffusers==0.42.1"

shopt -s nullglob
[ -d "$shared/comfyui" ] || exit 0
mapfile -t archives < <(printf '%s\n' "$shared"/comfyui/comfyui-*.tgz | sort -V)
if [ ${#archives[@]} -eq 0 ] || [ ! -f "${archives[0]}" ]; then
    exit 0
fi
mkdir -p "$trees"
dirs=()
for tgz in "${archives[@]}"; do
    name=$(basename "$tgz" .tgz)
    dest="$trees/$name"
    sum=$(sha256sum "$tgz" | cut -d' ' -f1)
    if [ ! -f "$dest/.extracted-$sum" ]; then
        rm -rf "$dest" "$dest.partial"
        mkdir -p "$dest.partial"
        tar -xzf "$tgz" -C "$dest.partial"
        # the archives hold one top folder named like the archive
        inner=("$dest.partial"/*)
        if [ ${#inner[@]} -eq 1 ] && [ -d "${inner[0]}" ] && [ -f "${inner[0]}/main.py" ]; then
            mv "${inner[0]}" "$dest"
            rm -rf "$dest.partial"
        else
            mv "$dest.partial" "$dest"
        fi
        touch "$dest/.extracted-$sum"
    fi
    dirs+=("$dest")
done

# one requirements list: every tree's lines without torch/torchvision/torchaudio, the newest version's pins winning
req=$(mktemp)
for d in "${dirs[@]}"; do
    grep -vE '^\s*(#|$)' "$d/requirements.txt" | grep -vE '^(torch|torchvision|torchaudio)\s*$' || true
done | python3 -c '
import re, sys
pins = {}
for line in sys.stdin:
    line = line.strip()
    name = re.split(r"[<>=~!\[ ;]", line, maxsplit=1)[0].lower()
    pins[name] = line  # later (newer) trees overwrite
print("\n".join(sorted(pins.values())))' > "$req"
key=$( (cat "$req"; echo "$torch_pins $test_tools") | sha256sum | cut -d' ' -f1)
if [ ! -f "$venv/.setup-$key" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    # shellcheck disable=SC2086
    "$venv/bin/pip" install -q --disable-pip-version-check $torch_pins -r "$req" $test_tools
    "$venv/bin/python" -c "import torch, torchvision, torchsde, comfy_kitchen" >/dev/null
    touch "$venv/.setup-$key"
fi
# A tree whose pins differ from the merged list (the frontend, workflow-template and docs packages of older trees)
# gets its own versions inside its folder: main.py's folder comes first on sys.path, so each tree serves what it
# pins and the venv stays shared.
for d in "${dirs[@]}"; do
    own=$(grep -vE '^\s*(#|$)' "$d/requirements.txt" | grep -vxF -f "$req" \
          | grep -vE '^(torch|torchvision|torchaudio)\s*$' || true)
    okey=$(printf '%s' "$own" | sha256sum | cut -d' ' -f1)
    if [ -n "$own" ] && [ ! -f "$d/.own-packages-$okey" ]; then
        # shellcheck disable=SC2086
        "$venv/bin/pip" install -q --disable-pip-version-check --no-deps --target "$d" $own
        touch "$d/.own-packages-$okey"
    fi
done
rm -f "$req"
printf '%s\n' "${dirs[@]}"
