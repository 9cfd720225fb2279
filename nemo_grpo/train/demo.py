"""``nemo-grpo demo``: the paper's comparison, end to end, on a CPU in about ten minutes.

1. synthesise the toy corpora with espeak-ng in the real LibriSQA / CoVoST2 formats and prepare lhotse manifests;
2. write a tiny random Granite Speech (``make_tiny``);
3. SFT warm-up (``conf/tiny_sft.yaml``): the tiny model must first learn to emit answers at all;
4. from the SFT checkpoint: GRPO (``conf/tiny_grpo.yaml``), continued SFT for the same CPU time as GRPO
   (the honest equal-compute baseline) and, unless ``--no-mp-grpo``, MP-GRPO (``conf/tiny_mp_grpo.yaml``);
5. evaluate base / SFT / SFT+more / GRPO / MP-GRPO on the held-out toy test splits with the paper's evaluation
   decoding (top-p 0.9, temperature 0.9) and print paper-style tables (toy SQA ~ Table 1, toy AST ~ Table 2).

Every stage runs the same recipes as ``nemo-grpo train`` (composed from ``conf/``, validated, checkpointed), so the
demo is also the end-to-end test of the training stack. Outputs: ``<out>/results/{table.md,metrics.json}``, each
system's ``<out>/results/<system>.jsonl`` and every run's directory (metrics.jsonl, TensorBoard, curves.png).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from typing import Any

log = logging.getLogger(__name__)

SYSTEMS = ("Tiny Granite Speech (base)", "+ SFT", "+ SFT + more SFT (equal compute)", "+ SFT + GRPO",
           "+ SFT + MP-GRPO")


def conf_dir() -> str:
    """The recipes: ``conf/`` of the source tree (or ``nemo_grpo/conf`` when packaged)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(here, "..", "..", "conf"), os.path.join(here, "..", "conf")):
        if os.path.isfile(os.path.join(cand, "tiny_grpo.yaml")):
            return os.path.normpath(cand)
    raise FileNotFoundError("cannot find the conf/ recipes next to the nemo_grpo package")


def prepare_toy(out_dir: str, seed: int, num_items: int) -> str:
    """Synthesise (cached) and prepare the toy corpora; returns the manifest dir for ``conf/data/toy.yaml``."""
    from nemo_grpo.data.prepare_covost2 import prepare_covost2
    from nemo_grpo.data.prepare_librisqa import prepare_librisqa
    from nemo_grpo.data.toy import make_toy_corpora

    idx = make_toy_corpora(os.path.join(out_dir, "toy_raw"), seed=seed, num_qa=num_items, num_st=num_items)
    manifests = os.path.join(out_dir, "toy_manifests")
    q, c = idx["librisqa"], idx["covost2"]
    prepare_librisqa(q["train_json"], q["test_json"], q["librispeech_root"], manifests, seed=seed)
    prepare_covost2(c["covost_tsv"], c["validated_tsv"], c["clips_dir"], manifests)
    return manifests


