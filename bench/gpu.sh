#!/usr/bin/env bash
# One command for a GPU: install fastspec (with its test and spender extras) into a venv, then run
# bench/gpu.py — the CUDA tests, the kernel, encode and training benchmarks — with any options given here:
#
#     bench/gpu.sh                      # results in bench/results/gpu-<card>.json and .md
#     bench/gpu.sh --budget-s 600       # options go to bench/gpu.py (see python bench/gpu.py --help)
#
# The venv is .venv-gpu (FASTSPEC_GPU_VENV to change it), installed once: torch 2.13.0 from PyPI (its CUDA
# build on a Linux x86-64 machine) with triton 3.7.1, the pins CI uses. Offline machines: put wheels in .whl/
# (pip download) — then the venv sees the system's packages (a preinstalled CUDA torch, say) and installs what
# is missing from .whl/ only. FASTSPEC_GPU_PYTHON=/path/to/python skips the install and runs with that Python.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${FASTSPEC_GPU_PYTHON:-}" ]; then
    PY=$FASTSPEC_GPU_PYTHON
else
    VENV=${FASTSPEC_GPU_VENV:-.venv-gpu}
    PY=$VENV/bin/python
    STAMP=$VENV/.fastspec-gpu-installed
    if [ ! -f "$STAMP" ]; then
        if [ -d .whl ]; then
            python3 -m venv --system-site-packages "$VENV"
            "$PY" -m pip install -q --no-index --find-links .whl --no-build-isolation -e '.[test,spender]'
        else
            python3 -m venv "$VENV"
            "$PY" -m pip install -q --upgrade pip
            "$PY" -m pip install -q torch==2.13.0 triton==3.7.1 -e '.[test,spender]'
        fi
        touch "$STAMP"
    fi
fi
exec "$PY" bench/gpu.py "$@"
