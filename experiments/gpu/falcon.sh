#!/usr/bin/env bash
# The Falcon measurements of experiments/README.md, on a machine with one or more NVIDIA GPUs.
# Synthetic weights (no hub needed); everything lands in one SQLite store under $OUT.
#   OUT=/some/folder bash experiments/gpu/falcon.sh [40b|7b|tiny]
set -uo pipefail
: "${OUT:?set OUT to a folder for the store and logs}"
export MLFLOW_TRACKING_URI="sqlite:///$OUT/mlflow.db" HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpus.csv"
what=${1:-40b}
synthetic=(model.weights=synthetic tracking.experiment=falcon-gpu)
case $what in
  tiny)  # a smoke test of the CUDA path
    python -m falcon_exp -m model=tiny-falcon bits=4,8,16 max_length=40 tracking.experiment=falcon-gpu-smoke ;;
  7b)    # Falcon-7B in 4, 8 and 16 bits, the article's setting and ours, on one GPU
    CUDA_VISIBLE_DEVICES=0 python -m falcon_exp -m model=falcon-7b-instruct "${synthetic[@]}" bits=8,16,4 experiment=article,recommended ;;
  40b)   # Falcon-40B 4- and 8-bit on one GPU (int8 loaded once for both settings), bf16 over all GPUs
    CUDA_VISIBLE_DEVICES=0 python -m falcon_exp -m model=falcon-40b-instruct "${synthetic[@]}" bits=8,4 experiment=article,recommended
    python -m falcon_exp -m model=falcon-40b-instruct "${synthetic[@]}" bits=16 experiment=article,recommended ;;
esac
