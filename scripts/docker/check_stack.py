"""Smoke check run at the end of the Dockerfile build: the container's stack is one nemo_grpo can run on.

    python scripts/docker/check_stack.py                       # inside the image: imports + versions
    python scripts/docker/check_stack.py --megatron-core 0.16.0rc0   # only the version rule (exit 1 if refused)

The version rule compares the release part only: NGC images carry pre-release / dev megatron-core strings
(``0.16.0rc0``, ``0.15.0.dev0+...``), and PEP 440 orders ``0.16.0rc0`` BEFORE ``0.16``, so a plain
``Version(mc) >= Version("0.16")`` refused a 0.16 release candidate.
"""
from __future__ import annotations

import argparse
import sys

MIN_MEGATRON_CORE = (0, 16)  # the backend was written against 0.16.1 (TransformerConfig / optimizer APIs)


def megatron_core_ok(version: str) -> bool:
    from packaging.version import Version

    return Version(version).release[:2] >= MIN_MEGATRON_CORE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megatron-core", help="check only this version string against the rule")
    args = parser.parse_args(argv)
    if args.megatron_core is not None:
        ok = megatron_core_ok(args.megatron_core)
        print(f"megatron-core {args.megatron_core}: {'ok' if ok else 'too old, need >= 0.16'}")
        return 0 if ok else 1

    import megatron.core  # noqa: F401
    import torch
    import transformers
    from megatron.core.extensions.transformer_engine import HAVE_TE
    from megatron.core.package_info import __version__ as mc
    from nemo.collections.common.data.lhotse import get_lhotse_dataloader_from_config  # noqa: F401
    from transformers import GraniteSpeechForConditionalGeneration  # noqa: F401

    if not megatron_core_ok(mc):
        print(f"megatron-core {mc} < 0.16: use a base image that ships >= 0.16 (BASE_IMAGE)", file=sys.stderr)
        return 1
    print("torch", torch.__version__, "| megatron-core", mc, "| TE", HAVE_TE, "| transformers",
          transformers.__version__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
