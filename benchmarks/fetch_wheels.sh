#!/usr/bin/env bash
# Download the megatron-core wheels gpu_check.sh installs on a GPU machine without network (one per CPython
# 3.10-3.12, ~2.6 MB each; megatron-core 0.16.1, the newest that supports 3.10/3.11). Never TE or apex.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks/wheels
for v in 3.10 3.11 3.12; do
  python3 -m pip download --quiet megatron-core==0.16.1 --no-deps --only-binary=:all: \
    --python-version "$v" --platform manylinux_2_28_x86_64 -d benchmarks/wheels
done
ls -la benchmarks/wheels
