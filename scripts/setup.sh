#!/usr/bin/env bash
# One-time setup on a CPU machine: system packages, a virtual env in .venv, this package with test extras.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v espeak-ng >/dev/null 2>&1 || ! command -v ffmpeg >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  # espeak-ng: the speech source of the toy corpora; ffmpeg: mp3 encode/decode for CoVoST-style clips.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq espeak-ng ffmpeg >/dev/null
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
if ! python -c "import nemo_grpo, trl, megatron.core" >/dev/null 2>&1; then
  python -m pip install -q --upgrade pip
  # CPU torch FIRST and pinned: otherwise NeMo / megatron-core resolve a multi-GB CUDA build.
  python -m pip install -q -c constraints.txt torch==2.13.0 \
    || python -m pip install -q -c constraints.txt torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
  python -m pip install -q -c constraints.txt -e ".[test]"
fi
python -m pip check >/dev/null || python -m pip check || true
