"""``prepare librisqa`` / ``prepare covost2`` / ``prepare toy`` on synthesised real speech (the toy corpora)."""
import json
import os

import numpy as np
import pytest
import soundfile as sf
from lhotse import CutSet, RecordingSet, SupervisionSet

from nemo_grpo import cli
from nemo_grpo.data.prepare_covost2 import prepare_covost2
from nemo_grpo.data.prepare_librisqa import prepare_librisqa


def _load(path):
    return CutSet.from_file(path)


def test_librisqa_splits_and_fields(toy_index, toy_manifests):
    qa = toy_index["librisqa"]
    with open(qa["train_json"], encoding="utf-8") as f:
        train_records = json.load(f)
    cuts = {s: _load(os.path.join(toy_manifests, f"librisqa_cuts_{s}.jsonl.gz")) for s in ("train", "valid", "test")}
    assert (len(cuts["train"]), len(cuts["valid"]), len(cuts["test"])) == (19, 5, qa["num_test"])  # 80/20 of 24
    assert not set(cuts["train"].ids) & set(cuts["valid"].ids)
    by_id = {os.path.splitext(os.path.basename(r["speech_path"]))[0]: r for r in train_records}
    for cut in list(cuts["train"]) + list(cuts["valid"]):
        sup = cut.supervisions[0]
        rec = by_id[cut.id]
        assert sup.custom["task"] == "sqa"
        assert (sup.custom["question"], sup.custom["answer"], sup.custom["transcript"]) == (
            rec["question"], rec["answer"], rec["text"])
        assert sup.custom["answers"] == rec["answers"] and sup.text == rec["text"]
        assert cut.sampling_rate == 16000 and cut.duration == pytest.approx(rec["duration"], abs=1e-3)
    # the manifests' audio is the flac's audio, sample for sample (soundfile as the independent reader)
    cut = cuts["valid"][0]
    ref, sr = sf.read(cut.recording.sources[0].source, dtype="float32")
    assert sr == 16000 and np.array_equal(cut.load_audio()[0], ref)
    for kind in ("recordings", "supervisions"):
        assert os.path.exists(os.path.join(toy_manifests, f"librisqa_{kind}_train.jsonl.gz"))
    assert len(RecordingSet.from_file(os.path.join(toy_manifests, "librisqa_recordings_test.jsonl.gz"))) == \
        len(SupervisionSet.from_file(os.path.join(toy_manifests, "librisqa_supervisions_test.jsonl.gz")))


def test_librisqa_split_is_seeded_and_idempotent(toy_index, toy_manifests, tmp_path):
    qa = toy_index["librisqa"]
    args = (qa["train_json"], qa["test_json"], qa["librispeech_root"])
    r0 = prepare_librisqa(*args, str(tmp_path / "s0"), seed=0, num_jobs=1)
    r1 = prepare_librisqa(*args, str(tmp_path / "s1"), seed=1, num_jobs=1)
    again = prepare_librisqa(*args, str(tmp_path / "s0"), seed=0, num_jobs=1)
    assert again["reused"] and not r0["reused"]
    valid0 = set(_load(r0["cuts"]["valid"]).ids)
    assert valid0 == set(_load(os.path.join(toy_manifests, "librisqa_cuts_valid.jsonl.gz")).ids)
    assert valid0 != set(_load(r1["cuts"]["valid"]).ids)
    forced = prepare_librisqa(*args, str(tmp_path / "s0"), seed=0, num_jobs=1, force=True)
    assert not forced["reused"] and set(_load(forced["cuts"]["valid"]).ids) == valid0
    with pytest.raises(ValueError, match="valid_fraction"):
        prepare_librisqa(*args, str(tmp_path / "bad"), valid_fraction=1.0)


def test_covost2_splits_resampling_and_fields(toy_index, toy_manifests):
    from scipy.signal import resample_poly

    st = toy_index["covost2"]
    cuts = {s: _load(os.path.join(toy_manifests, f"covost2_cuts_{s}.jsonl.gz")) for s in ("train", "dev", "test")}
    assert (len(cuts["train"]), len(cuts["dev"]), len(cuts["test"])) == (24, st["num_dev"], st["num_test"])
    with open(st["covost_tsv"], encoding="utf-8") as f:
        rows = {ln.split("\t")[0]: ln.rstrip("\n").split("\t") for ln in f.readlines()[1:]}
    rates = set()
    for cut in cuts["dev"]:
        sup = cut.supervisions[0]
        row = rows[cut.id + ".mp3"]
        assert sup.custom["task"] == "ast" and sup.custom["translation"] == row[1]
        assert sup.custom["transcript"] and sup.speaker
        assert cut.sampling_rate == 16000
        native, sr = sf.read(os.path.join(st["clips_dir"], cut.id + ".mp3"), dtype="float32")
        rates.add(sr)
        ours = cut.load_audio()[0]
        ref = resample_poly(native, 16000, sr)  # scipy's polyphase resampler as the independent reference
        n = min(len(ours), len(ref))
        assert abs(len(ours) - len(ref)) <= 2
        assert np.corrcoef(ours[:n], ref[:n])[0, 1] > 0.99
    assert rates == {48000, 22050}


def test_cli_prepare_all_three(toy_index, tmp_path, capsys):
    qa, st = toy_index["librisqa"], toy_index["covost2"]
    out = str(tmp_path / "m")
    assert cli.main(["prepare", "librisqa", "--train-json", qa["train_json"], "--test-json", qa["test_json"],
                     "--librispeech-root", qa["librispeech_root"], "--out-dir", out, "--header-only"]) == 0
    assert cli.main(["prepare", "covost2", "--covost-tsv", st["covost_tsv"], "--validated-tsv",
                     st["validated_tsv"], "--clips-dir", st["clips_dir"], "--out-dir", out]) == 0
    assert cli.main(["prepare", "toy", "--out-dir", str(tmp_path / "toy"), "--num-qa", "4", "--num-st", "4",
                     "--num-test", "2"]) == 0
    text = capsys.readouterr().out
    assert "librisqa: wrote" in text and "covost2: wrote" in text and "skipped 0" in text
    for corpus, splits in (("librisqa", ("train", "valid", "test")), ("covost2", ("train", "dev", "test"))):
        for split in splits:
            assert len(_load(os.path.join(out, f"{corpus}_cuts_{split}.jsonl.gz"))) > 0
            assert len(_load(str(tmp_path / "toy" / "manifests" / f"{corpus}_cuts_{split}.jsonl.gz"))) > 0


def test_missing_inputs_are_clear_errors(toy_index, tmp_path):
    st = toy_index["covost2"]
    with pytest.raises(FileNotFoundError, match="covost_tsv"):
        prepare_covost2(str(tmp_path / "nope.tsv"), st["validated_tsv"], st["clips_dir"], str(tmp_path))
    bad = tmp_path / "bad.tsv"
    bad.write_text("path\tsentence\nx.mp3\thello\n", encoding="utf-8")
    with pytest.raises(ValueError, match="translation"):
        prepare_covost2(str(bad), st["validated_tsv"], st["clips_dir"], str(tmp_path))
