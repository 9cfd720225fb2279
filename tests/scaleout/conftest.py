"""Fixtures of the scale-out tests: lhotse manifests of the session's toy corpora (the real prepare code)."""
import json
import os

import pytest


@pytest.fixture(scope="session")
def scaleout_toy_manifests(toy_corpus_dir, tmp_path_factory):
    """``nemo_grpo.data`` prepare over the toy corpora -> a manifest dir usable as ``data.manifest_dir``."""
    from nemo_grpo.data.prepare_covost2 import prepare_covost2
    from nemo_grpo.data.prepare_librisqa import prepare_librisqa

    with open(os.path.join(toy_corpus_dir, "toy_corpora.json")) as f:
        idx = json.load(f)
    out = str(tmp_path_factory.mktemp("scaleout_toy_manifests"))
    q, c = idx["librisqa"], idx["covost2"]
    prepare_librisqa(q["train_json"], q["test_json"], q["librispeech_root"], out, seed=0, num_jobs=1)
    prepare_covost2(c["covost_tsv"], c["validated_tsv"], c["clips_dir"], out, num_jobs=1)
    return out
