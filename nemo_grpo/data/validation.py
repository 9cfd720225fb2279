"""Bad-input handling shared by preparation and loading: counted skips (or a hard error) and audio checks.

Every bad item becomes one ``SkipReport.skip(reason, item, detail)``: counted per reason, the first few items named
(logged and written to ``<corpus>_skipped.json``), or raised at once as ``DataError`` when ``strict`` is set.
Reasons used across the package (stable strings, tests and logs rely on them):

    missing_file     audio file not found
    corrupt_audio    unreadable / unsupported / undecodable audio, or non-finite samples
    zero_length      audio with no samples (or fewer than a feature window)
    too_long         audio longer than the configured maximum duration
    empty_text       empty question, answer or translation
    malformed_row    JSON record / TSV row with missing fields, wrong types, wrong field count, unknown split
    non_utf8         text that is not valid UTF-8
    duplicate_id     the same utterance/question listed twice
    unknown_clip     a CoVoST row whose clip is not in Common Voice's validated.tsv
    prompt_too_long  (load time) prompt incl. audio tokens exceeds max_prompt_tokens
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

MIN_SAMPLES = 400  # one 25 ms STFT window at 16 kHz: anything shorter yields no feature frame


class DataError(ValueError):
    """A bad input item under strict mode (names the item and the reason)."""


class SkipReport:
    """Counted skips with the first ``max_examples`` offending items per reason.

    ``strict=True`` turns the first skip into a ``DataError`` naming the item.
    """

    def __init__(self, name: str, strict: bool = False, max_examples: int = 10):
        self.name = name
        self.strict = strict
        self.max_examples = max_examples
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[dict[str, str]]] = {}

    def skip(self, reason: str, item: str, detail: str = "") -> None:
        if self.strict:
            raise DataError(f"{self.name}: {item}: {reason}" + (f" ({detail})" if detail else ""))
        self.counts[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            examples.append({"item": str(item), "detail": str(detail)})
            log.warning("%s: skipping %s: %s%s", self.name, item, reason, f" ({detail})" if detail else "")

    def merge(self, other: "SkipReport | dict") -> None:
        """Add another report's counts and examples (e.g. one shipped with a batch from a worker process)."""
        data = other.to_dict() if isinstance(other, SkipReport) else other
        for reason, n in data.get("counts", {}).items():
            self.counts[reason] += int(n)
            room = self.max_examples - len(self.examples.setdefault(reason, []))
            self.examples[reason].extend(data.get("examples", {}).get(reason, [])[: max(room, 0)])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "total": self.total, "counts": dict(sorted(self.counts.items())),
                "examples": {k: v for k, v in sorted(self.examples.items()) if v}}

    def summary(self) -> str:
        if not self.total:
            return f"{self.name}: nothing skipped"
        parts = ", ".join(f"{r}={n}" for r, n in sorted(self.counts.items()))
        return f"{self.name}: skipped {self.total} ({parts})"

    def write(self, path: str) -> None:
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n")


@dataclass(frozen=True)
class AudioCheck:
    """Result of ``check_audio``: ``reason`` is None when the file is usable."""

    reason: str | None
    detail: str = ""
    sampling_rate: int = 0
    num_samples: int = 0

    @property
    def duration(self) -> float:
        return self.num_samples / self.sampling_rate if self.sampling_rate else 0.0


def check_audio(path: str, max_duration: float, decode: bool = True) -> AudioCheck:
    """Probe (and with ``decode`` fully read) one audio file; never raises for bad audio.

    decode=False reads the header only (fast, misses truncated/corrupt payloads); decode=True also reads every
    sample and rejects non-finite values.
    """
    import numpy as np
    import soundfile as sf

    if not os.path.isfile(path):
        return AudioCheck("missing_file", path)
    if os.path.getsize(path) == 0:
        return AudioCheck("zero_length", "empty file")
    try:
        info = sf.info(path)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError for bad files
        return AudioCheck("corrupt_audio", f"{type(e).__name__}: {e}".strip())
    sr, n = int(info.samplerate), int(info.frames)
    if n <= 0 or sr <= 0 or n * 16000 < MIN_SAMPLES * sr:
        return AudioCheck("zero_length", f"{n} samples at {sr} Hz", sr, max(n, 0))
    if n / sr > max_duration:
        return AudioCheck("too_long", f"{n / sr:.2f} s > {max_duration} s", sr, n)
    if decode:
        try:
            audio, _ = sf.read(path, dtype="float32", always_2d=True)
        except Exception as e:
            return AudioCheck("corrupt_audio", f"decode failed: {type(e).__name__}: {e}".strip(), sr, n)
        if audio.shape[0] == 0:
            return AudioCheck("zero_length", "no samples decoded", sr, 0)
        if not np.isfinite(audio).all():
            return AudioCheck("corrupt_audio", "non-finite samples", sr, n)
        n = int(audio.shape[0])  # mp3 headers may estimate the frame count; trust the decoded length
    return AudioCheck(None, "", sr, n)


def decode_utf8(raw: bytes) -> str | None:
    """Strict UTF-8 decode; None when the bytes are not valid UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def has_surrogates(text: str) -> bool:
    """True for strings decoded with errors='surrogateescape' that contained invalid UTF-8 bytes."""
    return any(0xDC80 <= ord(ch) <= 0xDCFF for ch in text)


def clean_text(value: Any) -> str | None:
    """A stripped, non-empty string or None (wrong type, empty, or NaN from a spreadsheet-like source)."""
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value or None


def positive_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
