"""Data-area fixtures: the toy corpora prepared once per session (both corpora into one manifest dir)."""
import os

import pytest


@pytest.fixture(scope="session")
def toy_index(toy_corpus_dir):
    import json

    with open(os.path.join(toy_corpus_dir, "toy_corpora.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def toy_manifests(toy_index, tmp_path_factory):
    """Manifest dir with librisqa_* and covost2_* cuts of the session toy corpora."""
    from nemo_grpo.data.prepare_covost2 import prepare_covost2
    from nemo_grpo.data.prepare_librisqa import prepare_librisqa

    out = str(tmp_path_factory.mktemp("toy_manifests"))
    qa, st = toy_index["librisqa"], toy_index["covost2"]
    prepare_librisqa(qa["train_json"], qa["test_json"], qa["librispeech_root"], out, seed=0)
    prepare_covost2(st["covost_tsv"], st["validated_tsv"], st["clips_dir"], out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer_config(tiny_model_dir):
    from transformers import AutoConfig, AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir), AutoConfig.from_pretrained(tiny_model_dir)
