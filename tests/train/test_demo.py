"""`nemo-grpo demo`'s pipeline end to end at toy scale: every stage trains through the real recipes, every system
is decoded on the held-out test split and lands in the tables. (That GRPO beats SFT is a claim about the full-size
demo run, recorded in results/demo.json; a seconds-long run cannot show it.)"""
import json
import os

import pytest

from nemo_grpo.train.demo import SYSTEMS, run_demo
from tests.train.conftest import tiny_overrides


@pytest.mark.integration
def test_demo_pipeline_small(toy_manifests, tmp_path):
    extra = dict(o.split("=", 1) for o in tiny_overrides("x", toy_manifests, "x"))
    for k in ("model.path", "output_dir", "data.manifest_dir"):
        extra.pop(k)
    report = run_demo(str(tmp_path), sft_steps=4, grpo_steps=2, mp_grpo=True, extra=extra, manifests=toy_manifests)
    assert list(report["test_bleu_all"]) == list(SYSTEMS)
    assert report["steps"]["sft_more"] >= 1 and report["run_cpu_s"]["grpo"] > 0
    results = tmp_path / "results"
    saved = json.loads((results / "demo.json").read_text())
    assert saved["test_bleu_all"] == report["test_bleu_all"]
    for task in ("sqa", "ast", "all"):
        table = (results / task / "table.md").read_text()
        assert all(f"| {name} |" in table for name in SYSTEMS)
    n = [sum(1 for _ in open(results / f"system{i}.jsonl")) for i in range(len(SYSTEMS))]
    assert len(set(n)) == 1 and n[0] > 0  # every system decoded the whole test split
    for run in ("sft", "grpo", "sft_more", "mp_grpo"):
        assert os.path.isfile(tmp_path / run / "best" / "model.safetensors")
