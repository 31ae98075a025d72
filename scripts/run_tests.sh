#!/usr/bin/env bash
# `make test`: the engine and unit tests in .venv, then the real-ComfyUI tests once per ComfyUI tree.
#
#   scripts/run_tests.sh SHARED_DIR TREES_DIR COMFY_VENV [pytest args...]
#
# The trees come from SHARED_DIR/comfyui (scripts/comfyui_hosts.sh extracts them outside the repository and builds
# COMFY_VENV). Without them the real-host tests still run in the first pass and skip with their reason.
set -uo pipefail
shared=$1 trees=$2 venv=$3
shift 3
cd "$(dirname "$0")/.."

if [ -d "$shared/comfyui" ]; then
    list=$(mktemp)
    if ! bash scripts/comfyui_hosts.sh "$shared" "$trees" "$venv" > "$list"; then
        echo "run_tests: setting up the ComfyUI hosts failed (scripts/comfyui_hosts.sh)" >&2
        exit 1
    fi
    mapfile -t hosts < "$list"
    rm -f "$list"
    bash scripts/browser_deps.sh
else
    hosts=()
    echo "run_tests: $shared/comfyui is absent, so the real-ComfyUI tests skip (they need its ComfyUI trees)"
fi

status=0
summary=()
run() {  # label, then the command
    local label=$1
    shift
    local log
    log=$(mktemp)
    "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    summary+=("$label: $(tail -n 1 "$log" | sed 's/^=* *//; s/ *=*$//') (exit $rc)")
    rm -f "$log"
    # pytest exit 5 = nothing collected; for a selection that is empty on purpose that is not a failure
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then
        status=1
    fi
}

if [ ${#hosts[@]} -gt 0 ]; then
    run "engine and unit tests" .venv/bin/python -m pytest -q tests -m "not comfyui" "$@"
    for tree in "${hosts[@]}"; do
        run "real ComfyUI $(basename "$tree")" env COMFYUI_PATH="$tree" "$venv/bin/python" -m pytest -q tests \
            -m comfyui "$@"
    done
else
    run "all tests" .venv/bin/python -m pytest -q tests "$@"
fi

echo
echo "== make test summary"
printf '%s\n' "${summary[@]}"
# One closing line over all runs, in the plain "N passed, N failed" form (errors count as failed).
printf '%s\n' "${summary[@]}" | python3 -c '
import re, sys
n = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
for line in sys.stdin:
    for count, word in re.findall(r"(\d+) (passed|failed|errors?|skipped)", line):
        n["error" if word.startswith("error") else word] += int(count)
print("total: %d passed, %d failed, %d skipped" % (n["passed"], n["failed"] + n["error"], n["skipped"]))'
exit $status
