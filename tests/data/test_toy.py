"""The espeak-ng toy corpora: real formats (checked by lhotse's own LibriSpeech recipe and soundfile), determinism,
task semantics (answers follow from what is spoken), and several valid phrasings per answer."""
import csv
import hashlib
import json
import os
import re

import numpy as np
import pytest
import soundfile as sf

from nemo_grpo.data import toy


def _tree_digest(root):
    out = {}
    for d, _, files in os.walk(root):
        for name in files:
            if name != "toy_corpora.json":
                path = os.path.join(d, name)
                with open(path, "rb") as f:
                    out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_deterministic_given_seed(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    for out, seed in ((a, 3), (b, 3), (c, 4)):
        toy.make_toy_corpora(out, seed=seed, num_qa=4, num_st=4, num_test=2)
    da, db, dc = _tree_digest(a), _tree_digest(b), _tree_digest(c)
    assert da == db and len(da) > 20
    assert da != dc


def test_rejects_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="num_qa"):
        toy.make_toy_corpora(str(tmp_path), num_qa=0, num_st=4)


def test_librispeech_tree_accepted_by_lhotse_recipe(toy_index):
    """lhotse's own prepare_librispeech reads the toy tree: every flac, 16 kHz, transcripts matching the JSON."""
    from lhotse.recipes import prepare_librispeech

    qa = toy_index["librisqa"]
    parts = prepare_librispeech(qa["librispeech_root"], dataset_parts=["train-clean-360", "test-clean"])
    with open(qa["train_json"], encoding="utf-8") as f:
        train = json.load(f)
    with open(qa["test_json"], encoding="utf-8") as f:
        test = json.load(f)
    for part, records in (("train-clean-360", train), ("test-clean", test)):
        recs, sups = parts[part]["recordings"], parts[part]["supervisions"]
        assert len(recs) == len(records) == len(sups)
        texts = {s.recording_id: s.text for s in sups}
        for r in records:
            utt = os.path.splitext(os.path.basename(r["speech_path"]))[0]
            assert texts[utt] == r["text"].upper()
            assert recs[utt].sampling_rate == 16000
            assert recs[utt].duration == pytest.approx(r["duration"], abs=1e-3)


def test_covost_files_real_format(toy_index):
    st = toy_index["covost2"]
    with open(st["covost_tsv"], encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    with open(st["validated_tsv"], encoding="utf-8") as f:
        cv = {r["path"]: r for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)}
    assert {"path", "translation", "split"} <= set(rows[0]) and {"client_id", "path", "sentence"} <= set(
        next(iter(cv.values())))
    assert {r["split"] for r in rows} >= {"train", "dev", "test"}
    assert len([r for r in rows if r["split"] in ("train", "train_covost")]) == 24
    rates = set()
    for r in rows:
        info = sf.info(os.path.join(st["clips_dir"], r["path"]))
        assert info.format == "MP3" and r["path"] in cv
        rates.add(info.samplerate)
    assert rates == set(toy.MP3_RATES)  # both resampling ratios occur


def _digits_en(sentence):
    return [toy.DIGITS_EN.index(w) for w in sentence.split() if w in toy.DIGITS_EN]


def _digits_de(translation):
    table = {w: i for i, w in enumerate(toy.DIGITS_DE)} | {"zwo": 2}
    return [table[w] for w in translation.split() if w in table]


def test_st_semantics_and_paraphrases():
    rng = np.random.default_rng(0)
    items = [toy.st_item(rng) for _ in range(300)]
    frames = set()
    for it in items:
        assert 3 <= len(_digits_en(it["sentence"])) <= 5
        assert it["translation"] in it["translations"] and len(set(it["translations"])) >= 2
        for t in it["translations"]:  # every valid phrasing carries the spoken digits, in order
            assert _digits_de(t) == _digits_en(it["sentence"])
        frames.add(re.sub(r"\b(null|eins|zwei|zwo|drei|vier|fünf|sechs|sieben|acht|neun)\b", "#", it["translation"]))
    assert len(frames) >= 8  # the drawn references really vary in phrasing


def test_qa_semantics_and_paraphrases():
    rng = np.random.default_rng(0)
    for _ in range(300):
        it = toy.qa_item(rng)
        m = re.match(r"the (\w+) (\w+) is on the left and the (\w+) (\w+) is on the right", it["text"]) or \
            re.match(r"on the left there is a (\w+) (\w+) and on the right a (\w+) (\w+)", it["text"])
        scene = {"left": m.group(1, 2), "right": m.group(3, 4)}
        assert it["answer"] in it["answers"] and len(set(it["answers"])) == 4
        q = it["question"]
        if q.startswith("where is"):
            color, obj = q[len("where is the "):-1].split()
            side = next(s for s, v in scene.items() if v == (color, obj))
            assert all(side in a for a in it["answers"])
        elif q.startswith("what is on the"):
            color, obj = scene[q[len("what is on the "):-1]]
            assert all(f"{color} {obj}" in a for a in it["answers"])
        else:
            obj = q[len("what color is the "):-1]
            color = next(c for c, o in scene.values() if o == obj)
            assert all(color in a.split() for a in it["answers"])


def test_vocabulary_text_covers_every_generated_word():
    vocab = set(toy.vocabulary_text().split())
    rng = np.random.default_rng(1)
    for _ in range(200):
        qa, st = toy.qa_item(rng), toy.st_item(rng)
        words = " ".join([qa["question"], *qa["answers"], *st["translations"], st["sentence"]]).split()
        assert set(words) <= vocab
