"""Every bad-input kind, at prepare time and at load time: counted, named, skipped; strict mode raises naming it."""
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import soundfile as sf
from lhotse import CutSet

from nemo_grpo.data.dataset import PromptLoader, SpeechPromptDataset, build_dataloader
from nemo_grpo.data.prepare_covost2 import prepare_covost2
from nemo_grpo.data.prepare_librisqa import prepare_librisqa
from nemo_grpo.data.prompts import PromptTemplates
from nemo_grpo.data.validation import DataError

MAX_S = 8.0  # max_duration used in these tests


def _noise(seconds, sr):
    return (np.random.default_rng(0).standard_normal(int(seconds * sr)) * 0.1).astype(np.float32)


@pytest.fixture(scope="module")
def bad_librisqa(toy_index, tmp_path_factory):
    """A LibriSpeech tree + Part I JSON holding 3 good records and one record of each bad kind."""
    qa = toy_index["librisqa"]
    root = str(tmp_path_factory.mktemp("bad_qa"))
    ls = os.path.join(root, "LibriSpeech")
    shutil.copytree(qa["librispeech_root"], ls)
    with open(qa["train_json"], encoding="utf-8") as f:
        good = json.load(f)[:3]
    chapter = os.path.join(ls, "train-clean-360", "900", "9000")
    os.makedirs(chapter)
    p = lambda utt: f"train-clean-360/900/9000/900-9000-{utt}.flac"  # noqa: E731
    with open(os.path.join(ls, p("0001")), "wb") as f:
        f.write(b"this is not audio at all" * 10)  # corrupt / unsupported
    sf.write(os.path.join(ls, p("0002")), np.zeros(0, np.float32), 16000, format="FLAC")  # zero-length (0 bytes)
    sf.write(os.path.join(ls, p("0005")), np.zeros(0, np.float32), 16000, format="WAV")  # header, 0 frames
    sf.write(os.path.join(ls, p("0003")), _noise(MAX_S + 1, 16000), 16000, format="FLAC")  # too long
    with open(os.path.join(ls, p("0004")), "wb") as f:  # valid header, payload cut off mid-stream
        data = open(os.path.join(ls, good[0]["speech_path"]), "rb").read()
        f.write(data[: len(data) // 3])
    base = dict(question="where is it?", answer="on the left", text="x", duration=1.0)
    bad = [
        dict(base, speech_path=p("0000")),                               # missing_file
        dict(base, speech_path=p("0001")),                               # corrupt_audio
        dict(base, speech_path=p("0002")),                               # zero_length
        dict(base, speech_path=p("0003")),                               # too_long
        dict(base, speech_path=p("0004")),                               # corrupt_audio (truncated)
        dict(base, speech_path=good[1]["speech_path"], question=" "),    # empty_text (question)
        dict(base, speech_path=good[2]["speech_path"], question="q?", answer=""),  # empty_text (answer)
        {"speech_path": good[0]["speech_path"], "answer": "a"},           # malformed_row (no question)
        ["not", "an", "object"],                                          # malformed_row
        dict(base, speech_path=123),                                      # malformed_row (type)
        dict(good[0]),                                                    # duplicate_id
        dict(base, speech_path=good[1]["speech_path"], question="NONUTF8"),  # non_utf8 (bytes patched below)
        dict(base, speech_path=p("0005")),                               # zero_length (header only)
    ]
    text = json.dumps(good + bad, ensure_ascii=False).encode("utf-8")
    text = text.replace(b"NONUTF8", b"caf\xe9 ?")  # latin-1 byte: not UTF-8
    train_json = os.path.join(root, "train.json")
    with open(train_json, "wb") as f:
        f.write(text)
    return dict(train_json=train_json, test_json=qa["test_json"], root=ls)


EXPECTED_QA = {"missing_file": 1, "corrupt_audio": 2, "zero_length": 2, "too_long": 1, "empty_text": 2,
               "malformed_row": 3, "duplicate_id": 1, "non_utf8": 1}


def test_librisqa_each_bad_kind_reported_and_skipped(bad_librisqa, tmp_path):
    b = bad_librisqa
    out = str(tmp_path / "m")
    res = prepare_librisqa(b["train_json"], b["test_json"], b["root"], out, max_duration=MAX_S, num_jobs=1,
                           valid_fraction=0.2)
    assert res["skipped"]["counts"] == EXPECTED_QA
    kept = [len(CutSet.from_file(res["cuts"][s])) if res["cuts"][s] else 0 for s in ("train", "valid")]
    assert sum(kept) == 3 and res["cuts"]["test"]
    with open(os.path.join(out, "librisqa_skipped.json"), encoding="utf-8") as f:
        report = json.load(f)
    assert report["total"] == sum(EXPECTED_QA.values())
    named = json.dumps(report["examples"])
    for utt in ("900-9000-0000", "900-9000-0001", "900-9000-0003", "train.json[13]", "train.json[14]"):
        assert utt in named


def test_librisqa_strict_raises_naming_item(bad_librisqa, tmp_path):
    b = bad_librisqa
    with pytest.raises(DataError, match=r"train\.json\[\d+\]"):
        prepare_librisqa(b["train_json"], b["test_json"], b["root"], str(tmp_path), max_duration=MAX_S,
                         strict=True)


def test_cli_strict_exits_nonzero_naming_item(bad_covost, tmp_path, capsys):
    from nemo_grpo import cli

    b = bad_covost
    argv = ["prepare", "covost2", "--covost-tsv", b["covost_tsv"], "--validated-tsv", b["validated_tsv"],
            "--clips-dir", b["clips"], "--out-dir", str(tmp_path), "--max-duration", str(MAX_S)]
    assert cli.main(argv + ["--strict"]) == 1
    assert "covost_v2.en_de.tsv:line" in capsys.readouterr().err
    assert cli.main(argv) == 0
    assert "skipped 9" in capsys.readouterr().out


def test_librisqa_jsonl_malformed_line_is_a_skip(bad_librisqa, toy_index, tmp_path):
    with open(toy_index["librisqa"]["train_json"], encoding="utf-8") as f:
        good = json.load(f)[:6]
    lines = [json.dumps(r) for r in good] + ['{"speech_path": "broken', "[1, 2"]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    res = prepare_librisqa(str(path), bad_librisqa["test_json"], bad_librisqa["root"], str(tmp_path / "m"))
    assert res["skipped"]["counts"] == {"malformed_row": 2}
    assert "train.jsonl:line 7" in json.dumps(res["skipped"]["examples"])
    not_json = tmp_path / "x.json"
    not_json.write_text('[{"a": 1},', encoding="utf-8")
    with pytest.raises(ValueError, match="x.json"):
        prepare_librisqa(str(not_json), bad_librisqa["test_json"], bad_librisqa["root"], str(tmp_path / "n"))


@pytest.fixture(scope="module")
def bad_covost(toy_index, tmp_path_factory):
    st = toy_index["covost2"]
    root = str(tmp_path_factory.mktemp("bad_st"))
    clips = os.path.join(root, "clips")
    shutil.copytree(st["clips_dir"], clips)
    with open(st["covost_tsv"], "rb") as f:
        header, *rows = f.read().splitlines()
    good = [r for r in rows if b"\ttrain\t" in r][:3] + [r for r in rows if b"\tdev\t" in r][:2] + \
        [r for r in rows if b"\ttest\t" in r][:2]
    with open(os.path.join(clips, "corrupt.mp3"), "wb") as f:
        f.write(b"\x00" * 2048)
    sf.write(os.path.join(clips, "long.mp3"), _noise(MAX_S + 2, 48000), 48000, format="MP3")
    with open(st["validated_tsv"], "rb") as f:
        validated = f.read().splitlines()
    extra = [b"c1\t%s\tsentence\t2\t0\t\t\t\ten\t" % n for n in (b"missing.mp3", b"corrupt.mp3", b"long.mp3")]
    validated_tsv = os.path.join(root, "validated.tsv")
    with open(validated_tsv, "wb") as f:
        f.write(b"\n".join(validated + extra) + b"\n")
    g0 = good[0].split(b"\t")
    bad = [
        b"missing.mp3\tEine Zahl\ttrain\t",                # missing_file
        b"corrupt.mp3\tEine Zahl\ttrain\t",                # corrupt_audio
        b"long.mp3\tEine Zahl\ttrain\t",                   # too_long
        b"\t".join([g0[0], b"   ", b"train", b""]),       # empty_text (translation); duplicates nothing (skipped first)
        b"only\ttwo",                                      # malformed_row (field count)
        b"unlisted.mp3\tEine Zahl\ttrain\t",               # unknown_clip
        b"x.mp3\tEine Zahl\tvalidation\t",                 # malformed_row (unknown split)
        b"y.mp3\tGr\xfc\xdfe\ttrain\t",                    # non_utf8
        good[1],                                           # duplicate_id
    ]
    covost_tsv = os.path.join(root, "covost_v2.en_de.tsv")
    with open(covost_tsv, "wb") as f:
        f.write(b"\n".join([header] + good + bad) + b"\n")
    return dict(covost_tsv=covost_tsv, validated_tsv=validated_tsv, clips=clips)


EXPECTED_ST = {"missing_file": 1, "corrupt_audio": 1, "too_long": 1, "empty_text": 1, "malformed_row": 2,
               "unknown_clip": 1, "non_utf8": 1, "duplicate_id": 1}


def test_covost_each_bad_kind_reported_and_skipped(bad_covost, tmp_path):
    b = bad_covost
    res = prepare_covost2(b["covost_tsv"], b["validated_tsv"], b["clips"], str(tmp_path), max_duration=MAX_S)
    assert res["skipped"]["counts"] == EXPECTED_ST
    assert [len(CutSet.from_file(res["cuts"][s])) for s in ("train", "dev", "test")] == [3, 2, 2]
    named = json.dumps(res["skipped"]["examples"])
    assert "missing.mp3" in named and "corrupt.mp3" in named and "covost_v2.en_de.tsv:line 16" in named
    with pytest.raises(DataError, match=r"covost_v2\.en_de\.tsv:line \d+"):
        prepare_covost2(b["covost_tsv"], b["validated_tsv"], b["clips"], str(tmp_path / "s"), strict=True)


# ----------------------------------------------------------------------------------------------- load time --
def _bad_cuts(toy_manifests, tmp_path):
    """Good cuts plus, for each load-time failure, one cut that triggers it (returned as a manifest path)."""
    # the longest QA cut becomes the too-long one (max_audio_duration is set just below it)
    good = sorted(CutSet.from_file(os.path.join(toy_manifests, "librisqa_cuts_test.jsonl.gz")),
                  key=lambda c: c.duration)[-4:]
    st = list(CutSet.from_file(os.path.join(toy_manifests, "covost2_cuts_test.jsonl.gz")))[:2]

    def variant(cut, new_id, **custom):
        sup = dataclasses.replace(cut.supervisions[0], custom={**cut.supervisions[0].custom, **custom})
        return dataclasses.replace(cut, id=new_id, supervisions=[sup])

    gone = tmp_path / "gone.flac"
    shutil.copy(good[0].recording.sources[0].source, gone)
    emptied = tmp_path / "emptied.flac"
    shutil.copy(good[0].recording.sources[0].source, emptied)
    garbage = tmp_path / "garbage.flac"
    shutil.copy(good[0].recording.sources[0].source, garbage)

    def with_source(cut, new_id, path):
        rec = cut.recording
        rec = type(rec)(id=new_id, sources=[type(rec.sources[0])(type="file", channels=[0], source=str(path))],
                        sampling_rate=rec.sampling_rate, num_samples=rec.num_samples, duration=rec.duration)
        return type(cut)(id=new_id, start=0, duration=cut.duration, channel=0, recording=rec,
                         supervisions=cut.supervisions)

    bad = [
        with_source(good[0], "bad-missing", gone),
        with_source(good[0], "bad-corrupt", garbage),
        variant(good[1], "bad-empty-answer", answer=""),
        variant(good[1], "bad-empty-question", question="  "),
        variant(good[2], "bad-task", task="asr"),
        variant(good[2], "bad-long-prompt", question="what " * 400 + "?"),
        dataclasses.replace(good[3], id="bad-too-long"),  # max_audio_duration is just below its length
        dataclasses.replace(good[0], id="bad-zero-duration", duration=0.0),
        with_source(good[0], "bad-emptied", emptied),
    ]
    os.remove(gone)  # prepared fine, deleted afterwards
    sf.write(str(emptied), np.zeros(0, np.float32), 16000, format="FLAC")  # replaced by a 0-frame file afterwards
    garbage.write_bytes(b"\x00" * 500)  # overwritten with junk after "prepare"
    path = str(tmp_path / "bad_cuts.jsonl.gz")
    CutSet.from_cuts(good[:3] + st + bad).to_file(path)
    return path, good[3].duration


def test_load_time_bad_cuts_are_dropped_and_counted(toy_manifests, tiny_tokenizer_config, tmp_path, caplog):
    tok, config = tiny_tokenizer_config
    path, long_duration = _bad_cuts(toy_manifests, tmp_path)
    data_cfg = {"manifest_dir": str(tmp_path), "max_prompt_tokens": 256,
                "max_audio_duration": long_duration - 0.01,
                "test": {"sequential": True, "batch_size": 4, "input_cfg": [{"cuts_path": "bad_cuts.jsonl.gz"}]}}
    loader = build_dataloader(data_cfg, tok, config, split="test", seed=0)
    ids = [i for batch in loader for i in batch.ids]
    counts = loader.skips.to_dict()["counts"]
    # the emptied file: lhotse refuses a recording whose samples are missing (corrupt_audio), or it decodes to
    # nothing (zero_length); either way it is counted, named, and skipped
    emptied_kind = "zero_length" if counts.get("zero_length", 0) == 2 else "corrupt_audio"
    expected = {"missing_file": 1, "corrupt_audio": 1, "empty_text": 2, "malformed_row": 1, "prompt_too_long": 1,
                "too_long": 1, "zero_length": 1}
    expected[emptied_kind] += 1
    assert counts == expected
    assert not any(i.startswith("bad-") for i in ids) and len(ids) == 5
    assert "bad-long-prompt" in json.dumps(loader.skips.to_dict()["examples"])
    assert "skipped 9" in loader.skips.summary()
    # the run's log names each skipped cut and states the totals at the end of the pass
    assert "bad-missing: missing_file" in caplog.text and "pass finished: load/test: skipped 9" in caplog.text
    assert "bad-zero-duration: zero_length" in caplog.text and f"bad-emptied: {emptied_kind}" in caplog.text


def test_all_bad_batch_yields_nothing_but_counts(toy_manifests, tiny_tokenizer_config):
    tok, config = tiny_tokenizer_config
    cuts = CutSet.from_file(os.path.join(toy_manifests, "covost2_cuts_test.jsonl.gz")).subset(first=3)
    ds = SpeechPromptDataset(tok, config, PromptTemplates.load(), max_audio_duration=0.5)
    loader = PromptLoader([ds[cuts]], "load/x")
    assert list(loader) == [] and loader.skips.counts == {"too_long": 3} and ds.skips.total == 3
