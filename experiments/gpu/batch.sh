#!/usr/bin/env bash
# Aggregate tokens/s, joules per token and the tail against batch size (issue #24), on one
# NVIDIA GPU: every mode with a fast path, the fast path at batch 1, 4, 16 and 64, synthetic
# weights, forced tokens after the article's five prompts (cycled to fill a batch).
#   STORE=/some/dir bash experiments/gpu/batch.sh 7b | 40b [OVERRIDE...]
# COMPILE=true compiles each step before capture (minutes per model and batch); the default
# captures the plain step (seconds), so a whole grid fits one machine start.
# BACKENDS="torchao" (any of bitsandbytes torchao hqq; default all) runs those modes alone.
# Modes: bf16, nf4, LLM.int8 at threshold 0 (at its default 6 it syncs with the host: no graph),
# torchao int4 (group 64) and float8 with dynamic activations, and on 7B HQQ 4-bit (tinygemm, as
# torchao's int4).
set -uo pipefail
store=${STORE:-$PWD/mlruns}
mkdir -p "$store"
export PYTHONWARNINGS=ignore MLFLOW_TRACKING_URI="sqlite:///$store/mlflow.db" HF_HUB_OFFLINE=1 CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
size=${1:?say 7b or 40b}; shift
case $size in
  7b)  tokens=64 repetitions=2 ;;
  40b) tokens=32 repetitions=1 ;;
  *)   echo "batch.sh: $size is not a model here; choose 7b or 40b" >&2; exit 2 ;;
esac
sweep() {  # batch_size last: the sweep varies it fastest, so each mode's model is loaded once
  python -m falcon_exp -m tracking.experiment=falcon-batch-$size model=falcon-$size-instruct model.weights=synthetic \
    quality.enabled=false max_length=null max_new_tokens=$tokens repetitions=$repetitions warmup=1 \
    generation.fast=true generation.compile=${COMPILE:-false} "$@" batch_size=${BATCHES:-1,4,16,64}
}
chosen=" ${BACKENDS:-bitsandbytes torchao hqq} "
for name in $chosen; do
  case $name in bitsandbytes|torchao|hqq) ;; *) echo "batch.sh: BACKENDS=$name: choose from bitsandbytes torchao hqq (spaces between)" >&2; exit 2 ;; esac
done
[[ $chosen == *" bitsandbytes "* ]] && sweep "$@" bits=16,4,8 quantization.bitsandbytes.int8_threshold=0
[[ $chosen == *" torchao "* ]] && sweep "$@" quantization.backend=torchao bits=4,8 quantization.torchao.eight_bit=float8_dynamic
[[ $chosen == *" hqq "* && $size == 7b ]] && sweep "$@" quantization.backend=hqq bits=4
python -m falcon_exp.analysis --experiment falcon-batch-$size --sweep all --out "$store/analysis-$size"
