#!/usr/bin/env bash
# The GPU check in one call on a lent GPU machine (Python 3.12, torch, torchvision, pyyaml, matplotlib, tqdm
# there; no deepspeed, no wandb, no package registry): wheels carried in .whl/ are installed into /tmp/site
# when present, the project is put on PYTHONPATH (nothing to install), CUBLAS_WORKSPACE_CONFIG is set
# before torch starts, the output is flushed per section and written to $OUT/gpu_check.txt when $OUT is set.
# Under 5 minutes on one GPU.  Here, on any CPU: bash benchmarks/gpu_device.sh --smoke
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8 WANDB_MODE=disabled
PY=python3
[ -x .venv/bin/python ] && [ -z "${OUT:-}" ] && PY=.venv/bin/python      # here: the project's environment
# The one package the project imports that the lent machine lacks (checked there: Python 3.12, torch 2.11):
# xxhash, the checkpoint's hash. Without it section 2 stopped on "No module named 'xxhash'".
if ! "$PY" -c "import xxhash" 2>/dev/null; then
    echo "gpu_device.sh: python module xxhash is missing; carry its wheel in .whl (docs/benchmarks.md, The GPU check, step 1)" >&2
    exit 2
fi
if [ -n "${OUT:-}" ]; then
    "$PY" benchmarks/gpu_check.py "$@" 2>&1 | tee "$OUT/gpu_check.txt"
else
    "$PY" benchmarks/gpu_check.py "$@"
fi
