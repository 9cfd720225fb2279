"""Lexical rewards: sentence BLEU and chrF (sacrebleu), ROUGE-1/2/L F-measure (rouge-score).

Every function has the reward signature ``(hyps: list[str], refs: list[str], **options) -> list[float]`` with
``len(hyps) == len(refs) == N`` (N = B*G in GRPO: each group of G hypotheses shares one reference) and values in
[0, 1]. Each value is IDENTICAL to what the library computes for that single pair (tests check this); the speed-up
comes only from doing the reference-side work (tokenisation, n-gram counting) once per distinct reference and
scoring each distinct (hypothesis, reference) pair once, using the libraries' own internal steps.

Empty or whitespace-only hypotheses score 0.0 (the libraries agree; we never call them on such input).
"""
from __future__ import annotations

import functools
import re
from collections.abc import Callable, Hashable, Sequence
from typing import Any

ROUGE_TOKENIZERS = ("default", "unicode")
# Languages for which the Unicode ROUGE tokenizer stems with NLTK's Snowball stemmer.
_SNOWBALL = {"en": "english", "de": "german", "fr": "french", "es": "spanish", "it": "italian", "nl": "dutch",
             "pt": "portuguese", "ru": "russian", "sv": "swedish"}


def check_pairs(hyps: Sequence[str], refs: Sequence[str]) -> None:
    """Raise ValueError unless hyps/refs are equally long sequences of str (names the first bad row)."""
    if isinstance(hyps, str) or isinstance(refs, str):
        raise ValueError("hyps and refs must be lists of strings, not a single string")
    if len(hyps) != len(refs):
        raise ValueError(f"got {len(hyps)} hypotheses but {len(refs)} references")
    for i, (h, r) in enumerate(zip(hyps, refs)):
        if not isinstance(h, str) or not isinstance(r, str):
            raise ValueError(f"row {i}: hypothesis and reference must be str, got {type(h).__name__}, "
                             f"{type(r).__name__}")


def score_grouped(hyps: Sequence[str], refs: Sequence[str], prepare_ref: Callable[[str], Any],
                  score_one: Callable[[str, Any], float]) -> list[float]:
    """Score N pairs, preparing each distinct reference once and scoring each distinct pair once.

    prepare_ref(ref) -> cached reference state; score_one(hyp, state) -> float. Blank hypotheses -> 0.0.
    """
    check_pairs(hyps, refs)
    ref_state: dict[str, Any] = {}
    done: dict[tuple[str, str], float] = {}
    out: list[float] = []
    for h, r in zip(hyps, refs):
        if not h.strip():
            out.append(0.0)
            continue
        key = (h, r)
        if key not in done:
            if r not in ref_state:
                ref_state[r] = prepare_ref(r)
            done[key] = float(score_one(h, ref_state[r]))
        out.append(done[key])
    return out


# ----------------------------------------------------------------------------------------------- sacrebleu
@functools.lru_cache(maxsize=32)
def _sacrebleu_metric(kind: str, options: tuple[tuple[str, Hashable], ...]):
    import sacrebleu

    if kind == "bleu":
        tokenize = dict(options).get("tokenize")
        if tokenize is not None and tokenize not in sacrebleu.BLEU.TOKENIZERS:
            raise ValueError(f"bleu option 'tokenize': {tokenize!r} is not one of {sorted(sacrebleu.BLEU.TOKENIZERS)}")
        return sacrebleu.BLEU(effective_order=True, **dict(options))
    return sacrebleu.CHRF(**dict(options))


def _sacrebleu_scores(metric, hyps: Sequence[str], refs: Sequence[str]) -> list[float]:
    # Mirrors Metric.sentence_score(h, [r]) = _aggregate_and_compute(_extract_corpus_statistics([h], [[r]])),
    # with the reference cache (_cache_references: preprocess + n-gram extraction) built once per distinct ref.
    def prepare(ref: str):
        return metric._cache_references([[ref]])[0]

    def score(hyp: str, ref_kwargs) -> float:
        stats = metric._compute_segment_statistics(metric._preprocess_segment(hyp), ref_kwargs)
        return metric._aggregate_and_compute([stats]).score / 100.0

    return score_grouped(hyps, refs, prepare, score)


def bleu(hyps: list[str], refs: list[str], *, tokenize: str = "13a", lowercase: bool = False) -> list[float]:
    """Sentence BLEU / 100 == ``sacrebleu.BLEU(effective_order=True, tokenize=..).sentence_score(h, [r]).score/100``.

    Exponential smoothing (sacrebleu's default). tokenize: any sacrebleu tokenizer ('13a' default; 'intl' splits
    German „quotes“ and Unicode punctuation). Returns N floats in [0, 1] (an exact copy scores sacrebleu's own
    1.0000000000000004: the library value is kept, not clamped).
    """
    metric = _sacrebleu_metric("bleu", (("tokenize", tokenize), ("lowercase", bool(lowercase))))
    return _sacrebleu_scores(metric, hyps, refs)


def chrf(hyps: list[str], refs: list[str], *, char_order: int = 6, word_order: int = 0, beta: int = 2,
         lowercase: bool = False, whitespace: bool = False) -> list[float]:
    """Sentence chrF / 100 == ``sacrebleu.CHRF(...).sentence_score(h, [r]).score / 100`` (word_order=2: chrF++)."""
    opts = (("char_order", int(char_order)), ("word_order", int(word_order)), ("beta", int(beta)),
            ("lowercase", bool(lowercase)), ("whitespace", bool(whitespace)))
    return _sacrebleu_scores(_sacrebleu_metric("chrf", opts), hyps, refs)


