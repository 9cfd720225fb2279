"""``nemo-grpo evaluate``: score systems on a test set and write paper-style tables.

A system is either generated outputs or a checkpoint decoded here:

    # outputs JSONL files ({id, hypothesis, reference} per line)
    nemo-grpo evaluate --outputs "Granite Speech 2B=base.jsonl" "+ SFT=sft.jsonl" --out results/ --lang de
    # checkpoints (HF Granite Speech dirs), decoded on a recipe's test split with its evaluation decoding
    nemo-grpo evaluate --config conf/grpo_covost2_2b.yaml data.manifest_dir=/data/covost2/manifests \
        --model "Granite Speech 2B=/ckpt/granite-speech-3.3-2b" "+ GRPO=runs/grpo_covost2_2b/best" --out results/

Both kinds mix in one table (checkpoints first, in the given order). Writes results/metrics.json, results/table.md,
and for every decoded checkpoint results/<row>.jsonl; prints the table. Metric options not given on the command
line come from the recipe's ``eval`` section when ``--config`` is given.
"""
from __future__ import annotations

import argparse
import logging
import os
import re

log = logging.getLogger(__name__)

DEFAULTS = {"lang": "en", "bleu_tokenize": "13a", "bertscore_model": None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--outputs", nargs="+", default=[], metavar="NAME=PATH",
                        help="systems given as outputs JSONL ({id, hypothesis, reference} per line)")
    parser.add_argument("--model", nargs="+", default=[], metavar="NAME=DIR",
                        help="systems given as HF Granite Speech checkpoint dirs, decoded here (needs --config)")
    parser.add_argument("--config", default=None,
                        help="recipe YAML for --model: data (manifest_dir, splits), model backend, eval decoding")
    parser.add_argument("overrides", nargs="*", default=[],
                        help="recipe overrides key=value (with --config; write them right after the recipe path)")
    parser.add_argument("--split", default="test", help="data split decoded for --model (default: test)")
    parser.add_argument("--max-batches", type=int, default=None, help="decode at most this many batches")
    parser.add_argument("--out", required=True, help="directory for metrics.json and table.md")
    parser.add_argument("--lang", default=None, help="target language (non-'en' uses the Unicode ROUGE tokenizer)")
    parser.add_argument("--bertscore-model", default=None,
                        help="local HF model dir for BERTScore; 'minilm' (default: the MiniLM test model, not "
                             "comparable to the paper) or 'none' to skip")
    parser.add_argument("--bertscore-num-layers", type=int, default=6)
    parser.add_argument("--bleu-tokenize", default=None, help="sacrebleu tokenizer for corpus BLEU (default 13a)")
    parser.add_argument("--rouge-stemmer", action="store_true", help="ROUGE use_stemmer=True (recorded)")
    parser.add_argument("--avg", action="store_true", help="add the AVG column (paper Table 3)")
    parser.add_argument("--title", default=None, help="table title line")
    parser.add_argument("--row-header", default="System", help="first column header (e.g. Reward for Table 3)")


def parse_systems(items: list[str], flag: str = "--outputs") -> dict[str, str]:
    """["NAME=path", ...] -> {NAME: path} in order; ValueError names the bad item."""
    systems: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path:
            raise ValueError(f"{flag}: expected NAME=PATH, got {item!r}")
        if name in systems:
            raise ValueError(f"{flag}: system name {name!r} given twice")
        systems[name] = path
    return systems


def outputs_filename(name: str) -> str:
    """A file name for a row name ("+ GRPO" -> "grpo.jsonl")."""
    return (re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.") or "system") + ".jsonl"


def check_output_files(models: dict[str, str], outputs: dict[str, str], out_dir: str) -> None:
    """Every decoded checkpoint gets its own outputs file, and none of them is an ``--outputs`` input."""
    seen: dict[str, str] = {}
    inputs = {os.path.realpath(p) for p in outputs.values()}
    for name in models:
        path = os.path.realpath(os.path.join(out_dir, outputs_filename(name)))
        if path in seen:
            raise ValueError(f"--model rows {seen[path]!r} and {name!r} would both write {path}: rename one")
        if path in inputs:
            raise ValueError(f"--model {name!r} would overwrite the --outputs input {path}: rename it or use "
                             "another --out")
        seen[path] = name


def decode_checkpoints(args: argparse.Namespace, models: dict[str, str]) -> tuple[dict[str, list], dict, bool]:
    """Decode ``args.split`` with every checkpoint in ``models``; returns (records per row, the recipe's metric
    options, whether this is rank 0). Outputs JSONL per row under ``args.out`` (rank 0)."""
    from nemo_grpo.evaluation import write_outputs
    from nemo_grpo.train import runtime
    from nemo_grpo.train.config import load_config
    from nemo_grpo.train.evaluate import decode_model, metric_options

    for name, path in models.items():
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"--model {name}={path}: not a HF checkpoint dir (no config.json)")
    overrides = list(args.overrides)
    if not any(o.startswith("model.path=") for o in overrides):
        overrides.append(f"model.path={next(iter(models.values()))}")  # validation wants one; each row sets its own
    cfg = load_config(args.config, overrides)
    # under torchrun the split is decoded once, sharded over the ranks
    runtime.init_distributed_from_env(cfg.trainer.dist_timeout_minutes)
    records = {name: decode_model(cfg, path, args.split, args.max_batches) for name, path in models.items()}
    rank0 = runtime.world()[0] == 0
    if rank0:
        for name, recs in records.items():
            write_outputs(os.path.join(args.out, outputs_filename(name)), recs)
    return records, metric_options(cfg.eval), rank0


def run(args: argparse.Namespace) -> int:
    from nemo_grpo.evaluation.outputs import evaluate_outputs, load_outputs, write_results

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.outputs and not args.model:
        raise ValueError("evaluate: give --outputs NAME=PATH and/or --model NAME=DIR")
    if args.model and not args.config:
        raise ValueError("evaluate: --model needs --config RECIPE (data, backend and decoding settings)")
    if args.overrides and not args.config:
        raise ValueError(f"evaluate: overrides {args.overrides} need --config")
    paths = parse_systems(args.outputs)
    models = parse_systems(args.model, "--model")
    both = set(paths) & set(models)
    if both:
        raise ValueError(f"evaluate: system name(s) {sorted(both)} given as both --outputs and --model")
    check_output_files(models, paths, args.out)
    systems, options = {}, dict(DEFAULTS)
    if models:
        systems, options, rank0 = decode_checkpoints(args, models)
        if not rank0:
            return 0
    systems.update({name: load_outputs(path) for name, path in paths.items()})
    for key in DEFAULTS:
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    result = evaluate_outputs(systems, avg=args.avg, title=args.title, row_header=args.row_header,
                              bertscore_num_layers=args.bertscore_num_layers, rouge_use_stemmer=args.rouge_stemmer,
                              **options)
    result["inputs"] = {**{n: {"model": p, "split": args.split} for n, p in models.items()}, **paths}
    metrics_path, table_path = write_results(result, args.out)
    print(result["table_md"], end="")
    log.info("wrote %s and %s", metrics_path, table_path)
    return 0
