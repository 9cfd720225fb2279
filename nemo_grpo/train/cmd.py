"""``nemo-grpo train --config conf/grpo_librisqa_2b.yaml [key=value ...]``: compose, validate, run one recipe.

Overrides are hydra-style: ``model.path=/ckpt/granite-speech-3.3-2b trainer.max_steps=100 data=covost2_en_de``.
Launch with ``torchrun --nproc_per_node=K`` for data (and, with the megatron backend, tensor) parallelism.
``--dry-run`` validates and prints the composed config (stdout, JSON) and the per-GPU memory plan
(``nemo_grpo.train.memory_plan``, stderr) for ``--world-size`` GPUs (default: ``$WORLD_SIZE``, else the recipe's
tensor parallel size), without building anything. The plan is skipped (with a note) when ``model.path`` has no
``config.json`` and names no released preset.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="recipe YAML (e.g. conf/grpo_librisqa_2b.yaml)")
    parser.add_argument("overrides", nargs="*", help="hydra-style overrides key=value")
    parser.add_argument("--dry-run", action="store_true", help="compose + validate, print the config, exit")
    parser.add_argument("--world-size", "--gpus", dest="world_size", type=int, default=None,
                        help="--dry-run: GPUs to plan memory for (default $WORLD_SIZE, else model.tensor_parallel_size)")
    parser.add_argument("--log-level", default="INFO")


def run_config(cfg: Any) -> dict[str, Any]:
    """Dispatch a validated ``TrainConfig`` to its recipe; returns the run summary."""
    if cfg.algorithm == "sft":
        from nemo_grpo.train.sft import train_sft

        return train_sft(cfg)
    from nemo_grpo.train.grpo import train_grpo

    return train_grpo(cfg)


def memory_plan_text(cfg: Any, world_size: int | None = None, shapes: Any = None) -> str:
    """The per-GPU memory plan table of ``cfg`` on ``world_size`` GPUs (None: ``$WORLD_SIZE``, else one
    tensor-parallel group); ``shapes`` default to ``model.path``'s. Raises ValueError for a world size the recipe
    cannot run on or a model path without shapes."""
    from nemo_grpo.train.memory_plan import format_plan, load_shapes, plan_memory

    if world_size is None:
        env = os.environ.get("WORLD_SIZE")
        world_size = int(env) if env else (cfg.model.tensor_parallel_size if cfg.model.backend == "megatron" else 1)
    shapes = shapes if shapes is not None else load_shapes(cfg.model.path)
    return format_plan(plan_memory(shapes, cfg, world_size), shapes)


def run(args: argparse.Namespace) -> int:
    from nemo_grpo.train.config import load_config

    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        if not args.dry_run and not os.path.isdir(cfg.model.path):
            raise ValueError(f"config key 'model.path': {cfg.model.path!r} is not a directory (set model.path= to "
                             "a local Granite Speech checkpoint)")
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(json.dumps(cfg.to_dict(), indent=2))  # stdout stays the config alone (scripts parse it)
        from nemo_grpo.train.memory_plan import load_shapes

        try:
            shapes = load_shapes(cfg.model.path)
        except ValueError as e:  # a dry run may name a checkpoint that is not here: validate, skip the plan
            print(f"memory plan skipped: {e}", file=sys.stderr)
            return 0
        try:
            print(memory_plan_text(cfg, args.world_size, shapes), file=sys.stderr)
        except ValueError as e:
            print(f"config error: {e}", file=sys.stderr)
            return 2
        return 0
    summary = run_config(cfg)
    if summary.get("test"):
        log.info("test BLEU %.2f", summary["test"]["BLEU"])
    return 0