# ----------------------------------------------------------------------------------------------- ROUGE
class UnicodeRougeTokenizer:
    """rouge-score tokenizer that keeps Unicode letters (rouge-score's default keeps only a-z0-9: Straße -> stra e).

    Same recipe as rouge_score.tokenize.tokenize otherwise: lowercase, split on anything that is not a letter or
    digit, optionally stem tokens longer than 3 characters — with NLTK's Snowball stemmer for ``lang`` ('en' uses
    rouge-score's own Porter stemmer so English results match the default tokenizer on ASCII text).
    """

    _SPLIT = re.compile(r"[\W_]+", re.UNICODE)

    def __init__(self, use_stemmer: bool = False, lang: str = "en"):
        self.use_stemmer, self.lang = bool(use_stemmer), lang
        self._stemmer = None
        if use_stemmer:
            if lang == "en":
                from nltk.stem import porter

                self._stemmer = porter.PorterStemmer()
            elif lang in _SNOWBALL:
                from nltk.stem.snowball import SnowballStemmer

                self._stemmer = SnowballStemmer(_SNOWBALL[lang])
            else:
                raise ValueError(f"rouge option 'lang': no stemmer for {lang!r}; known: {sorted(_SNOWBALL)}")

    def tokenize(self, text: str) -> list[str]:
        tokens = [t for t in self._SPLIT.split(text.lower()) if t]
        if self._stemmer is not None:
            tokens = [self._stemmer.stem(t) if len(t) > 3 else t for t in tokens]
        return tokens


@functools.lru_cache(maxsize=32)
def rouge_tokenizer(use_stemmer: bool = False, tokenizer: str | None = None, lang: str = "en"):
    """The tokenizer object handed to ``rouge_score.rouge_scorer.RougeScorer(tokenizer=...)``.

    tokenizer: 'default' (rouge-score's own, English only) or 'unicode'; None picks 'default' for lang 'en' and
    'unicode' otherwise.
    """
    from rouge_score import tokenizers

    if tokenizer is None:
        tokenizer = "default" if lang == "en" else "unicode"
    if tokenizer not in ROUGE_TOKENIZERS:
        raise ValueError(f"rouge option 'tokenizer': {tokenizer!r} is not one of {ROUGE_TOKENIZERS}")
    if tokenizer == "default":
        return tokenizers.DefaultTokenizer(use_stemmer=bool(use_stemmer))
    return UnicodeRougeTokenizer(use_stemmer=bool(use_stemmer), lang=lang)


def rouge(hyps: list[str], refs: list[str], *, rouge_type: str, use_stemmer: bool = False,
          tokenizer: str | None = None, lang: str = "en") -> list[float]:
    """ROUGE F-measure == ``RougeScorer([rouge_type], use_stemmer, tokenizer=..).score(ref, hyp)[rouge_type].fmeasure``.

    rouge_type: 'rouge1'..'rouge9' or 'rougeL'. Reference tokens and n-grams are built once per distinct reference.
    """
    from rouge_score import rouge_scorer as rs

    tok = rouge_tokenizer(bool(use_stemmer), tokenizer, lang)
    if rouge_type == "rougeL":
        def prepare(ref):
            return tok.tokenize(ref)

        def score(hyp, ref_tokens):
            return rs._score_lcs(ref_tokens, tok.tokenize(hyp)).fmeasure
    elif re.fullmatch(r"rouge[1-9]", rouge_type):
        n = int(rouge_type[5:])

        def prepare(ref):
            return rs._create_ngrams(tok.tokenize(ref), n)

        def score(hyp, ref_ngrams):
            return rs._score_ngrams(ref_ngrams, rs._create_ngrams(tok.tokenize(hyp), n)).fmeasure
    else:
        raise ValueError(f"rouge option 'rouge_type': {rouge_type!r} is not rouge1..rouge9 or rougeL")
    return score_grouped(hyps, refs, prepare, score)


def rouge1(hyps: list[str], refs: list[str], *, use_stemmer: bool = False, tokenizer: str | None = None,
           lang: str = "en") -> list[float]:
    """ROUGE-1 F-measure per pair (see :func:`rouge`)."""
    return rouge(hyps, refs, rouge_type="rouge1", use_stemmer=use_stemmer, tokenizer=tokenizer, lang=lang)


def rouge2(hyps: list[str], refs: list[str], *, use_stemmer: bool = False, tokenizer: str | None = None,
           lang: str = "en") -> list[float]:
    """ROUGE-2 F-measure per pair (see :func:`rouge`)."""
    return rouge(hyps, refs, rouge_type="rouge2", use_stemmer=use_stemmer, tokenizer=tokenizer, lang=lang)


def rougeL(hyps: list[str], refs: list[str], *, use_stemmer: bool = False, tokenizer: str | None = None,  # noqa: N802
           lang: str = "en") -> list[float]:
    """ROUGE-L (LCS) F-measure per pair (see :func:`rouge`)."""
    return rouge(hyps, refs, rouge_type="rougeL", use_stemmer=use_stemmer, tokenizer=tokenizer, lang=lang)
