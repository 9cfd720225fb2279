"""Shared test setup: offline, single-threaded, seeded; session-scoped tiny artefacts built once."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Granite Speech checkpoint dir (HF format + offline BPE tokenizer)."""
    from nemo_grpo.policy.tiny import make_tiny

    out = tmp_path_factory.mktemp("tiny_granite_speech")
    make_tiny(str(out), seed=0)
    return str(out)


@pytest.fixture(scope="session")
def toy_corpus_dir(tmp_path_factory):
    """Small espeak-ng corpora in the real LibriSQA and CoVoST2 formats (see nemo_grpo.data.toy)."""
    from nemo_grpo.data.toy import make_toy_corpora

    out = tmp_path_factory.mktemp("toy_corpora")
    make_toy_corpora(str(out), seed=0, num_qa=24, num_st=24)
    return str(out)


@pytest.fixture(scope="session")
def toy_manifests(toy_corpus_dir, tmp_path_factory):
    """lhotse manifests of the session's toy corpora, written by the real prepare code (both corpora in one dir,
    usable as ``data.manifest_dir`` with conf/data/toy.yaml). Read-only for tests."""
    import json

    from nemo_grpo.data.prepare_covost2 import prepare_covost2
    from nemo_grpo.data.prepare_librisqa import prepare_librisqa

    with open(os.path.join(toy_corpus_dir, "toy_corpora.json"), encoding="utf-8") as f:
        idx = json.load(f)
    out = str(tmp_path_factory.mktemp("toy_manifests"))
    q, c = idx["librisqa"], idx["covost2"]
    prepare_librisqa(q["train_json"], q["test_json"], q["librispeech_root"], out, seed=0, num_jobs=1)
    prepare_covost2(c["covost_tsv"], c["validated_tsv"], c["clips_dir"], out, num_jobs=1)
    return out


@pytest.fixture(scope="session")
def preset_2b_dir(tmp_path_factory):
    """The released granite-speech-3.3-2b's properties (nemo_grpo.policy.presets): widths, heads, vocab 49160 with
    pad == eos and <|audio|> last, dropouts 0.1, audio LoRA r 64, bf16 weights; LLM 2 layers, encoder 1 layer
    (~0.28 B parameters, 0.56 GB on disk)."""
    from nemo_grpo.policy.presets import make_preset

    out = tmp_path_factory.mktemp("granite_speech_3.3_2b_preset")
    return make_preset(str(out), "granite-speech-3.3-2b", llm_layers=2, encoder_layers=1, seed=0)


@pytest.fixture(scope="session")
def preset_8b_dir(tmp_path_factory):
    """The released granite-speech-3.3-8b's properties (head_dim 128, 4096 wide, ffn 12800, logits_scaling 16);
    LLM 1 layer, encoder 1 layer (~0.46 B parameters, 0.92 GB on disk)."""
    from nemo_grpo.policy.presets import make_preset

    out = tmp_path_factory.mktemp("granite_speech_3.3_8b_preset")
    return make_preset(str(out), "granite-speech-3.3-8b", llm_layers=1, encoder_layers=1, seed=0)
