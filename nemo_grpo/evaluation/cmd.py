"""``nemo-grpo evaluate``: score generated-outputs JSONL files and write paper-style tables.

    nemo-grpo evaluate --outputs "Granite Speech 2B=base.jsonl" "+ SFT=sft.jsonl" "+ GRPO=grpo.jsonl" \
        --out results/ --lang de --bertscore-model /path/to/model [--avg]

writes results/metrics.json and results/table.md and prints the table.
"""
from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--outputs", nargs="+", required=True, metavar="NAME=PATH",
                        help="one or more systems: row name = outputs JSONL ({id, hypothesis, reference} per line)")
    parser.add_argument("--out", required=True, help="directory for metrics.json and table.md")
    parser.add_argument("--lang", default="en", help="target language (non-'en' uses the Unicode ROUGE tokenizer)")
    parser.add_argument("--bertscore-model", default=None,
                        help="local HF model dir for BERTScore; 'minilm' (default: the MiniLM test model, not "
                             "comparable to the paper) or 'none' to skip")
    parser.add_argument("--bertscore-num-layers", type=int, default=6)
    parser.add_argument("--bleu-tokenize", default="13a", help="sacrebleu tokenizer for corpus BLEU")
    parser.add_argument("--rouge-stemmer", action="store_true", help="ROUGE use_stemmer=True (recorded)")
    parser.add_argument("--avg", action="store_true", help="add the AVG column (paper Table 3)")
    parser.add_argument("--title", default=None, help="table title line")
    parser.add_argument("--row-header", default="System", help="first column header (e.g. Reward for Table 3)")


def parse_systems(items: list[str]) -> dict[str, str]:
    """["NAME=path", ...] -> {NAME: path} in order; ValueError names the bad item."""
    systems: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path:
            raise ValueError(f"--outputs: expected NAME=PATH, got {item!r}")
        if name in systems:
            raise ValueError(f"--outputs: system name {name!r} given twice")
        systems[name] = path
    return systems


def run(args: argparse.Namespace) -> int:
    from nemo_grpo.evaluation.outputs import evaluate_outputs, load_outputs, write_results

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    paths = parse_systems(args.outputs)
    systems = {name: load_outputs(path) for name, path in paths.items()}
    result = evaluate_outputs(systems, avg=args.avg, title=args.title, row_header=args.row_header, lang=args.lang,
                              bertscore_model=args.bertscore_model, bertscore_num_layers=args.bertscore_num_layers,
                              bleu_tokenize=args.bleu_tokenize, rouge_use_stemmer=args.rouge_stemmer)
    result["inputs"] = paths
    metrics_path, table_path = write_results(result, args.out)
    print(result["table_md"], end="")
    log.info("wrote %s and %s", metrics_path, table_path)
    return 0
