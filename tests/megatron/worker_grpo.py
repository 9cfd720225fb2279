"""torchrun worker: a tiny GRPO recipe for a few steps with the given backends.

Usage: torchrun --nproc_per_node=K tests/megatron/worker_grpo.py OUT_JSON RUN [RUN ...] -- OVERRIDE [...]
RUN is ``name:recipe:backend:tp:sp[:lean]`` (e.g. ``mp_tp2sp:tiny_mp_grpo.yaml:megatron:2:1``, recipe a conf/ file;
``lean``: no validation / test evaluation);
each run writes <output_dir>/<name> and OUT_JSON gets
every run's metrics.jsonl rows (rank 0). Runs in one launch share the process group (same world size).
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import _common as C  # noqa: E402,F401  (env + threads)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_one(recipe: str, name: str, backend: str, tp: int, sp: bool, overrides: list[str], lean: bool
            ) -> list[dict]:
    from nemo_grpo.train.cmd import run_config
    from nemo_grpo.train.config import load_config

    out_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir="))
    out_dir = os.path.join(out_dir, name)
    ov = [o for o in overrides if not o.startswith("output_dir=")]
    ov += [f"output_dir={out_dir}", f"model.backend={backend}", f"model.tensor_parallel_size={tp}",
           f"model.sequence_parallel={str(sp).lower()}"]
    if lean:  # training steps only: no validation decode, no test evaluation (the final checkpoint still runs)
        ov += ["trainer.val_every=0", "trainer.test_at_end=false"]
    cfg = load_config(os.path.join(REPO, "conf", recipe), ov)
    summary = run_config(cfg)
    rows = []
    if C.rank() == 0:
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        rows.append({"summary": {k: v for k, v in summary.items() if k in ("step", "best", "test")}})
    return rows


def main() -> None:
    out = sys.argv[1]
    sep = sys.argv.index("--")
    runs, overrides = sys.argv[2:sep], sys.argv[sep + 1:]
    result = {}
    for spec in runs:
        name, recipe, backend, tp, sp, *flags = spec.split(":")
        result[name] = run_one(recipe, name, backend, int(tp), sp == "1", overrides, "lean" in flags)
    C.write_result(out, result)


if __name__ == "__main__":  # dist_checkpointing's spawn-mode writers re-import __main__
    main()
