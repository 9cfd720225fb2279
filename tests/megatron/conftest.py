"""Fixtures of the megatron tests: lhotse manifests of the shared toy corpora (for the tiny GRPO recipe)."""
import json
import os

import pytest


@pytest.fixture(scope="session")
def megatron_toy_manifests(toy_corpus_dir, tmp_path_factory):
    """The real prepare code over the session's toy corpora -> a manifest dir for conf/data/toy.yaml."""
    from nemo_grpo.data.prepare_covost2 import prepare_covost2
    from nemo_grpo.data.prepare_librisqa import prepare_librisqa

    with open(os.path.join(toy_corpus_dir, "toy_corpora.json")) as f:
        idx = json.load(f)
    out = str(tmp_path_factory.mktemp("megatron_toy_manifests"))
    q, c = idx["librisqa"], idx["covost2"]
    prepare_librisqa(q["train_json"], q["test_json"], q["librispeech_root"], out, seed=0, num_jobs=1)
    prepare_covost2(c["covost_tsv"], c["validated_tsv"], c["clips_dir"], out, num_jobs=1)
    return out
