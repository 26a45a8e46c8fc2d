#!/usr/bin/env bash
# One prepared GPU check (issue 12 item 8), from the repository root of a plain copy of the working tree:
#
#   bash benchmarks/gpu_check.sh                        # on one NVIDIA GPU (sized for an H200 with 16 cores: ~6 min)
#   GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh   # dry run of the same plumbing on a CPU (tiny sizes, 1 epoch)
#
# Builds .venv with `make venv` when it is missing (PyPI's torch==2.14.1 wheels carry CUDA; needs the network), writes
# the embedded dataset when data/synthetic lacks it, then runs benchmarks/gpu_check.py: trainer against the bare loop
# with AMP at 256 and 512 px (images/s, ratio, peak GPU memory), two identical deterministic train.py runs compared
# epoch by epoch, and a 4-trial tune.py smoke study sharing the GPU (0.25 each), plus GPU, driver, torch and CUDA
# versions and every step's wall time. Each step has its own timeout inside one budget (GPU_CHECK_BUDGET_S, default
# 450 s from this script's start, so the whole check ends inside 8 minutes); a failed step is recorded and the next
# one runs. Result: ONE JSON file, $OUT/gpu_check.json when $OUT is set, else benchmarks/results/gpu_check.json
# (GPU_CHECK_OUT overrides). GPU_CHECK_PYTHON=/path/to/python uses that interpreter instead of .venv (an image
# whose python already holds torch with CUDA and the packages of requirements.txt). Exit status 0 when every step
# passed, 1 otherwise (the JSON is written either way). More settings: benchmarks/gpu_check.py's docstring.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s.%N)
# medseg and benchmarks.common importable by any interpreter: GPU_CHECK_PYTHON (or python3) has no editable install
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONHASHSEED=0 PYTHONUNBUFFERED=1
DEVICE=${GPU_CHECK_DEVICE:-cuda}
BUDGET=${GPU_CHECK_BUDGET_S:-$([ "$DEVICE" = cpu ] && echo 900 || echo 450)}

args=(--device "$DEVICE" --started "$START")
if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
    PY=$GPU_CHECK_PYTHON
    args+=(--python-given)
else
    PY=$PWD/.venv/bin/python
    if [ ! -x "$PY" ] || [ ! -f .venv/.installed ]; then
        # The venv is the one step outside gpu_check.py: it gets at most half the budget.
        VENV_LOG=$(mktemp /tmp/gpu_check_venv.XXXXXX.log)
        echo "== venv: make venv (log $VENV_LOG)"
        t0=$(date +%s)
        timeout -k 10 "$((${BUDGET%.*} / 2))" make venv >"$VENV_LOG" 2>&1
        rc=$?
        echo "   venv: exit $rc after $(($(date +%s) - t0)) s"
        [ "$rc" -ne 0 ] && tail -n 15 "$VENV_LOG"
        args+=(--venv-rc "$rc" --venv-wall-s "$(($(date +%s) - t0))" --venv-log "$VENV_LOG")
    fi
fi
if ! "$PY" -c 'import sys' >/dev/null 2>&1; then
    # No usable interpreter (the venv failed): python3 still writes the JSON, with each step's error.
    echo "   $PY does not run: falling back to python3 (steps will record their import errors)"
    PY=$(command -v python3)
    args+=(--python-fallback)
fi
args+=(--python "$PY")
exec "$PY" benchmarks/gpu_check.py "${args[@]}"
