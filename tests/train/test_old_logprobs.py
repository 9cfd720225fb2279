"""log pi_old under bf16 (``grpo.old_logprobs``, ``grpo.tis_cap``), through the recipe's own ``grpo_step`` on real
policies in bf16 autocast on CPU (``model.precision: bf16``).

The KV-cache sampler and the training forward run different kernels on different shapes, so in bf16 their
log-probs of the same tokens differ at rounding level: with the sampler's numbers as log pi_old the first PPO ratio
at mu = 1 is not 1. The recompute pass scores the rollout with exactly the training forward, so it is."""
import pytest
import torch

from nemo_grpo.policy.hf import HFGraniteSpeechPolicy
from nemo_grpo.rewards import build_reward
from nemo_grpo.train.config import validate
from nemo_grpo.train.grpo import grpo_step, loss_config
from tests.train.test_grpo_step import LIVE, StepHarness, _batch

G = 4


def _cfg(model_dir, precision, algorithm="grpo", micro_batch_size=3, **grpo):
    # micro-batches of 3 over 2 x 4 completions: the recompute must reuse the training forward's uneven slicing
    return validate({"algorithm": algorithm,
                     "model": {"path": model_dir, "device": "cpu", "precision": precision},
                     "grpo": {"num_generations": G, "beta": 0.0, "max_new_tokens": 8, **grpo},
                     "optim": {"lr": 1e-3, "schedule": "constant"},
                     "trainer": {"max_steps": 10, "micro_batch_size": micro_batch_size, "val_every": 0,
                                 "save_every": 0}})


def _step(policy, cfg, refs=(LIVE, "the green table")):
    s = StepHarness(cfg, policy, [])
    metrics, _ = grpo_step(s, _batch(policy, list(refs), "a"), build_reward([{"name": "chrf"}]), None,
                           loss_config(cfg))
    return s, metrics


@pytest.fixture()
def policy(tiny_model_dir):
    torch.manual_seed(0)
    return HFGraniteSpeechPolicy.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("algorithm", ["grpo", "mp_grpo"])
def test_recompute_makes_the_first_bf16_ratio_exactly_one(policy, tiny_model_dir, algorithm):
    """bf16, old_logprobs auto (-> recompute), mu = 1: every on-policy ratio is exactly 1, nothing clipped, while
    the sampler's log-probs do differ (the mismatch it removes). MP-GRPO: the reference members (no sampler,
    log-prob 0 by convention, about -5 under the policy) stay out of the mismatch and keep their off-policy term."""
    cfg = _cfg(tiny_model_dir, "bf16", algorithm)
    assert cfg.grpo.old_logprobs == "auto"
    s, m = _step(policy, cfg)
    assert s.bf16 and "old_logprobs" in s.timers
    assert (m["loss/on/ratio_mean"], m["loss/on/ratio_max"]) == (1.0, 1.0)
    assert m["loss/on/clip_low"] == 0.0 and m["loss/on/clip_high"] == 0.0
    assert 0 < m["rollout/logprob_diff_mean"] <= m["rollout/logprob_diff_max"] < 1e-2
    if algorithm == "mp_grpo":
        assert m["loss/off/num_tokens"] > 0 and 0 < m["loss/off/ratio_mean"] < 1  # pi_theta of the reference


def test_sampled_log_probs_carry_the_bf16_mismatch(policy, tiny_model_dir):
    """old_logprobs sampled: the mismatch is logged from the first update's forward (no extra pass). In bf16 it is
    well above fp32 rounding, and the first ratio is then not 1; in fp32 the sampler agrees to ~1e-7."""
    init = {k: v.clone() for k, v in policy.model.state_dict().items()}
    _, fp32 = _step(policy, _cfg(tiny_model_dir, "fp32"))
    policy.model.load_state_dict(init)
    s, bf16 = _step(policy, _cfg(tiny_model_dir, "bf16", old_logprobs="sampled"))
    assert "old_logprobs" not in s.timers
    assert fp32["rollout/logprob_diff_max"] < 2e-6
    assert bf16["rollout/logprob_diff_max"] > 10 * max(fp32["rollout/logprob_diff_max"], 1e-7)
    assert bf16["loss/on/ratio_max"] != 1.0


def test_truncated_is_in_the_step(policy, tiny_model_dir):
    """grpo.tis_cap with the recompute: the weights min(exp(recomputed - sampled), cap) are ~1 (bf16 rounding) and
    logged; with a cap below 1 every token is clipped to it (and the ratio stays exactly 1)."""
    _, m = _step(policy, _cfg(tiny_model_dir, "bf16", tis_cap=2.0))
    assert m["loss/on/tis_weight_mean"] == pytest.approx(1.0, abs=1e-3) and m["loss/on/tis_clip_frac"] == 0.0
    _, m = _step(policy, _cfg(tiny_model_dir, "bf16", tis_cap=0.5))
    assert m["loss/on/tis_weight_mean"] == 0.5 and m["loss/on/tis_clip_frac"] == 1.0
    assert m["loss/on/ratio_max"] == 1.0


@pytest.fixture(scope="module")
def preset_policy(preset_2b_dir):
    """granite-speech-3.3-2b shapes (vocab 49160, hidden 2048, real multipliers, audio LoRA), LLM 2 layers; only
    the projector trains, so the optimizer step stays small."""
    return HFGraniteSpeechPolicy.from_pretrained(preset_2b_dir, train_llm=False)


@pytest.mark.integration
def test_preset_2b_bf16_recompute_ratio_is_one_and_sampled_mismatch_is_logged(preset_policy, preset_2b_dir):
    """At the released 2B shapes in bf16 (2 prompts, G = 2, 4 tokens, micro-batches of 3): with the recompute the
    first ratio is exactly 1 and the mismatch is logged well above fp32 rounding (measured ~2e-4 mean, ~1e-3
    max); with the sampler's log-probs the first ratio moves off 1 by that mismatch."""
    for mode in ("recompute", "sampled"):
        cfg = _cfg(preset_2b_dir, "bf16", micro_batch_size=3, num_generations=2, max_new_tokens=4,
                   old_logprobs=mode)
        _, m = _step(preset_policy, cfg)
        assert m["rollout/logprob_diff_max"] > 1e-4
        if mode == "recompute":
            assert (m["loss/on/ratio_mean"], m["loss/on/ratio_max"]) == (1.0, 1.0)
            assert m["loss/on/clip_low"] == 0.0 and m["loss/on/clip_high"] == 0.0
        else:
            assert m["loss/on/ratio_max"] != 1.0
