"""The training schema: unknown keys / bad types / bad ranges raise ValueError naming the key; hydra overrides."""
import os

import pytest

from nemo_grpo.train.config import TrainConfig, load_config, validate

BASE = {"model": {"path": "/x"}}


def test_defaults_are_the_papers():
    cfg = validate(BASE)
    assert isinstance(cfg, TrainConfig)
    g = cfg.grpo
    assert (g.num_generations, g.beta, g.epsilon, g.temperature, g.top_p, g.max_new_tokens) == (8, 0.02, 0.2, 1.0,
                                                                                                 1.0, 200)
    assert (cfg.eval.top_p, cfg.eval.temperature) == (0.9, 0.9)
    assert g.loss_type == "dapo"


@pytest.mark.parametrize("raw,key", [
    ({"model": {"path": "/x", "pth": 1}}, "model.pth"),
    ({**BASE, "grpo": {"num_generation": 8}}, "grpo.num_generation"),
    ({**BASE, "trainr": {}}, "trainr"),
    ({**BASE, "logging": {"wandb": {"projekt": "a"}}}, "logging.wandb.projekt"),
])
def test_unknown_keys_are_named(raw, key):
    with pytest.raises(ValueError, match=f"'{key}'"):
        validate(raw)


@pytest.mark.parametrize("raw,key", [
    ({**BASE, "algorithm": "ppo"}, "algorithm"),
    ({**BASE, "grpo": {"num_generations": "eight"}}, "grpo.num_generations"),
    ({**BASE, "grpo": {"num_generations": 2.5}}, "grpo.num_generations"),
    ({**BASE, "grpo": {"beta": -0.1}}, "grpo.beta"),
    ({**BASE, "grpo": {"top_p": 0.0}}, "grpo.top_p"),
    ({**BASE, "optim": {"betas": [0.9]}}, "optim.betas"),
    ({**BASE, "optim": {"warmup_ratio": 1.5}}, "optim.warmup_ratio"),
    ({**BASE, "trainer": {"max_steps": 0}}, "trainer.max_steps"),
    ({**BASE, "model": {"path": "/x", "backend": "jax"}}, "model.backend"),
    ({**BASE, "algorithm": "mp_grpo", "grpo": {"num_generations": 2}}, "grpo.num_generations"),
    ({}, "model.path"),
    ({**BASE, "resume": "/no/such/ckpt"}, "resume"),
])
def test_bad_values_are_named(raw, key):
    with pytest.raises(ValueError, match=f"'{key}'"):
        validate(raw)


def test_int_accepted_for_float_and_list_for_tuple():
    cfg = validate({**BASE, "optim": {"lr": 1, "betas": [0.9, 0.95]}})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.9, 0.95)


def _write(d, name, text):
    os.makedirs(os.path.dirname(os.path.join(d, name)) or d, exist_ok=True)
    with open(os.path.join(d, name), "w") as f:
        f.write(text)


def test_hydra_composition_and_overrides(tmp_path):
    d = str(tmp_path)
    _write(d, "base.yaml", "seed: 3\ngrpo:\n  beta: 0.02\n")
    _write(d, "model/small.yaml", "path: /small\n")
    _write(d, "model/big.yaml", "path: /big\nbackend: megatron\ntensor_parallel_size: 4\n")
    _write(d, "recipe.yaml", "defaults:\n  - base\n  - model: small\n  - _self_\nalgorithm: mp_grpo\n")
    cfg = load_config(os.path.join(d, "recipe.yaml"))
    assert (cfg.seed, cfg.model.path, cfg.algorithm, cfg.grpo.beta) == (3, "/small", "mp_grpo", 0.02)
    # a group choice, a key the YAML sets, a key the YAML never mentions (schema default), a nested list
    cfg = load_config(os.path.join(d, "recipe.yaml"),
                      ["model=big", "grpo.beta=0.04", "trainer.max_steps=7", "optim.betas=[0.8,0.9]"])
    assert (cfg.model.path, cfg.model.backend, cfg.model.tensor_parallel_size) == ("/big", "megatron", 4)
    assert (cfg.grpo.beta, cfg.trainer.max_steps, cfg.optim.betas) == (0.04, 7, (0.8, 0.9))
    with pytest.raises(ValueError, match="'trainer.max_stepz'"):
        load_config(os.path.join(d, "recipe.yaml"), ["trainer.max_stepz=7"])
    with pytest.raises(ValueError, match="model"):
        load_config(os.path.join(d, "recipe.yaml"), ["model=nonexistent"])
    with pytest.raises(ValueError, match="not key=value"):
        load_config(os.path.join(d, "recipe.yaml"), ["trainer.max_steps"])


@pytest.mark.parametrize("precision,device,want", [
    ("auto", "cpu", "sampled"), ("auto", "cuda", "recompute"), ("fp32", "cpu", "sampled"),
    ("fp32", "cuda", "sampled"), ("bf16", "cpu", "recompute"), ("bf16", "cuda", "recompute"),
])
def test_old_logprobs_auto_follows_the_effective_precision(precision, device, want):
    """grpo.old_logprobs auto: recompute under bf16 (model.precision bf16 anywhere, auto on GPU), else sampled;
    an explicit choice is kept whatever the precision."""
    import torch

    from nemo_grpo.train.config import resolve_old_logprobs
    from nemo_grpo.train.runtime import use_bf16

    cfg = validate({"model": {"path": "/x", "precision": precision}})
    assert cfg.grpo.old_logprobs == "auto" and cfg.grpo.tis_cap is None
    bf16 = use_bf16(precision, torch.device(device))
    assert resolve_old_logprobs(cfg.grpo, bf16) == want
    for mode in ("sampled", "recompute"):
        assert resolve_old_logprobs(validate({**BASE, "grpo": {"old_logprobs": mode}}).grpo, bf16) == mode


def test_tis_cap_needs_recompute(tmp_path):
    """grpo.tis_cap weights by the trainer's log-prob before the update over the sampler's: without a recompute pass
    there is none. Explicit sampled fails at validation; auto resolved to sampled (fp32) when training starts,
    before any model is built."""
    from nemo_grpo.train.config import resolve_old_logprobs
    from nemo_grpo.train.grpo import train_grpo

    with pytest.raises(ValueError, match="'grpo.tis_cap'"):
        validate({**BASE, "grpo": {"old_logprobs": "sampled", "tis_cap": 2.0}})
    with pytest.raises(ValueError, match="'grpo.tis_cap'"):
        validate({**BASE, "grpo": {"tis_cap": 0.0}})
    with pytest.raises(ValueError, match="'grpo.old_logprobs'"):
        validate({**BASE, "grpo": {"old_logprobs": "vllm"}})
    auto = validate({**BASE, "grpo": {"tis_cap": 2.0}}).grpo
    assert resolve_old_logprobs(auto, bf16=True) == "recompute"
    with pytest.raises(ValueError, match="'grpo.tis_cap'"):
        resolve_old_logprobs(auto, bf16=False)
    fp32 = validate({"model": {"path": str(tmp_path / "never_built"), "precision": "fp32"},
                     "grpo": {"tis_cap": 2.0}})
    with pytest.raises(ValueError, match="'grpo.tis_cap'"):
        train_grpo(fp32)
