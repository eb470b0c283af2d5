#!/usr/bin/env bash
# Eager against fast decoding on one NVIDIA GPU, against the bandwidth floor (issue #7).
# Synthetic weights (no hub needed), forced tokens after each of the article's five prompts
# (64 for 7B, 32 for 40B, whose int8 load and decode take minutes).
#   STORE=/some/dir bash experiments/gpu/roofline.sh bench | 7b [OVERRIDE...] | 40b [OVERRIDE...]
# e.g. `7b bits=8 quantization.int8_threshold=0`; without overrides 7B runs bits=16,4,8, 40B bits=4,8.
set -uo pipefail
store=${STORE:-$PWD/mlruns}
mkdir -p "$store"
export PYTHONWARNINGS=ignore MLFLOW_TRACKING_URI="sqlite:///$store/mlflow.db" HF_HUB_OFFLINE=1 CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
sweep() {
  python -m falcon_exp -m tracking.experiment=falcon-roofline model.weights=synthetic quality.enabled=false \
    max_length=null generation.fast=false,true "$@"
}
what=${1:?say what to run}; shift
case $what in
  bench) python experiments/benchmarks/decode.py --model falcon-7b-instruct --weights synthetic --bits 16 --rounds 5 ;;
  7b)    sweep model=falcon-7b-instruct max_new_tokens=64 repetitions=2 warmup=1 "${@:-bits=16,4,8}" ;;
  40b)   sweep model=falcon-40b-instruct max_new_tokens=32 repetitions=1 warmup=1 "${@:-bits=4,8}" ;;
esac
