"""Shared body of the hydra entry scripts: validate the composed config and run its recipe."""
from omegaconf import OmegaConf


def run(cfg) -> dict:
    from nemo_grpo.train.cmd import run_config
    from nemo_grpo.train.config import validate

    raw = OmegaConf.to_container(cfg, resolve=True)
    raw.pop("hydra", None)
    return run_config(validate(raw))
