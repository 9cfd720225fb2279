"""Evaluation: corpus metrics (x100) as in the paper, generated-outputs JSONL files, paper-style tables."""
from nemo_grpo.evaluation.metrics import METRIC_COLUMNS, corpus_bleu, corpus_metrics
from nemo_grpo.evaluation.outputs import evaluate_outputs, load_outputs, write_outputs, write_results
from nemo_grpo.evaluation.tables import markdown_table, table_rows

__all__ = ["METRIC_COLUMNS", "corpus_bleu", "corpus_metrics", "evaluate_outputs", "load_outputs",
           "markdown_table", "table_rows", "write_outputs", "write_results"]
