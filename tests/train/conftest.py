"""Shared fixtures for the training tests: the real tiny HF policy and real prompt batches built from waveforms."""
import pytest
import torch


@pytest.fixture(scope="module")
def tiny_policy(tiny_model_dir):
    from nemo_grpo.policy.hf import HFGraniteSpeechPolicy

    return HFGraniteSpeechPolicy.from_pretrained(tiny_model_dir)


def make_batch(policy, n=3, seed=0):
    """n prompts with different-length noise audio (the policy does not care what the audio says)."""
    from nemo_grpo.policy.inputs import build_prompt_batch

    g = torch.Generator().manual_seed(seed)
    waves = [0.1 * torch.randn(8000 + 1600 * i, generator=g) for i in range(n)]
    refs = ["the red box is on the left", "die Nummer ist drei eins vier", "a blue ball"][:n]
    return build_prompt_batch(policy.tokenizer, waves, ["<|audio|> answer the question"] * n, refs,
                              [f"u{i}" for i in range(n)], policy.config)
