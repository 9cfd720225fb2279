"""benchmarks/gpu_check.sh --smoke: the GPU check script runs end to end on CPU with a tiny model."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.integration
def test_gpu_check_smoke(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), OMP_NUM_THREADS="1", PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_check.sh"), "--smoke"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["errors"] == {}
    res = report["results"]
    assert set(res) == {"hf", "megatron_bf16", "megatron"}
    for r in res.values():
        assert r["rollout"]["generated_tokens"] > 0 and r["train_step"]["tokens_per_s"] > 0
    # same random checkpoint, same fp32 math: the two backends' first train step agrees
    hf, mg = res["hf"]["train_step"], res["megatron"]["train_step"]
    assert abs(hf["losses"][0] - mg["losses"][0]) < 1e-5
    assert abs(hf["grad_norms"][0] - mg["grad_norms"][0]) < 1e-5 * max(1.0, hf["grad_norms"][0])
    # parity section (the GPU run's bf16 checks), at fp32 here: left-padded prompts of different lengths, the
    # sampled log-probs equal score's, and megatron scores HF's rollout as HF does
    par = res["megatron"]["parity"]
    assert len(par["prompt_lengths"]) > 1
    assert par["generate_vs_score"]["tokens"] > 0 and par["generate_vs_score"]["max_abs"] < 1e-4
    assert res["hf"]["parity"]["generate_vs_score"]["max_abs"] < 1e-4
    assert par["vs_hf"]["tokens"] > 0 and par["vs_hf"]["max_abs"] < 1e-4
    assert "vs_hf" in res["megatron_bf16"]["parity"] and "parity_failures" in report
