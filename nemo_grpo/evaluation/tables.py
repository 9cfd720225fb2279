"""Paper-style result tables (Tables 1-3): rows = systems, columns BLEU, BERTScore, ROUGE-1/2/L, METEOR [, AVG].

Input is ``{system name: metrics dict}`` as returned by :func:`nemo_grpo.evaluation.metrics.corpus_metrics`, in
display order (e.g. "Granite Speech 2B", "+ SFT", "+ GRPO"). AVG (Table 3) is the plain mean of the six columns
(the paper's BLEU row: mean(44.9, 94.45, 68.56, 53.35, 64.88, 68.48) = 65.77).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nemo_grpo.evaluation.metrics import METRIC_COLUMNS


def table_rows(systems: Mapping[str, Mapping[str, Any]], avg: bool = False) -> list[dict[str, Any]]:
    """One dict per system: {"system", BLEU, ..., METEOR[, "AVG"]}; a missing metric is None (AVG then None)."""
    rows = []
    for name, m in systems.items():
        row: dict[str, Any] = {"system": name}
        for col in METRIC_COLUMNS:
            row[col] = m.get(col)
        if avg:
            vals = [row[c] for c in METRIC_COLUMNS]
            row["AVG"] = None if any(v is None for v in vals) else sum(vals) / len(vals)
        rows.append(row)
    return rows


def _fmt(v: Any, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def markdown_table(systems: Mapping[str, Mapping[str, Any]], *, avg: bool = False, title: str | None = None,
                   row_header: str = "System", digits: int = 2, footnotes: bool = True) -> str:
    """The Markdown table, with a title line and footnotes (BLEU signature, ROUGE/BERTScore settings)."""
    rows = table_rows(systems, avg=avg)
    cols = [*METRIC_COLUMNS, *(["AVG"] if avg else [])]
    head = [row_header, *(f"{c} (↑)" for c in cols)]
    lines = [] if title is None else [f"**{title}**", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * len(cols)) + "|"]
    for row in rows:
        lines.append("| " + " | ".join([row["system"], *(_fmt(row[c], digits) for c in cols)]) + " |")
    if footnotes:
        lines += [""] + _footnotes(systems)
    return "\n".join(lines) + "\n"


def _footnotes(systems: Mapping[str, Mapping[str, Any]]) -> list[str]:
    notes: list[str] = []
    sigs = sorted({m.get("bleu_signature") for m in systems.values() if m.get("bleu_signature")})
    for sig in sigs:
        notes.append(f"- BLEU: sacrebleu corpus BLEU, signature `{sig}`")
    settings = [m.get("settings", {}) for m in systems.values()]
    for key, label in (("rouge_use_stemmer", "ROUGE use_stemmer"), ("rouge_tokenizer", "ROUGE tokenizer"),
                       ("bertscore_model", "BERTScore model")):
        vals = sorted({str(s.get(key)) for s in settings if key in s})
        if vals:
            notes.append(f"- {label}: {', '.join(vals)}")
    ns = {name: m.get("n") for name, m in systems.items()}
    notes.append("- pairs per system: " + ", ".join(f"{k}={v}" for k, v in ns.items()))
    return notes
