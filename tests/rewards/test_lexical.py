"""BLEU/chrF (sacrebleu) and ROUGE (rouge-score): our grouped path == the library called on each pair, exactly."""
import random

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from nemo_grpo.rewards import bleu, chrf, rouge1, rouge2, rouge_tokenizer, rougeL
from nemo_grpo.rewards.lexical import UnicodeRougeTokenizer


@pytest.mark.parametrize("tokenize", ["13a", "intl"])
def test_bleu_equals_sacrebleu_sentence_score(lang_batch, tokenize):
    _, hyps, refs = lang_batch
    metric = sacrebleu.BLEU(effective_order=True, tokenize=tokenize)
    expected = [metric.sentence_score(h, [r]).score / 100 for h, r in zip(hyps, refs)]
    got = bleu(hyps, refs, tokenize=tokenize)
    assert got == expected
    # sacrebleu itself returns 100.00000000000004 for an exact copy; we keep its value, not a clamped one.
    assert 0.0 < max(got) <= 1.0 + 1e-12 and min(got) == 0.0


def test_bleu_intl_tokenizer_differs_on_german_quotes():
    # Guards against the option being silently ignored: intl splits „quotes“, 13a does not.
    h, r = ["Die Straße ist „schön“ und groß."], ["Die Straße ist schön und groß."]
    assert bleu(h, r, tokenize="intl") != bleu(h, r, tokenize="13a")


@pytest.mark.parametrize("opts", [{}, {"word_order": 2}, {"lowercase": True}])
def test_chrf_equals_sacrebleu(lang_batch, opts):
    _, hyps, refs = lang_batch
    metric = sacrebleu.CHRF(**opts)
    assert chrf(hyps, refs, **opts) == [metric.sentence_score(h, [r]).score / 100 for h, r in zip(hyps, refs)]


@pytest.mark.parametrize("use_stemmer", [False, True])
@pytest.mark.parametrize("fn,rtype", [(rouge1, "rouge1"), (rouge2, "rouge2"), (rougeL, "rougeL")])
def test_rouge_equals_rouge_score(lang_batch, fn, rtype, use_stemmer):
    lang, hyps, refs = lang_batch
    tok = rouge_tokenizer(use_stemmer, None, lang)
    scorer = rouge_scorer.RougeScorer([rtype], use_stemmer=use_stemmer, tokenizer=tok)
    expected = [scorer.score(r, h)[rtype].fmeasure for h, r in zip(hyps, refs)]
    assert fn(hyps, refs, use_stemmer=use_stemmer, lang=lang) == expected


def test_rouge_default_tokenizer_is_rouge_scores_own():
    hyps, refs = ["the cats are running"], ["a cat runs"]
    for stem in (False, True):
        lib = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=stem)  # no tokenizer argument at all
        assert rouge1(hyps, refs, use_stemmer=stem) == [lib.score(refs[0], hyps[0])["rouge1"].fmeasure]


def test_unicode_tokenizer_keeps_german_words():
    default = rouge_tokenizer(False, "default", "en").tokenize("Die Straße ist groß.")
    assert default == ["die", "stra", "e", "ist", "gro"]  # the problem the Unicode tokenizer fixes
    german = rouge_tokenizer(False, None, "de").tokenize("Die Straße ist „groß“.")
    assert german == ["die", "straße", "ist", "groß"]
    stemmed = UnicodeRougeTokenizer(use_stemmer=True, lang="de").tokenize("Größere Mädchen laufen")
    assert stemmed == ["gross", "madch", "lauf"]  # NLTK Snowball German


def test_unicode_tokenizer_matches_default_on_ascii_english():
    text = "He said that the meeting, at 10:30 a.m., wasn't running late!"
    for stem in (False, True):
        assert (UnicodeRougeTokenizer(stem, "en").tokenize(text)
                == rouge_tokenizer(stem, "default", "en").tokenize(text))


@pytest.mark.parametrize("fn", [bleu, chrf, rouge1, rouge2, rougeL])
def test_grouped_path_equals_per_pair_and_is_order_free(lang_batch, fn):
    lang, hyps, refs = lang_batch
    kw = {"lang": lang} if fn in (rouge1, rouge2, rougeL) else {}
    batched = fn(hyps, refs, **kw)
    assert batched == [fn([h], [r], **kw)[0] for h, r in zip(hyps, refs)]
    perm = list(range(len(hyps)))
    random.Random(1).shuffle(perm)
    assert fn([hyps[i] for i in perm], [refs[i] for i in perm], **kw) == [batched[i] for i in perm]


@pytest.mark.parametrize("fn", [bleu, chrf, rouge1, rouge2, rougeL])
def test_blank_hypotheses_score_zero(fn):
    assert fn(["", " ", "\t\n"], ["a reference", "x", ""]) == [0.0, 0.0, 0.0]


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        bleu(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="row 1"):
        bleu(["a", None], ["a", "b"])
    with pytest.raises(ValueError, match="tokenize"):
        bleu(["a"], ["a"], tokenize="nope")
    with pytest.raises(ValueError, match="lang"):
        rouge1(["a"], ["a"], use_stemmer=True, lang="xx", tokenizer="unicode")
