#!/usr/bin/env bash
# Eager against fast decoding on one NVIDIA GPU, against the bandwidth floor (issue #7).
# Synthetic weights (no hub needed), 64 forced tokens after each of the article's five prompts.
#   STORE=/some/dir bash experiments/gpu/roofline.sh bench | 7b | 40b
set -uo pipefail
store=${STORE:-$PWD/mlruns}
mkdir -p "$store"
export PYTHONWARNINGS=ignore MLFLOW_TRACKING_URI="sqlite:///$store/mlflow.db" HF_HUB_OFFLINE=1 CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
sweep() {
  python -m falcon_exp -m tracking.experiment=falcon-roofline model.weights=synthetic quality.enabled=false \
    max_length=null max_new_tokens=64 generation.fast=false,true "$@"
}
case ${1:?say what to run} in
  bench) python experiments/benchmarks/decode.py --model falcon-7b-instruct --weights synthetic --bits 16 --rounds 5 ;;
  7b)    sweep model=falcon-7b-instruct bits=16,4,8 repetitions=2 warmup=1 ;;
  40b)   sweep model=falcon-40b-instruct bits=4,8 repetitions=1 warmup=1 ;;
esac
