"""Data-area fixtures: the toy corpora prepared once per session (both corpora into one manifest dir)."""
import os

import pytest


@pytest.fixture(scope="session")
def toy_index(toy_corpus_dir):
    import json

    with open(os.path.join(toy_corpus_dir, "toy_corpora.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def tiny_tokenizer_config(tiny_model_dir):
    from transformers import AutoConfig, AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir), AutoConfig.from_pretrained(tiny_model_dir)
