"""LibriSQA Part I (JSON) + a LibriSpeech tree -> lhotse manifests (train / valid / test).

Part I records: ``{"speech_path", "question", "answer", "text", "duration"}`` (a JSON list, or JSON Lines). The audio
is LibriSpeech (train-clean-360 for train, test-clean for test). ``speech_path`` may be relative to the LibriSpeech
root (``train-clean-360/103/1240/103-1240-0000.flac``), absolute, or just the file name: the file is then looked
up in the LibriSpeech layout ``<part>/<spk>/<chapter>/<spk>-<chapter>-<utt>.flac`` under every part in the root.

The paper holds out 20% of Part I train for validation: a seeded permutation of the train RECORDS (in file order,
before any skip, so one missing file does not reshuffle the rest) puts ``round(valid_fraction * n)`` into valid.
Supervisions carry ``custom = {task: "sqa", question, answer, transcript[, answers]}``; ``text`` is the transcript.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from typing import Any

import numpy as np

from nemo_grpo.data import manifests as mf
from nemo_grpo.data.validation import SkipReport, clean_text, has_surrogates

log = logging.getLogger(__name__)

CORPUS = "librisqa"
SPLITS = ("train", "valid", "test")
REQUIRED = ("speech_path", "question", "answer")


def read_records(path: str, report: SkipReport) -> list[tuple[str, Any]]:
    """(item name, raw record) pairs from a JSON list or JSON Lines file; unparseable JSONL lines are skipped.

    Invalid UTF-8 bytes are kept as surrogates so the affected record (not the whole file) is skipped later.
    """
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="surrogateescape")
    name = os.path.basename(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as whole_err:
        lines = [(i + 1, ln) for i, ln in enumerate(text.splitlines()) if ln.strip()]
        if not lines or not lines[0][1].lstrip().startswith("{"):
            raise ValueError(f"{path}: not valid JSON or JSON Lines: {whole_err}") from whole_err
        records = []
        for lineno, line in lines:  # JSON Lines: one bad line is one skipped record
            try:
                records.append((f"{name}:line {lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                report.skip("malformed_row", f"{name}:line {lineno}", str(e))
        return records
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return [(f"{name}[{i}]", rec) for i, rec in enumerate(data)]


def _part_dirs(root: str) -> list[str]:
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))


def resolve_audio(speech_path: str, root: str, parts: list[str]) -> str:
    """The audio file for a record's ``speech_path`` (may not exist: the caller reports missing_file)."""
    direct = speech_path if os.path.isabs(speech_path) else os.path.join(root, speech_path)
    if os.path.exists(direct):
        return direct
    base = os.path.basename(speech_path)
    fields = os.path.splitext(base)[0].split("-")
    if len(fields) == 3:
        for part in parts:
            cand = os.path.join(root, part, fields[0], fields[1], base)
            if os.path.exists(cand):
                return cand
    return direct


def validate_record(item: str, rec: Any, report: SkipReport) -> dict | None:
    """A normalised record or None (after a counted skip)."""
    if not isinstance(rec, dict) or any(k not in rec for k in REQUIRED):
        missing = [k for k in REQUIRED if not isinstance(rec, dict) or k not in rec]
        report.skip("malformed_row", item, f"missing {missing}" if isinstance(rec, dict) else "not an object")
        return None
    strings = [v for v in rec.values() if isinstance(v, str)] + [
        a for a in rec.get("answers") or [] if isinstance(a, str)]
    if any(has_surrogates(s) for s in strings):
        report.skip("non_utf8", item, "invalid UTF-8 bytes in a text field")
        return None
    if not isinstance(rec["speech_path"], str) or not rec["speech_path"].strip():
        report.skip("malformed_row", item, "speech_path is not a non-empty string")
        return None
    question, answer = clean_text(rec["question"]), clean_text(rec["answer"])
    if question is None or answer is None:
        report.skip("empty_text", item, "empty question" if question is None else "empty answer")
        return None
    out = dict(item=item, speech_path=rec["speech_path"].strip(), question=question, answer=answer,
               transcript=clean_text(rec.get("text")))
    answers = rec.get("answers")
    if isinstance(answers, list) and answers and all(clean_text(a) for a in answers):
        out["answers"] = [a.strip() for a in answers]
    return out


