#!/usr/bin/env bash
# One short GPU check (< 3 min): DDP training under torchrun, nproc 1, on CUDA/NCCL, then
# the same run on CPU/gloo; prints the interconnect found and samples/s GPU vs CPU.
# Run from the repository root on a single-GPU machine with the trainer extra installed:
#     bash trainer/gpu_check.sh            # JSON goes to $OUT/gpu-check.json or ./
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 170 "$PY" -m edgeloop.trainer.gpu_check
