"""Generated-outputs files and evaluating several systems into one paper-style table.

Outputs file format (written by the training loop): JSONL, one object per line
``{"id": str, "hypothesis": str, "reference": str}``; extra keys are allowed and ignored; blank lines are skipped.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from nemo_grpo.evaluation.metrics import corpus_metrics
from nemo_grpo.evaluation.tables import markdown_table, table_rows

log = logging.getLogger(__name__)
REQUIRED_KEYS = ("id", "hypothesis", "reference")


def validate_record(rec: Any, where: str) -> dict[str, Any]:
    """Check one outputs record; ValueError names ``where`` (file:line) and the bad key."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for key in REQUIRED_KEYS:
        if key not in rec:
            raise ValueError(f"{where}: missing key {key!r}")
        if not isinstance(rec[key], str):
            raise ValueError(f"{where}: key {key!r} must be a string, got {type(rec[key]).__name__}")
    return rec


def load_outputs(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read and validate an outputs JSONL file (duplicate ids are an error: they would double-count a pair)."""
    records, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
            rec = validate_record(rec, where)
            if rec["id"] in seen:
                raise ValueError(f"{where}: duplicate id {rec['id']!r} (first on line {seen[rec['id']]})")
            seen[rec["id"]] = lineno
            records.append(rec)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def write_outputs(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> int:
    """Write records as outputs JSONL (validated; UTF-8, not ASCII-escaped). Returns the number written."""
    n = 0
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, rec in enumerate(records):
            validate_record(dict(rec), f"record {i}")
            f.write(json.dumps(dict(rec), ensure_ascii=False) + "\n")
            n += 1
    return n


def evaluate_outputs(systems: Mapping[str, list[dict[str, Any]]], *, avg: bool = False, title: str | None = None,
                     row_header: str = "System", **metric_options) -> dict[str, Any]:
    """Score each system's records and build the table. systems: {row name: records} in display order.

    metric_options go to :func:`corpus_metrics` (lang, bertscore_model, bleu_tokenize, rouge_use_stemmer, ...).
    Returns {"systems": {name: metrics}, "rows": [...], "table_md": str, "avg": bool}.
    """
    if not systems:
        raise ValueError("evaluate_outputs: no systems given")
    results: dict[str, dict[str, Any]] = {}
    for name, records in systems.items():
        for i, rec in enumerate(records):
            validate_record(rec, f"system {name!r} record {i}")
        log.info("scoring %s (%d pairs)", name, len(records))
        results[name] = corpus_metrics([r["hypothesis"] for r in records], [r["reference"] for r in records],
                                       **metric_options)
    return {"systems": results, "rows": table_rows(results, avg=avg), "avg": avg,
            "table_md": markdown_table(results, avg=avg, title=title, row_header=row_header)}


def write_results(result: Mapping[str, Any], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``out_dir/metrics.json`` and ``out_dir/table.md``; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path, table_path = out / "metrics.json", out / "table.md"
    payload = {k: v for k, v in result.items() if k != "table_md"}
    metrics_path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    table_path.write_text(result["table_md"], encoding="utf-8")
    return metrics_path, table_path
