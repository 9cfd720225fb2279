"""The ``nemo-grpo`` command line.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``; modules are
imported only when their subcommand runs so ``nemo-grpo --help`` stays fast (NeMo and megatron imports take seconds).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "make-tiny": ("nemo_grpo.policy.tiny", "write a tiny random Granite Speech checkpoint (HF format) offline"),
    "sample": ("nemo_grpo.policy.sample_cmd", "sample completions for an audio file from a checkpoint"),
    "prepare": ("nemo_grpo.data.prepare_cmd", "prepare lhotse manifests: librisqa | covost2 | toy"),
    "train": ("nemo_grpo.train.cmd", "train with a YAML recipe: algorithm grpo | mp_grpo | sft"),
    "evaluate": ("nemo_grpo.evaluation.cmd", "score generated outputs (or a checkpoint) and write paper-style tables"),
    "demo": ("nemo_grpo.train.demo", "the embedded CPU demo: toy corpus, tiny model, SFT then GRPO, results table"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nemo-grpo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.set_defaults(_module=module, _name=name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.print_help()
        return 0 if (not argv or argv[0] in ("-h", "--help")) else 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    sub = argparse.ArgumentParser(prog=f"nemo-grpo {name}", description=COMMANDS[name][1])
    module.add_arguments(sub)
    args = sub.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
