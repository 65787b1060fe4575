#!/usr/bin/env bash
# GPU check, what a CUDA machine runs first (< 6 minutes): the CPU-vs-GPU agreement tests
# (tests/gpu, pytest marker `gpu`), then the throughput bench (bench/gpu_throughput.py).
#
#   bash bench/gpu_check.sh                          # on a CUDA machine; arguments go to the throughput bench
#   bash bench/gpu_check.sh --backbones resnet12     # throughput of one backbone (the tests run both)
#   bash bench/gpu_check.sh --cpu-smoke              # without CUDA: the tests skip, the bench runs tiny on the CPU
#   OUT=/some/dir bash bench/gpu_check.sh            # also writes the whole output to $OUT/gpu_check.txt
#   PYTHON=/path/to/python bash bench/gpu_check.sh   # that Python (default: .venv/bin/python, else python3)
#
# Every test runs, failing or not, and the bench runs whatever the tests gave. Exit status: 0 when
# both did; else the tests' (pytest: 1 a test failed), or the bench's (2 no CUDA device); 124 when
# either ran past its time limit. Paste the measured-differences table and the throughput table
# into bench/RESULTS.md.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

# the Python to use: $PYTHON if set, else the repository's .venv, else python3
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON; elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi

check() {
    echo "# bash bench/gpu_check.sh $* ($(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(hostname), $PY)"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi failed"
    else
        echo "nvidia-smi: not found"
    fi

    # -p no:xdist: in this one process on the one GPU (tests/conftest.py starts several where
    # pytest-xdist is installed)
    echo; echo "== Agreement tests: $PY -m pytest -p no:xdist tests/gpu -m gpu -v -rA =="
    local tests=0
    if "$PY" -c "import pytest" 2>/dev/null; then
        timeout --kill-after=10 240 "$PY" -u -m pytest -p no:xdist tests/gpu -m gpu -v -rA
        tests=$?
        [[ $tests -eq 124 ]] && echo "gpu_check: the agreement tests stopped after 240 s (timeout)" >&2
    else
        echo "gpu_check: pytest is not installed for $PY: the agreement tests did not run" >&2
        tests=1
    fi

    echo; echo "== Throughput: $PY bench/gpu_throughput.py $* =="
    timeout --kill-after=10 300 "$PY" -u bench/gpu_throughput.py "$@"
    local bench=$?
    [[ $bench -eq 124 ]] && echo "gpu_check: the throughput bench stopped after 300 s (timeout)" >&2

    echo; echo "== gpu_check: agreement tests exit status $tests, throughput bench exit status $bench =="
    [[ $tests -ne 0 ]] && return "$tests"
    return "$bench"
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
