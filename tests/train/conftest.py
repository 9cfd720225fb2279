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


@pytest.fixture(scope="session")
def toy_manifests(toy_corpus_dir, tmp_path_factory):
    """lhotse manifests of the shared toy corpora (the real prepare code), for conf/data/toy.yaml."""
    import json
    import os

    from nemo_grpo.data.prepare_covost2 import prepare_covost2
    from nemo_grpo.data.prepare_librisqa import prepare_librisqa

    with open(os.path.join(toy_corpus_dir, "toy_corpora.json")) as f:
        idx = json.load(f)
    out = str(tmp_path_factory.mktemp("toy_manifests"))
    q, c = idx["librisqa"], idx["covost2"]
    prepare_librisqa(q["train_json"], q["test_json"], q["librispeech_root"], out, seed=0, num_jobs=1)
    prepare_covost2(c["covost_tsv"], c["validated_tsv"], c["clips_dir"], out, num_jobs=1)
    return out


def tiny_overrides(model_dir, manifests, out_dir, **extra):
    """Overrides that make a conf/tiny_*.yaml recipe a seconds-long CPU run on the shared toy corpus."""
    ov = {"model.path": model_dir, "data.manifest_dir": manifests, "output_dir": out_dir,
          "data.train.batch_size": 4, "data.train.num_cuts_for_bins_estimate": 50, "data.valid.batch_size": 8,
          "data.test.batch_size": 16, "grpo.num_generations": 4, "grpo.max_new_tokens": 8,
          "eval.max_new_tokens": 8, "trainer.val_max_batches": 1, "logging.tensorboard": False,
          "logging.progress_bar": False, "logging.plot": False}
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]
