"""CoVoST2 en->de (``covost_v2.en_de.tsv``) + Common Voice (``validated.tsv``, ``clips/``) -> lhotse manifests.

``covost_v2.en_de.tsv``: tab-separated, unquoted, header with at least ``path``, ``translation``, ``split``
(``train`` | ``train_covost`` -> train, ``dev``, ``test``); an optional ``sentence`` / ``client_id`` column is used when
validated.tsv lacks the clip's. Joined on ``path`` with Common Voice ``validated.tsv`` (``path``, ``sentence``,
``client_id``). Clips are mp3 (48 kHz in Common Voice): recordings carry a lhotse resample transform to 16 kHz.
Supervisions carry ``custom = {task: "ast", translation, transcript, source_lang, target_lang[, translations]}``.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from nemo_grpo.data import manifests as mf
from nemo_grpo.data.validation import SkipReport, clean_text, decode_utf8

log = logging.getLogger(__name__)

CORPUS = "covost2"
SPLITS = ("train", "dev", "test")
SPLIT_MAP = {"train": "train", "train_covost": "train", "dev": "dev", "test": "test"}
ALT_SEP = " | "  # the toy corpus's optional "translations" column (all valid translations)


def read_tsv(path: str, required: tuple[str, ...], report: SkipReport) -> list[tuple[str, dict[str, str]]]:
    """(item name, row dict) for every well-formed row of an unquoted TSV with a header.

    Rows with the wrong field count or invalid UTF-8 are counted skips named ``<file>:line <n>``; a header
    lacking a required column is a hard error (the file is not what it claims to be).
    """
    name = os.path.basename(path)
    with open(path, "rb") as f:
        raw_lines = f.read().splitlines()
    if not raw_lines:
        raise ValueError(f"{path}: empty file")
    header_text = decode_utf8(raw_lines[0])
    if header_text is None:
        raise ValueError(f"{path}: header is not valid UTF-8")
    header = header_text.lstrip("\ufeff").split("\t")
    missing = [c for c in required if c not in header]
    if missing:
        raise ValueError(f"{path}: header lacks column(s) {missing}; has {header}")
    rows = []
    for lineno, raw in enumerate(raw_lines[1:], start=2):
        if not raw.strip():
            continue
        item = f"{name}:line {lineno}"
        line = decode_utf8(raw)
        if line is None:
            report.skip("non_utf8", item, "invalid UTF-8 bytes")
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            report.skip("malformed_row", item, f"{len(fields)} fields, header has {len(header)}")
            continue
        rows.append((item, dict(zip(header, fields))))
    return rows


def _sources(validated_tsv: str, report: SkipReport) -> dict[str, dict[str, str]]:
    """path -> {sentence, client_id} from Common Voice; bad rows there are reported but only matter if used."""
    out = {}
    for _, row in read_tsv(validated_tsv, ("path", "sentence", "client_id"), report):
        out.setdefault(row["path"], row)
    return out


def _collect(covost_tsv: str, validated: dict, clips_dir: str, report: SkipReport) -> list[dict]:
    entries, seen = [], {}
    for item, row in read_tsv(covost_tsv, ("path", "translation", "split"), report):
        path, split = row["path"].strip(), SPLIT_MAP.get(row["split"].strip())
        if not path or split is None:
            report.skip("malformed_row", item, f"path={row['path']!r} split={row['split']!r}")
            continue
        translation = clean_text(row["translation"])
        if translation is None:
            report.skip("empty_text", item, f"{path}: empty translation")
            continue
        if path in seen:
            report.skip("duplicate_id", item, f"{path} already listed at {seen[path]}")
            continue
        seen[path] = item
        cv = validated.get(path)
        if cv is None and "sentence" not in row:
            report.skip("unknown_clip", item, f"{path} not in validated.tsv")
            continue
        cv = cv or row
        entry = dict(item=f"{item} ({path})", id=os.path.splitext(os.path.basename(path))[0], split=split,
                     audio=os.path.join(clips_dir, path), translation=translation,
                     transcript=clean_text(cv.get("sentence")) or "", speaker=clean_text(cv.get("client_id")))
        alts = [a.strip() for a in (row.get("translations") or "").split(ALT_SEP) if a.strip()]
        if alts:
            entry["translations"] = alts
        entries.append(entry)
    return entries


def _to_pair(entry: dict, check) -> tuple[Any, Any]:
    from lhotse import SupervisionSegment

    rec = mf.make_recording(entry["audio"], entry["id"])
    custom = {"task": "ast", "translation": entry["translation"], "transcript": entry["transcript"],
              "source_lang": "en", "target_lang": "de"}
    if "translations" in entry:
        custom["translations"] = entry["translations"]
    sup = SupervisionSegment(id=entry["id"], recording_id=rec.id, start=0.0, duration=rec.duration, channel=0,
                             text=entry["transcript"] or None, language="en", speaker=entry["speaker"],
                             custom=custom)
    return rec, sup


def prepare_covost2(
    covost_tsv: str,
    validated_tsv: str,
    clips_dir: str,
    out_dir: str,
    *,
    strict: bool = False,
    max_duration: float = 40.0,
    decode_audio: bool = True,
    num_jobs: int = 2,
    force: bool = False,
) -> dict[str, Any]:
    """Write covost2_{recordings,supervisions,cuts}_{train,dev,test}.jsonl.gz and covost2_skipped.json.

    Same bad-input, strictness and idempotency rules as ``prepare_librisqa``.
    Returns {"cuts": {split: cuts path, None if the split is empty}, "skipped": report dict, "reused": bool}.
    """
    if max_duration <= 0:
        raise ValueError(f"max_duration must be > 0, got {max_duration}")
    mf.require_inputs({"covost_tsv": covost_tsv, "validated_tsv": validated_tsv}, {"clips_dir": clips_dir})
    params = dict(strict=strict, max_duration=max_duration, decode_audio=decode_audio,
                  clips_dir=os.path.abspath(clips_dir))
    stamp = mf.fingerprint([covost_tsv, validated_tsv], params)
    reused = mf.reuse_previous(out_dir, CORPUS, stamp, force)
    if reused is not None:
        return reused

    report = SkipReport(CORPUS, strict=strict)
    # bad rows of validated.tsv only matter when CoVoST uses them: collect them separately and never fail on them
    cv_report = SkipReport(f"{CORPUS}/validated.tsv", strict=False)
    entries = _collect(covost_tsv, _sources(validated_tsv, cv_report), clips_dir, report)
    if cv_report.total:
        log.info(cv_report.summary())
    out: dict[str, list] = {s: [] for s in SPLITS}
    mf.probe_many(entries, "audio", report, "item", max_duration, decode_audio, num_jobs,
                  lambda e, c: out[e["split"]].append(_to_pair(e, c)))
    paths = mf.finish(out_dir, CORPUS, out, report, stamp, SPLITS)
    return {"cuts": paths, "skipped": report.to_dict(), "reused": False}
