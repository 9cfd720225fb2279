"""Kill-and-resume: a real `nemo-grpo train` process SIGKILLed after its step-2 checkpoint, then restarted with
`resume: auto`, ends with exactly the metrics and weights of an uninterrupted run with the same seed."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.train.conftest import tiny_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cmd(model_dir, manifests, out):
    # chrF gives the random tiny model a non-zero, varying reward, so every step really updates the weights
    ov = tiny_overrides(model_dir, manifests, out, **{"trainer.max_steps": 5, "trainer.save_every": 1,
                                                      "trainer.val_every": 2, "trainer.test_at_end": False,
                                                      "reward": "chrf", "optim.lr": 1e-3})
    return [sys.executable, "-m", "nemo_grpo.cli", "train", "--config", os.path.join(ROOT, "conf/tiny_grpo.yaml"), *ov]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)


def _metrics(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def _latest(out):
    try:
        with open(os.path.join(out, "checkpoints", "latest")) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


@pytest.mark.integration
def test_sigkill_then_resume_equals_uninterrupted(tiny_model_dir, toy_manifests, tmp_path):
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    ref = subprocess.Popen(_cmd(tiny_model_dir, toy_manifests, full), env=_env(), cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    victim = subprocess.Popen(_cmd(tiny_model_dir, toy_manifests, killed), env=_env(), cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while _latest(killed) != "step_000002" and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert victim.poll() is None, "the run ended before it could be killed"
    victim.send_signal(signal.SIGKILL)  # no cleanup, no flush: whatever is on disk now is what resume sees
    victim.wait()
    assert _latest(killed) in ("step_000002", "step_000003")
    resumed = subprocess.run(_cmd(tiny_model_dir, toy_manifests, killed), env=_env(), cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-3000:]

    a, b = _metrics(full), _metrics(killed)
    assert [r["step"] for r in a] == [r["step"] for r in b]  # no duplicated or missing steps after the resume
    assert a == b  # every non-timing metric (rewards, losses, KL, grad norms, validation BLEU) identical
    assert any("reward/mean" in r for r in a) and any("val/bleu" in r for r in a)
    wa = load_file(os.path.join(full, "checkpoints", "step_000005", "policy", "model.safetensors"))
    wb = load_file(os.path.join(killed, "checkpoints", "step_000005", "policy", "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    w0 = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    common = [(k, k.removeprefix("model.")) for k in wa if k.removeprefix("model.") in w0]  # 5.x vs saved names
    assert len(common) > 50
    assert any(not torch.equal(w0[k0], wa[k]) for k, k0 in common)  # training did move the weights
    assert all(r["groups/zero_variance_frac"] < 1 for r in a if "groups/zero_variance_frac" in r)
