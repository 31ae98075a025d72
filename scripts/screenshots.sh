#!/usr/bin/env bash
# `make screenshots`: refresh the README's pictures (docs/screenshots/comfyui-<version>/) from the browser test
# against the newest ComfyUI tree (tests/test_browser_ui.py).
#
#   scripts/screenshots.sh SHARED_DIR TREES_DIR COMFY_VENV
set -euo pipefail
shared=$1 trees=$2 venv=$3
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    echo "screenshots: needs Debian's chromium and chromedriver: apt-get install chromium chromium-driver" >&2
    exit 1
fi
mapfile -t hosts < <(bash scripts/comfyui_hosts.sh "$shared" "$trees" "$venv")
if [ ${#hosts[@]} -eq 0 ]; then
    echo "screenshots: no ComfyUI trees in $shared/comfyui" >&2
    exit 1
fi
newest=${hosts[${#hosts[@]}-1]}
CALIBATT_SCREENSHOTS=docs/screenshots COMFYUI_PATH="$newest" "$venv/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_browser_ui.py
ls docs/screenshots/"$(basename "$newest")"
