"""build_reward specs, the weighted mix, errors naming the key, submit() on the worker pool."""
import sacrebleu
import pytest
import torch
from rouge_score import rouge_scorer

from nemo_grpo.rewards import EXPENSIVE, REWARDS, RewardResult, build_reward


def test_registered_names():
    assert set(REWARDS) >= {"bleu", "chrf", "rouge1", "rouge2", "rougeL", "meteor", "bertscore"}
    assert EXPENSIVE == {"meteor", "bertscore"}


@pytest.mark.parametrize("spec", ["bleu", {"bleu": 1.0}, {"bleu": {"weight": 1.0}}, ["bleu"], [{"name": "bleu"}],
                                  {"name": "bleu", "weight": 1}])
def test_spec_forms_are_equivalent(spec):
    rf = build_reward(spec)
    assert [(c.label, c.name, c.weight, c.options) for c in rf.components] == [("bleu", "bleu", 1.0, {})]


def test_weighted_mix_matches_libraries_and_keeps_components(group_batch):
    hyps, refs = group_batch("de", group_size=5)
    rf = build_reward([{"name": "bleu", "weight": 0.25, "tokenize": "intl"},
                       {"name": "rougeL", "weight": 0.75, "lang": "de", "use_stemmer": True}])
    res = rf(hyps, refs)
    assert isinstance(res, RewardResult) and list(res.components) == ["bleu", "rougeL"]
    bleu_lib = sacrebleu.BLEU(effective_order=True, tokenize="intl")
    rouge_lib = rouge_scorer.RougeScorer(["rougeL"], tokenizer=rf.components[1].fn.__globals__["rouge_tokenizer"](
        True, None, "de"))
    b = torch.tensor([bleu_lib.sentence_score(h, [r]).score / 100 for h, r in zip(hyps, refs)], dtype=torch.float32)
    rl = torch.tensor([rouge_lib.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)], dtype=torch.float32)
    assert res.total.shape == (len(hyps),) and res.total.dtype == torch.float32
    assert torch.equal(res.components["bleu"], b) and torch.equal(res.components["rougeL"], rl)
    torch.testing.assert_close(res.total, 0.25 * b + 0.75 * rl, rtol=0, atol=1e-7)
    logged = res.means()
    assert set(logged) == {"reward/total", "reward/bleu", "reward/rougeL"}
    assert logged["reward/bleu"] == pytest.approx(b.mean().item())
    # Use the library's German stemmer/tokenizer choice in the record: ROUGE stemming must be visible in logs.
    assert rf.describe()[1]["options"] == {"use_stemmer": True, "tokenizer": None, "lang": "de"}


def test_labels_allow_two_copies_and_dotted_path():
    rf = build_reward([{"name": "bleu"}, {"name": "nemo_grpo.rewards.lexical:bleu", "label": "bleu_intl",
                                          "tokenize": "intl", "weight": 0.0}])
    res = rf(["„ja“ sagte er"], ["ja sagte er"])
    assert set(res.components) == {"bleu", "bleu_intl"}
    assert res.components["bleu"] != res.components["bleu_intl"]  # the option reached the dotted-path function
    assert torch.equal(res.total, res.components["bleu"])


@pytest.mark.parametrize("spec,match", [
    ({"blue": 1.0}, "unknown reward 'blue'"),
    ([{"name": "bleu", "tokenise": "intl"}], r"reward\[0\].*unknown option 'tokenise'"),
    ([{"name": "bleu", "tokenize": "nope"}], r"reward\[0\].*tokenize"),
    ({"rougeL": {"weight": 1.0, "stem": True}}, r"reward.rougeL.*unknown option 'stem'"),
    ({"bleu": -1.0}, r"reward.bleu.weight"),
    ([{"weight": 1.0}], r"reward\[0\]: missing key 'name'"),
    (["bleu", "bleu"], r"reward\[1\].*duplicate component 'bleu'"),
    ([{"name": "bertscore", "model": "roberta-large"}], r"reward\[0\].*model"),
    ("os.path:does_not_exist", "cannot import"),
    (42, "expected a name, a mapping or a list"),
    ([], "at least one reward"),
])
def test_bad_specs_raise_value_error_naming_the_key(spec, match):
    with pytest.raises(ValueError, match=match):
        build_reward(spec)


def test_omegaconf_yaml_spec():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create("reward:\n  - {name: chrf, weight: 0.5}\n  - {name: rouge2, weight: 0.5, lang: de}\n")
    rf = build_reward(cfg.reward)
    assert [c.label for c in rf.components] == ["chrf", "rouge2"] and rf.weights == {"chrf": 0.5, "rouge2": 0.5}


def test_submit_returns_future_with_identical_result(tmp_path, group_batch):
    hyps, refs = group_batch("en", group_size=4)
    with build_reward([{"name": "bleu", "weight": 0.5},
                       {"name": "meteor", "weight": 0.5, "cache_dir": str(tmp_path)}]) as rf:
        assert rf.expensive
        fut = rf.submit(hyps, refs)
        direct = rf(hyps, refs)
        res = fut.result(timeout=120)
    assert torch.equal(res.total, direct.total)
    assert all(torch.equal(res.components[k], direct.components[k]) for k in direct.components)
    assert rf._pool is None  # closed by the context manager
    with pytest.raises(ValueError, match="hypotheses"):
        build_reward("bleu").submit(["a"], [])
