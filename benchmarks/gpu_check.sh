#!/usr/bin/env bash
# GPU check of the megatron-core backend (and the HF backend beside it): ONE command, <= 8 minutes on one H100,
# no network. Times a train step and a rollout of a 2B-shaped random Granite Speech in bf16 (HF and megatron, with
# bf16 parity checks: generate vs score on left-padded prompts, megatron vs HF log-probs; MFU) and writes
# $OUT/gpu_check.json (see benchmarks/bench_gpu.py for what is measured and how MFU is counted).
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine (OUT defaults to benchmarks/results/gpu_check)
#   bash benchmarks/gpu_check.sh --smoke    # tiny model, CPU ok: checks the script itself
#
# megatron-core: used when importable; otherwise installed (--no-deps, --no-index) from a wheel for this Python in
# benchmarks/wheels/ (bring it along: `bash benchmarks/fetch_wheels.sh` where there is network) into a private
# target dir, so the machine's own packages are untouched. Transformer Engine and apex are never installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-benchmarks/results/gpu_check}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import megatron.core" >/dev/null 2>&1; then
  tag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  whl=$(ls benchmarks/wheels/megatron_core-*-"$tag"-*.whl 2>/dev/null | head -n 1 || true)
  if [ -z "$whl" ]; then
    echo "megatron-core is not importable and benchmarks/wheels/ has no wheel for $tag" >&2
    echo "(run benchmarks/fetch_wheels.sh where there is network, then bring benchmarks/wheels along)" >&2
    exit 2
  fi
  deps="${TMPDIR:-/tmp}/nemo_grpo_pydeps"
  "$PY" -m pip install --quiet --no-deps --no-index --target "$deps" "$whl"
  export PYTHONPATH="$PYTHONPATH:$deps"
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia_smi.csv" 2>/dev/null || true
# 470 s for the benchmark itself (bench_gpu.py skips backends not started by --deadline-s, default 400 s)
timeout 470 "$PY" benchmarks/bench_gpu.py --out "$OUT" "$@"
