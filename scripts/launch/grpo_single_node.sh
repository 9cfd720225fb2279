#!/usr/bin/env bash
# nemo_grpo on one node: torchrun --standalone over all its GPUs; DP = GPUs / model.tensor_parallel_size.
# The 8B recipes (TP=4) on one 4 x H100 node are the paper's setup (DP=1). Full guide: docs/scale_out.md.
#
#   scripts/launch/grpo_single_node.sh conf/grpo_librisqa_8b.yaml \
#       model.path=/ckpt/granite-speech-3.3-8b data.manifest_dir=/data/librisqa/manifests output_dir=/runs/grpo_8b
#
# GPUS=N overrides the GPU count (default: all that nvidia-smi lists). DRY_RUN=1 prints the command.
set -euo pipefail

CONFIG=${1:?usage: grpo_single_node.sh CONFIG.yaml [key=value overrides...]}
shift
if [ -z "${GPUS:-}" ]; then
  GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "$GPUS" -ge 1 ] || GPUS=1
fi
export CUDA_DEVICE_MAX_CONNECTIONS=1   # megatron: keeps TP communication ordered ahead of compute kernels
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1

LAUNCH=(torchrun --standalone --nnodes=1 --nproc_per_node="$GPUS" -m nemo_grpo.cli train --config "$CONFIG" "$@")
if [ -n "${DRY_RUN:-}" ]; then
  printf '%q ' "${LAUNCH[@]}"
  echo
  exit 0
fi
exec "${LAUNCH[@]}"
