"""Shared fixtures for the training tests: the real tiny HF policy and real prompt batches built from waveforms
(the toy manifests come from tests/conftest.py)."""
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




def tiny_overrides(model_dir, manifests, out_dir, **extra):
    """Overrides that make a conf/tiny_*.yaml recipe a seconds-long CPU run on the shared toy corpus."""
    ov = {"model.path": model_dir, "data.manifest_dir": manifests, "output_dir": out_dir,
          "data.train.batch_size": 4, "data.train.num_cuts_for_bins_estimate": 50, "data.valid.batch_size": 8,
          "data.test.batch_size": 16, "grpo.num_generations": 4, "grpo.max_new_tokens": 8,
          "eval.max_new_tokens": 8, "trainer.val_max_batches": 1, "logging.tensorboard": False,
          "logging.progress_bar": False, "logging.plot": False}
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]
