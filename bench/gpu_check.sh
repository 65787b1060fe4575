#!/usr/bin/env bash
# GPU check: CPU/GPU agreement and pipeline throughput on this machine's CUDA device (< 5 minutes).
#
#   bash bench/gpu_check.sh                # on a CUDA machine; arguments go to bench/gpu_check.py
#   bash bench/gpu_check.sh --cpu-smoke    # checks the script itself on the CPU (< 60 s)
#   OUT=/some/dir bash bench/gpu_check.sh  # also writes the whole output to $OUT/gpu_check.txt
#
# Exit status: gpu_check.py's (0 all checks passed, 1 a check failed, 2 no CUDA device),
# 124 when it ran past 300 s. Paste the printed Markdown block into bench/RESULTS.md.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi

check() {
    echo "# bash bench/gpu_check.sh $* ($(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(hostname), $PY)"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi failed"
    else
        echo "nvidia-smi: not found"
    fi
    timeout --kill-after=10 300 "$PY" -u bench/gpu_check.py "$@"
    local status=$?
    [[ $status -eq 124 ]] && echo "gpu_check: stopped after 300 s (timeout)" >&2
    return $status
}

if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    check "$@" 2>&1 | tee "$OUT/gpu_check.txt"
    status=${PIPESTATUS[0]}
else
    check "$@"
    status=$?
fi
exit "$status"
