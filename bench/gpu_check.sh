#!/usr/bin/env bash
# seedlm's CUDA path end to end in one call of a few minutes (issue 12): bf16 pretraining MFU of GPT-2 124M,
# LoRA and 4-bit QLoRA SFT of a ~1.1B Llama created from config (tokens/s, peak memory vs the memory plan), and
# serving throughput. Details: bench/gpu_check.py. Results: bench/results/gpu_check-<time>.json (last line: JSON).
#
#   bench/gpu_check.sh                   on a GPU machine (the venv in .venv; bitsandbytes for QLoRA:
#                                        .venv/bin/pip install -c constraints.txt bitsandbytes==0.50.2)
#   bench/gpu_check.sh --dry             anywhere: the same steps at tiny sizes on CPU (QLoRA skipped without CUDA)
#   PYTHON=/path/to/python bench/gpu_check.sh --no-compile --results /tmp/out
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
if [[ ! -x "$PYTHON" ]]; then
  echo "gpu_check: $PYTHON not found; run 'make setup' or set PYTHON=/path/to/python" >&2
  exit 2
fi
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false MLFLOW_DISABLE_TELEMETRY=true
if [[ " $* " != *" --dry "* ]]; then
  "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "gpu_check: no CUDA device here; run it on a GPU machine, or add --dry to check the script on CPU" >&2
    exit 2
  }
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2
fi
exec "$PYTHON" bench/gpu_check.py "$@"
