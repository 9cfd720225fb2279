"""Shared lhotse manifest writing for the ``prepare_<corpus>`` functions: one cut per supervision, atomic writes.

Output files in ``out_dir`` for each split::

    <corpus>_recordings_<split>.jsonl.gz   lhotse RecordingSet (mp3 sources carry a resample-to-16 kHz transform)
    <corpus>_supervisions_<split>.jsonl.gz lhotse SupervisionSet (custom: task, question/answer or translation, ...)
    <corpus>_cuts_<split>.jsonl.gz         lhotse CutSet, one MonoCut per supervision (what the loaders read)
    <corpus>_skipped.json                  SkipReport of everything left out, with the first offending items
    <corpus>_prepare.json                  the arguments + input fingerprints of the run (idempotency stamp)
"""
from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Sequence

from nemo_grpo.data.validation import AudioCheck, SkipReport, check_audio, write_text_atomic

log = logging.getLogger(__name__)

SAMPLING_RATE = 16000


def cuts_path(out_dir: str, corpus: str, split: str) -> str:
    return os.path.join(out_dir, f"{corpus}_cuts_{split}.jsonl.gz")


def fingerprint(paths: Iterable[str], params: dict[str, Any]) -> dict[str, Any]:
    """What a re-run compares to decide whether outputs are current: params + (size, mtime) of each input file."""
    files = {}
    for p in paths:
        st = os.stat(p)
        files[os.path.abspath(p)] = [st.st_size, int(st.st_mtime_ns)]
    return {"params": params, "inputs": files}


def up_to_date(out_dir: str, corpus: str, stamp: dict[str, Any]) -> dict[str, str | None] | None:
    """The outputs {split: cuts path or None} of an earlier run with the same stamp, if all still exist."""
    path = os.path.join(out_dir, f"{corpus}_prepare.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        previous = json.load(f)
    written = previous.pop("written", {})
    if previous != stamp or not all(p is None or os.path.exists(p) for p in written.values()):
        return None
    return written


def require_inputs(files: dict[str, str], dirs: dict[str, str]) -> None:
    """FileNotFoundError naming the argument when an input file or directory is missing (checked before any work)."""
    for key, path in files.items():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{key}: no such file: {path}")
    for key, path in dirs.items():
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{key}: no such directory: {path}")


def reuse_previous(out_dir: str, corpus: str, stamp: dict[str, Any], force: bool) -> dict[str, Any] | None:
    """The result of an earlier identical ``prepare_<corpus>`` run (idempotence), or None when it must run."""
    previous = None if force else up_to_date(out_dir, corpus, stamp)
    if previous is None:
        return None
    log.info("%s manifests in %s are up to date", corpus, out_dir)
    with open(os.path.join(out_dir, f"{corpus}_skipped.json"), encoding="utf-8") as f:
        return {"cuts": previous, "skipped": json.load(f), "reused": True}


def check_all(paths: Sequence[str], max_duration: float, decode: bool, num_jobs: int) -> list[AudioCheck]:
    """``check_audio`` over many files; threads because soundfile releases the GIL while decoding."""
    with ThreadPoolExecutor(max_workers=max(1, num_jobs)) as pool:
        return list(pool.map(lambda p: check_audio(p, max_duration, decode), paths))


def make_recording(path: str, recording_id: str):
    """A lhotse Recording of ``path`` resampled (lazily, by lhotse) to 16 kHz when stored at another rate."""
    from lhotse import Recording

    rec = Recording.from_file(path, recording_id=recording_id)
    return rec if rec.sampling_rate == SAMPLING_RATE else rec.resample(SAMPLING_RATE)


def write_split(out_dir: str, corpus: str, split: str, items: list[tuple[Any, Any]]) -> str:
    """Write recordings, supervisions and cuts of one split from (Recording, SupervisionSegment) pairs."""
    from lhotse import CutSet, MonoCut, RecordingSet, SupervisionSet

    recordings = RecordingSet.from_recordings({r.id: r for r, _ in items}.values())
    supervisions = SupervisionSet.from_segments([s for _, s in items])
    cuts = CutSet.from_cuts(
        MonoCut(id=s.id, start=0.0, duration=r.duration, channel=0, recording=r, supervisions=[s])
        for r, s in items
    )
    for kind, manifest in (("recordings", recordings), ("supervisions", supervisions), ("cuts", cuts)):
        path = os.path.join(out_dir, f"{corpus}_{kind}_{split}.jsonl.gz")
        tmp = path.replace(".jsonl.gz", f".tmp{os.getpid()}.jsonl.gz")
        manifest.to_file(tmp)
        os.replace(tmp, path)
    log.info("%s %s: %d cuts, %.1f h", corpus, split, len(cuts), sum(r.duration for r, _ in items) / 3600)
    return cuts_path(out_dir, corpus, split)


def finish(out_dir: str, corpus: str, splits: dict[str, list], report: SkipReport, stamp: dict[str, Any],
           split_names: Sequence[str]) -> dict[str, str]:
    """Validate that something is left, then write every split, the skip report and the stamp.

    No usable item at all is an error. An empty split only warns: its manifests are NOT written (lhotse reads an
    empty manifest back as None, which would break loaders later) and its path is None."""
    empty = [s for s in split_names if not splits.get(s)]
    if len(empty) == len(split_names):
        raise ValueError(f"{corpus}: no usable items left in any split; {report.summary()}")
    if empty:
        log.warning("%s: split(s) %s are EMPTY after validation (not written); %s", corpus, empty, report.summary())
    os.makedirs(out_dir, exist_ok=True)
    paths: dict[str, str | None] = {}
    for s in split_names:
        if s in empty:
            for kind in ("recordings", "supervisions", "cuts"):  # never leave a stale split from an earlier run
                stale = os.path.join(out_dir, f"{corpus}_{kind}_{s}.jsonl.gz")
                if os.path.exists(stale):
                    os.remove(stale)
            paths[s] = None
        else:
            paths[s] = write_split(out_dir, corpus, s, splits[s])
    report.write(os.path.join(out_dir, f"{corpus}_skipped.json"))
    write_text_atomic(os.path.join(out_dir, f"{corpus}_prepare.json"),
                      json.dumps({**stamp, "written": paths}, indent=1) + "\n")
    log.info(report.summary())
    return paths


def probe_many(entries: list[dict], path_key: str, report: SkipReport, item_key: str, max_duration: float,
               decode: bool, num_jobs: int, on_ok: Callable[[dict, AudioCheck], None]) -> None:
    """Check the audio of every entry; bad ones become skips (named by ``entry[item_key]``), good ones go to on_ok."""
    checks = check_all([e[path_key] for e in entries], max_duration, decode, num_jobs)
    for entry, check in zip(entries, checks):
        if check.reason is not None:
            report.skip(check.reason, entry[item_key], check.detail)
        else:
            on_ok(entry, check)
