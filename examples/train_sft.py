"""NeMo-style (hydra) entry point for the SFT baseline recipes (any recipe works with --config-name).

    python examples/train_sft.py model.path=/ckpt/granite-speech-3.3-2b data.manifest_dir=data/librisqa/manifests
    python examples/train_sft.py --config-name sft_covost2_2b model.path=... data.manifest_dir=...
    torchrun --nproc_per_node=4 examples/train_sft.py --config-name sft_librisqa_8b model.path=...

Plain hydra semantics: keys that the recipe YAML does not mention need ``++key=value`` (``nemo-grpo train`` adds the
``++`` itself). The composed config is validated by ``nemo_grpo.train.config`` exactly as ``nemo-grpo train`` does.
"""
import os
import sys

from nemo.core.config import hydra_runner

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _run import run  # noqa: E402


@hydra_runner(config_path="../conf", config_name="sft_librisqa_2b")
def main(cfg) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
