#!/usr/bin/env bash
# The Falcon measurements of experiments/README.md, on a machine with NVIDIA GPUs. Synthetic
# weights (no hub needed), the article's setting and ours, all in one SQLite store.
#   STORE=/some/dir bash experiments/gpu/falcon.sh 40b-int8 | 40b-rest | 7b | tiny
set -uo pipefail
store=${STORE:-$PWD/mlruns}
mkdir -p "$store"
export MLFLOW_TRACKING_URI="sqlite:///$store/mlflow.db" HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$store/gpus.csv"
run() { python -m falcon_exp -m tracking.experiment=falcon-gpu model.weights=synthetic preset=article,recommended "$@"; }
case ${1:?say what to run} in
  tiny)      python -m falcon_exp -m model=tiny-falcon bits=4,8,16 max_length=40 tracking.experiment=falcon-gpu-smoke ;;
  40b-int8)  CUDA_VISIBLE_DEVICES=0 run model=falcon-40b-instruct bits=8 ;;  # loaded once for both settings
  40b-rest)  CUDA_VISIBLE_DEVICES=0 run model=falcon-40b-instruct bits=4
             run model=falcon-40b-instruct bits=16 ;;  # bf16 (83 GB) over every visible GPU
  7b)        CUDA_VISIBLE_DEVICES=0 run model=falcon-7b-instruct bits=8,16,4 ;;
esac