def _collect(json_path: str, root: str, parts: list[str], report: SkipReport) -> list[dict]:
    entries, seen, per_utt = [], {}, Counter()
    for item, rec in read_records(json_path, report):
        norm = validate_record(item, rec, report)
        if norm is None:
            continue
        norm["audio"] = resolve_audio(norm["speech_path"], root, parts)
        norm["item"] = f"{item} ({norm['speech_path']})"  # audio problems name the record AND its file
        utt = os.path.splitext(os.path.basename(norm["speech_path"]))[0]
        key = (utt, norm["question"])
        if key in seen:
            report.skip("duplicate_id", item, f"same utterance and question as {seen[key]}")
            continue
        seen[key] = item
        n_same = per_utt[utt]  # several questions on one utterance -> utt, utt_q1, utt_q2, ...
        per_utt[utt] += 1
        norm["recording_id"], norm["id"] = utt, utt if n_same == 0 else f"{utt}_q{n_same}"
        entries.append(norm)
    return entries


def _to_pair(entry: dict, check) -> tuple[Any, Any]:
    from lhotse import SupervisionSegment

    rec = mf.make_recording(entry["audio"], entry["recording_id"])
    fields = entry["recording_id"].split("-")
    custom = {"task": "sqa", "question": entry["question"], "answer": entry["answer"],
              "transcript": entry["transcript"] or ""}
    if "answers" in entry:
        custom["answers"] = entry["answers"]
    sup = SupervisionSegment(id=entry["id"], recording_id=rec.id, start=0.0, duration=rec.duration, channel=0,
                             text=entry["transcript"], language="en",
                             speaker=fields[0] if len(fields) == 3 else None, custom=custom)
    return rec, sup


def prepare_librisqa(
    train_json: str,
    test_json: str,
    librispeech_root: str,
    out_dir: str,
    *,
    seed: int = 0,
    valid_fraction: float = 0.2,
    strict: bool = False,
    max_duration: float = 40.0,
    decode_audio: bool = True,
    num_jobs: int = 2,
    force: bool = False,
) -> dict[str, Any]:
    """Write librisqa_{recordings,supervisions,cuts}_{train,valid,test}.jsonl.gz and librisqa_skipped.json.

    Bad records/audio are counted skips (first items named in the report and the log), or a ``DataError`` at the
    first one under ``strict``. Idempotent: re-running with the same inputs and arguments reuses the outputs
    (``force`` rebuilds); outputs are written only after every item has been validated.
    Returns {"cuts": {split: cuts path, None if the split is empty}, "skipped": report dict, "reused": bool}.
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    if max_duration <= 0:
        raise ValueError(f"max_duration must be > 0, got {max_duration}")
    mf.require_inputs({"train_json": train_json, "test_json": test_json}, {"librispeech_root": librispeech_root})
    splits = SPLITS if valid_fraction > 0 else ("train", "test")
    params = dict(seed=seed, valid_fraction=valid_fraction, strict=strict, max_duration=max_duration,
                  decode_audio=decode_audio, root=os.path.abspath(librispeech_root))
    stamp = mf.fingerprint([train_json, test_json], params)
    reused = mf.reuse_previous(out_dir, CORPUS, stamp, force)
    if reused is not None:
        return reused

    report = SkipReport(CORPUS, strict=strict)
    parts = _part_dirs(librispeech_root)
    train = _collect(train_json, librispeech_root, parts, report)
    test = _collect(test_json, librispeech_root, parts, report)
    # the split is drawn over ALL records read from train, before audio checks drop any
    order = np.random.default_rng(seed).permutation(len(train))
    n_valid = int(round(valid_fraction * len(train)))
    valid_ids = {train[i]["id"] for i in order[:n_valid]}
    out: dict[str, list] = {s: [] for s in splits}
    for name, entries in (("train", train), ("test", test)):
        def keep(entry, check, name=name):
            split = "valid" if name == "train" and entry["id"] in valid_ids else name
            out[split].append(_to_pair(entry, check))

        mf.probe_many(entries, "audio", report, "item", max_duration, decode_audio, num_jobs, keep)
    paths = mf.finish(out_dir, CORPUS, out, report, stamp, splits)
    return {"cuts": paths, "skipped": report.to_dict(), "reused": False}
