#!/usr/bin/env bash
# Eager against fast decoding on one NVIDIA GPU, against the bandwidth floor (issue #7).
# Synthetic weights (no hub needed), forced tokens after each of the article's five prompts
# (64 for 7B, 32 for 40B, whose int8 load and decode take minutes).
#   STORE=/some/dir bash experiments/gpu/roofline.sh bench | matmuls | 7b [OVERRIDE...] | 40b [OVERRIDE...]
# `matmuls`: Falcon-7B's fast bf16 step split into its matmuls and the rest, then every 4- and
# 8-bit mode's matmuls alone (experiments/benchmarks/decode.py, sections 3 and 4).
# e.g. `7b bits=8 quantization.bitsandbytes.int8_threshold=0`; without overrides 7B runs bits=16,4,8, 40B bits=4,8.
# FAST=true (or false) runs one decode path instead of both.
set -uo pipefail
store=${STORE:-$PWD/mlruns}
mkdir -p "$store"
export PYTHONWARNINGS=ignore MLFLOW_TRACKING_URI="sqlite:///$store/mlflow.db" HF_HUB_OFFLINE=1 CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
sweep() {
  python -m falcon_exp -m tracking.experiment=falcon-roofline model.weights=synthetic quality.enabled=false \
    max_length=null generation.fast=${FAST:-false,true} "$@"
}
what=${1:?say what to run}; shift
case $what in
  bench) python experiments/benchmarks/decode.py --model falcon-7b-instruct --weights synthetic --bits 16 --rounds 5 ;;
  matmuls)
    bench=(python experiments/benchmarks/decode.py --model falcon-7b-instruct --weights synthetic --rounds 5)
    "${bench[@]}" --runs bits=16 --show floor matmuls --decoders fast
    "${bench[@]}" --show matmuls --runs bits=4 "bits=8 quantization.bitsandbytes.int8_threshold=0" \
      "bits=4 quantization.backend=torchao" "bits=8 quantization.backend=torchao" \
      "bits=8 quantization.backend=torchao quantization.torchao.eight_bit=float8" \
      "bits=8 quantization.backend=torchao quantization.torchao.eight_bit=float8_dynamic" \
      bits=8 ;;  # last: LLM.int8's outlier path syncs with the host, so its layers are timed without a graph
  7b)    sweep model=falcon-7b-instruct max_new_tokens=64 repetitions=2 warmup=1 "${@:-bits=16,4,8}" ;;
  40b)   sweep model=falcon-40b-instruct max_new_tokens=32 repetitions=1 warmup=1 "${@:-bits=4,8}" ;;
esac
