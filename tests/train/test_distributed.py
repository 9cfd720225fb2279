"""Data parallelism through torchrun (2 CPU ranks, gloo, HF backend): data sharded by rank, one log writer, per-rank
RNG states in checkpoints, the validation/test splits decoded once across ranks with nothing lost or doubled."""
import json
import os
import subprocess
import sys

import pytest

from tests.train.conftest import tiny_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def torchrun_train(overrides, out):
    """``nemo-grpo train`` of conf/tiny_grpo.yaml on 2 CPU ranks (torchrun, gloo); returns its metrics rows."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "nemo_grpo.cli", "train", "--config", os.path.join(ROOT, "conf", "tiny_grpo.yaml"), *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.mark.integration
def test_two_rank_data_parallel_run(tiny_model_dir, toy_manifests, tmp_path):
    from lhotse import CutSet

    out = str(tmp_path / "dp")
    ov = tiny_overrides(tiny_model_dir, toy_manifests, out, **{"trainer.max_steps": 2, "trainer.val_every": 1,
                                                              "trainer.save_every": 1, "reward": "chrf",
                                                              "trainer.val_max_batches": "null"})
    rows = torchrun_train(ov, out)
    assert sorted({r["step"] for r in rows}) == [1, 2] and len([r for r in rows if "reward/mean" in r]) == 2
    ckpt = os.path.join(out, "checkpoints", "step_000002")
    assert os.path.isfile(os.path.join(ckpt, "rng_rank0.pt")) and os.path.isfile(os.path.join(ckpt, "rng_rank1.pt"))
    test_ids = [json.loads(line)["id"] for line in open(os.path.join(out, "test_outputs.jsonl"))]
    expected = set()
    for corpus, split in (("librisqa", "test"), ("covost2", "test")):
        expected |= set(CutSet.from_file(os.path.join(toy_manifests, f"{corpus}_cuts_{split}.jsonl.gz")).ids)
    assert len(test_ids) == len(set(test_ids)) and set(test_ids) == expected


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["hf_dp2", "megatron_tp2"])
def test_dynamic_sampling_under_torchrun(backend, tiny_model_dir, toy_manifests, tmp_path):
    """Dynamic sampling refills per rank (ranks may need different numbers of rollouts: the random tiny policy
    scores BLEU 0 on most groups); the collectives that follow (loss normaliser, gradient reduction, metrics) still
    line up: 2 ranks, HF data parallel, and megatron TP=2 (+SP) where both ranks of the TP group must decide alike."""
    out = str(tmp_path / backend)
    extra = {"trainer.max_steps": 3, "trainer.val_every": 0, "trainer.test_at_end": False,
             "grpo.dynamic_sampling": True, "grpo.dynamic_sampling_max_rounds": 3}
    if backend == "megatron_tp2":
        extra.update({"model.backend": "megatron", "model.tensor_parallel_size": 2, "model.sequence_parallel": True})
    ov = tiny_overrides(tiny_model_dir, toy_manifests, out, **extra)
    rows = torchrun_train(ov, out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(1 <= r["dynamic_sampling/rounds"] <= 3 for r in rows)
    assert any(r["dynamic_sampling/rounds"] > 1 for r in rows)  # refills happened
    # mu = 1: every counted token's ratio is 1; a rank without counted tokens must not drag the global mean/max
    for r in rows:
        if "train/skipped_update" not in r:
            assert abs(r["loss/on/ratio_mean"] - 1) < 1e-4 and abs(r["loss/on/ratio_max"] - 1) < 1e-4, r


@pytest.mark.integration
def test_two_rank_resume_with_dynamic_sampling_continues_exactly(tiny_model_dir, toy_manifests, tmp_path):
    """Ranks refill independently, so their data positions differ; each rank's own position is checkpointed and
    restored: 2 steps + resume to 4 equals 4 uninterrupted steps (2 ranks, gloo)."""
    import torch

    def run(out, steps):
        ov = tiny_overrides(tiny_model_dir, toy_manifests, out, **{
            "trainer.max_steps": steps, "trainer.val_every": 0, "trainer.test_at_end": False,
            "trainer.save_every": 1, "data.train.batch_size": 1, "grpo.dynamic_sampling": True,
            "grpo.dynamic_sampling_max_rounds": 6})
        return torchrun_train(ov, out)

    full = run(str(tmp_path / "full"), 4)
    part = str(tmp_path / "part")
    run(part, 2)
    ckpt = os.path.join(part, "checkpoints", "step_000002")
    pos = [torch.load(os.path.join(ckpt, f"rng_rank{r}.pt"), weights_only=False)["data"] for r in (0, 1)]
    assert pos[0] != pos[1]  # the ranks really are at different positions (what a rank-0-only save would lose)
    resumed = run(part, 4)  # resume: auto
    strip = [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in resumed]
    assert [r["step"] for r in strip] == [1, 2, 3, 4]
    assert strip[2:] == [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in full[2:]]