def train_stage(recipe: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Compose ``conf/<recipe>.yaml`` with overrides, start fresh in its output_dir, train; returns the summary."""
    from nemo_grpo.train.cmd import run_config
    from nemo_grpo.train.config import load_config

    cfg = load_config(os.path.join(conf_dir(), f"{recipe}.yaml"), [f"{k}={v}" for k, v in overrides.items()])
    shutil.rmtree(cfg.output_dir, ignore_errors=True)  # the demo is a fresh experiment; `train` resumes instead
    log.info("=== %s -> %s (%d steps)", recipe, cfg.output_dir, cfg.trainer.max_steps)
    summary = run_config(cfg)
    summary["config"] = cfg
    return summary


def split_ids(manifests: str) -> dict[str, set[str]]:
    from lhotse import CutSet

    return {task: set(CutSet.from_file(os.path.join(manifests, f"{corpus}_cuts_test.jsonl.gz")).ids)
            for task, corpus in (("sqa", "librisqa"), ("ast", "covost2"))}


def evaluate_systems(cfg: Any, systems: dict[str, str], manifests: str, out_dir: str) -> dict[str, Any]:
    """Decode the held-out test split with every system's checkpoint; tables per task (toy SQA, toy AST)."""
    from nemo_grpo.evaluation import evaluate_outputs, write_outputs, write_results
    from nemo_grpo.train.evaluate import decode_model

    ids = split_ids(manifests)
    records = {}
    for i, (name, model_dir) in enumerate(systems.items()):
        records[name] = decode_model(cfg, model_dir, "test")
        write_outputs(os.path.join(out_dir, f"system{i}.jsonl"), records[name])
    results = {}
    for task, lang, title in (("sqa", "en", "Toy spoken QA (LibriSQA format), held-out test"),
                              ("ast", "de", "Toy speech translation en-de (CoVoST2 format), held-out test")):
        per = {name: [r for r in recs if r["id"] in ids[task]] for name, recs in records.items()}
        results[task] = evaluate_outputs(per, title=title, lang=lang, bertscore_model="none")
        write_results(results[task], os.path.join(out_dir, task))
    overall = evaluate_outputs(records, title="Both toy tasks, held-out test", lang="de", bertscore_model="none")
    write_results(overall, os.path.join(out_dir, "all"))
    results["all"] = overall
    return results


def run_demo(out_dir: str, *, seed: int = 0, num_items: int = 1500, sft_steps: int = 3000, grpo_steps: int = 300,
             mp_grpo: bool = True, extra: dict[str, Any] | None = None, manifests: str | None = None,
             tiny: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole demo (see the module docstring). ``extra``: overrides applied to every stage (tests shrink it);
    ``manifests``: an already prepared toy manifest dir (skips synthesis); ``tiny``: ``make_tiny`` options
    (e.g. ``{"logits_scaling": 1.0}``; default: its DEFAULTS)."""
    from nemo_grpo.policy.tiny import make_tiny

    t0 = time.perf_counter()
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    manifests = manifests or prepare_toy(out_dir, seed, num_items)
    t_data = time.perf_counter() - t0
    base = make_tiny(os.path.join(out_dir, "tiny_model"), seed=seed, **(tiny or {}))
    common = {"data.manifest_dir": manifests, "seed": seed, "trainer.test_at_end": False, **(extra or {})}

    sft = train_stage("tiny_sft", {**common, "model.path": base, "output_dir": os.path.join(out_dir, "sft"),
                                   "trainer.max_steps": sft_steps, "trainer.val_every": max(1, sft_steps // 4),
                                   "trainer.save_every": sft_steps})
    sft_dir = os.path.join(out_dir, "sft", "best")
    cpu_per_sft_step = sft["cpu_s"] / sft_steps
    grpo = train_stage("tiny_grpo", {**common, "model.path": sft_dir, "output_dir": os.path.join(out_dir, "grpo"),
                                     "trainer.max_steps": grpo_steps, "trainer.val_every": max(1, grpo_steps // 5),
                                     "trainer.save_every": grpo_steps})
    # Equal compute: as many more SFT steps as fit in GRPO's CPU time at the warm-up's measured CPU cost per step
    # (CPU seconds of this process, not wall-clock, so other load on the machine does not tilt the comparison).
    more_steps = max(1, round(grpo["cpu_s"] / cpu_per_sft_step))
    sft_more = train_stage("tiny_sft", {**common, "model.path": sft_dir, "output_dir": os.path.join(out_dir, "sft_more"),
                                        "trainer.max_steps": more_steps, "optim.warmup_ratio": 0.0,
                                        # continue at the warm-up's final learning rate (= GRPO's lr)
                                        "optim.schedule": "constant", "optim.lr": sft["config"].optim.lr
                                        * sft["config"].optim.min_lr_ratio,
                                        "trainer.val_every": max(1, more_steps // 5), "trainer.save_every": more_steps})
    systems = {SYSTEMS[0]: base, SYSTEMS[1]: sft_dir, SYSTEMS[2]: os.path.join(out_dir, "sft_more", "best"),
               SYSTEMS[3]: os.path.join(out_dir, "grpo", "best")}
    runs = {"sft": sft, "grpo": grpo, "sft_more": sft_more}
    if mp_grpo:
        runs["mp_grpo"] = train_stage("tiny_mp_grpo", {
            **common, "model.path": sft_dir, "output_dir": os.path.join(out_dir, "mp_grpo"),
            "trainer.max_steps": grpo_steps, "trainer.val_every": max(1, grpo_steps // 5),
            "trainer.save_every": grpo_steps})
        systems[SYSTEMS[4]] = os.path.join(out_dir, "mp_grpo", "best")
    results = evaluate_systems(grpo["config"], systems, manifests, os.path.join(out_dir, "results"))
    bleu = {name: m["BLEU"] for name, m in results["all"]["systems"].items()}
    report = {
        "seed": seed, "num_items_per_task": num_items, "wall_s": time.perf_counter() - t0, "data_s": t_data,
        "steps": {"sft": sft_steps, "grpo": grpo_steps, "sft_more": more_steps,
                  "mp_grpo": grpo_steps if mp_grpo else None},
        "run_wall_s": {k: v["wall_s"] for k, v in runs.items()},
        "run_cpu_s": {k: v["cpu_s"] for k, v in runs.items()},
        "test_bleu_all": bleu, "systems": systems,
        "grpo_beats_sft": bleu[SYSTEMS[3]] > bleu[SYSTEMS[1]],
    }
    with open(os.path.join(out_dir, "results", "demo.json"), "w") as f:
        json.dump(report, f, indent=2)
    report["tables"] = [results[k]["table_md"] for k in ("sqa", "ast", "all")]
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="working directory (corpus cache, runs, results)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-items", type=int, default=1500, help="training utterances per toy task")
    parser.add_argument("--sft-steps", type=int, default=3000, help="SFT warm-up steps (batches of 8 prompts)")
    parser.add_argument("--grpo-steps", type=int, default=300, help="GRPO / MP-GRPO steps (8 prompts x G=8)")
    parser.add_argument("--no-mp-grpo", action="store_true", help="skip the MP-GRPO row (saves ~1.5 min)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on 2 shared cores)")


def run(args: argparse.Namespace) -> int:
    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    report = run_demo(args.out, seed=args.seed, num_items=args.num_items, sft_steps=args.sft_steps,
                      grpo_steps=args.grpo_steps, mp_grpo=not args.no_mp_grpo)
    print()
    for table in report["tables"]:
        print(table)
    steps = report["steps"]
    print(f"Steps: SFT warm-up {steps['sft']}, GRPO {steps['grpo']}, more SFT {steps['sft_more']} (same CPU time "
          f"as GRPO), MP-GRPO {steps['mp_grpo']}. Evaluation decoding: top-p 0.9, temperature 0.9, seed fixed.")
    b = report["test_bleu_all"]
    verdict = "beats" if report["grpo_beats_sft"] else "does NOT beat"
    print(f"GRPO {verdict} its SFT starting point on held-out BLEU: {b[SYSTEMS[3]]:.2f} vs {b[SYSTEMS[1]]:.2f} "
          f"(equal-compute SFT: {b[SYSTEMS[2]]:.2f}). Total {report['wall_s'] / 60:.1f} min; results in "
          f"{os.path.join(os.path.abspath(args.out), 'results')}")
    return 0
