"""The real multi-node code path on one CPU box: two ``torchrun`` launches ("nodes") meet at a c10d rendezvous.

Each launch is what ``scripts/slurm/grpo_multinode.sbatch`` runs on one node: ``torchrun --nnodes=2
--nproc_per_node=2 --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT --rdzv_id=ID -m nemo_grpo.cli train ...``.
The megatron backend forms world 4 = TP 2 x DP 2 with TP ranks adjacent, so each launch's two local ranks are one
tensor-parallel group and data parallelism (gradient all-reduce, distributed optimizer, data sharding, metric
reductions) crosses the two launches.

The reference is ONE plain process (``python -m nemo_grpo.cli train``, HF backend, no torch.distributed) that sees
the same global batch. What "same" needs, and how this test gets it:
- the same prompts: the train split is read with ``sequential: true`` (fixed order; DP rank r takes cuts with
  ``index % DP == r``), so DP=2 x 2 prompts per rank covers exactly the single run's 4 prompts of each step (in a
  different order, which the order-invariant loss ignores). NeMo's bucketing sampler draws rank-specific batches
  that no single-process batch reproduces.
- the same completions: every DP rank samples from its own generator (seeded by its DP rank), so stochastic
  samples cannot match a single process by construction. Training sampling runs at temperature 1 with
  ``top_p=1e-9``: the nucleus is the top token alone, so every draw is the argmax whatever the generator, while
  the recorded log-probs stay those of the full distribution (pi_old, the KL and the entropy are unchanged).
  Greedy groups have zero reward variance under plain GRPO, so the recipe is the tiny MP-GRPO one: the reference
  answer in every group gives non-zero advantages from step 1; the loss, DP reductions and optimizer path are
  the GRPO recipe's (``nemo_grpo.train.grpo``), plus the off-policy member.
- a model that answers: greedy decoding of the random tiny model repeats a special token (empty texts, reward 0),
  so the fixture first runs 300 SFT steps (the real ``tiny_sft`` recipe, ~15 s); its greedy answers then get
  non-zero, prompt-dependent chrF and stop at eos at different lengths.

Compared per step (after DP averaging of rank-local scalars): ``train/loss`` (globally normalised, so the DP mean
is the global loss), ``reward/mean`` (equal counts per rank), the counted tokens (DP mean x DP = the global count)
and ``train/grad_norm`` (of the DP-averaged gradient). Steps 2-3 start from weights updated across the two
launches, so their losses also check the cross-"node" gradient all-reduce and the distributed optimizer step.

Measured (fp32, 3 steps): train/loss equal to <= 6e-7 relative at every step; grad_norm 2.7e-6 at step 1 and up to
8e-5 at steps 2-3. The grad-norm gap is a property of data parallelism itself, not of megatron or the launches: the
HF backend at DP=2 (one launch) differs from the single process by the same amounts, while megatron TP=2 x DP=2
over two launches matches HF DP=2 to < 1e-6, and micro-batching inside one process (4 x 4 sequences) matches it
exactly. So the gap comes from splitting the prompt batch: each DP rank encodes and pads its own 2 prompts, which
(most likely) moves the forward at rounding level, and the step-1 gradient by ~1e-6; Adam's elementwise
m / sqrt(v) then turns rounding-level gradient elements into full-size +-lr steps, so step 2 sees ~1e-4. Hence:
step-1 grad norm at 2e-5, later grad norms at 1e-3, losses at 1e-5 throughout. Negative controls (measured):
stochastic sampling (top_p 1) is off by 2.4 % in the step-1 loss and 9 % in the grad norm; a single run with only
2 prompts per step, by 8 % and 20 %.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(ROOT, "conf", "tiny_mp_grpo.yaml")
STEPS = 3
DP = 2  # launches ("nodes")
TP = 2  # ranks per launch = one tensor-parallel group
PROMPTS_PER_RANK = 2
TIMEOUT_S = 420  # whole test; it takes ~1 min on an idle 2-core box
SFT_STEPS = 300
COMPARED = {"train/loss": 1e-5, "reward/mean": 1e-5, "train/lr": 1e-7}  # relative tolerances, every step
GRAD_NORM_TOL = {1: 2e-5}  # step -> relative tolerance; later steps: LATER_GRAD_NORM_TOL (see the module docstring)
LATER_GRAD_NORM_TOL = 1e-3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(model_dir: str, manifests: str, out_dir: str, prompts_per_step: int) -> list[str]:
    """The tiny MP-GRPO recipe, shrunk; ``prompts_per_step`` prompts per DP rank per step (sequential order)."""
    train = ("{sequential:true,batch_size:%d,input_cfg:[{type:lhotse,cuts_path:librisqa_cuts_train.jsonl.gz},"
             "{type:lhotse,cuts_path:covost2_cuts_train.jsonl.gz}]}" % prompts_per_step)
    # replace (not merge into) the bucketing train section: null first, then the sequential one
    ov = [("model.path", model_dir), ("data.manifest_dir", manifests), ("output_dir", out_dir),
          ("data.train", "null"), ("data.train", train)]
    # chrF, not BLEU: the short SFT warm-up gives partly right answers, which chrF credits (sentence BLEU of a
    # greedy 8-token answer is often exactly 0, and a zero-reward batch would make the comparison vacuous)
    ov += {"reward": "chrf", "grpo.num_generations": 4, "grpo.max_new_tokens": 8, "grpo.top_p": 1e-9,
           "trainer.max_steps": STEPS, "trainer.val_every": 0, "trainer.save_every": 0,
           "trainer.test_at_end": "false", "logging.tensorboard": "false", "logging.progress_bar": "false",
           "logging.plot": "false", "model.device": "cpu"}.items()
    return [f"{k}={v}" for k, v in ov]


def child_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Job:
    """One launched command, its output in a log file, its whole process tree stoppable (by pid)."""

    def __init__(self, name: str, cmd: list[str], log_path: str):
        self.name, self.cmd, self.log_path = name, cmd, log_path
        self._log = open(log_path, "w")
        # own session: a stop signal reaches this launch only, never pytest
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def tail(self, n: int = 4000) -> str:
        with open(self.log_path, errors="replace") as f:  # the children write it; this process never does
            text = f.read()
        return f"----- {self.name}: {' '.join(self.cmd[:12])} ... (rc={self.proc.poll()})\n{text[-n:]}"

    def log_text(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        """SIGTERM torchrun (it forwards to its workers, which run in sessions of their own), then SIGKILL every
        process of the tree still alive."""
        import psutil

        if self.proc.poll() is None:
            try:
                tree = psutil.Process(self.proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                tree = []
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            for p in tree:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
        self._log.close()


def run_jobs(jobs: list[Job], timeout_s: float) -> None:
    """Wait for all; on the first failure or the timeout stop every job and fail with all their logs."""
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            codes = [j.proc.poll() for j in jobs]
            failed = [j for j, c in zip(jobs, codes) if c not in (None, 0)]
            if failed:
                raise AssertionError(f"{failed[0].name} exited with {failed[0].proc.returncode}")
            if all(c == 0 for c in codes):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s:.0f} s")
            time.sleep(0.5)
    except AssertionError as e:
        for j in jobs:
            j.stop()
        raise AssertionError(f"{e}\n" + "\n".join(j.tail() for j in jobs)) from None
    finally:
        for j in jobs:
            j.stop()


def torchrun_node(node_rank: int, port: int, rdzv_id: str, ov: list[str]) -> list[str]:
    """The per-node command of scripts/slurm/grpo_multinode.sbatch (there: 4 GPUs per node, NCCL)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={DP}", f"--nproc_per_node={TP}",
            f"--node_rank={node_rank}",  # what the static backend would need; c10d assigns node ranks itself
            "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id={rdzv_id}",
            # this box's address for the rendezvous and the workers' store, not its (maybe unresolvable) FQDN
            "--local_addr=127.0.0.1",
            "--rdzv_conf=join_timeout=120", "--max_restarts=0",
            "-m", "nemo_grpo.cli", "train", "--config", RECIPE, *ov]


def read_rows(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1)), [r.get("step") for r in rows]
    return train


def close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * max(abs(b), 1e-12)


@pytest.fixture(scope="module")
def answering_model_dir(tiny_model_dir, toy_manifests, tmp_path_factory):
    """The tiny model after a short SFT warm-up (the real tiny_sft recipe, HF backend, this process)."""
    from nemo_grpo.train.cmd import run_config
    from nemo_grpo.train.config import load_config

    out = str(tmp_path_factory.mktemp("scaleout_sft"))
    ov = {"model.path": tiny_model_dir, "data.manifest_dir": toy_manifests, "output_dir": out,
          "trainer.max_steps": SFT_STEPS, "optim.schedule": "constant", "optim.warmup_ratio": 0,
          "trainer.val_every": 0, "trainer.save_every": 0, "trainer.test_at_end": "false", "model.device": "cpu",
          "logging.tensorboard": "false", "logging.progress_bar": "false", "logging.plot": "false"}
    run_config(load_config(os.path.join(ROOT, "conf", "tiny_sft.yaml"), [f"{k}={v}" for k, v in ov.items()]))
    return os.path.join(out, "best")


@pytest.fixture(scope="module")
def runs(answering_model_dir, toy_manifests, tmp_path_factory):
    work = tmp_path_factory.mktemp("two_node")
    tiny_model_dir = answering_model_dir
    multi_dir, single_dir = str(work / "tp2_dp2_two_launches"), str(work / "single_process_hf")
    multi_ov = overrides(tiny_model_dir, toy_manifests, multi_dir, PROMPTS_PER_RANK)
    multi_ov += ["model.backend=megatron", f"model.tensor_parallel_size={TP}", "model.sequence_parallel=false",
                 "model.backend_options={use_distributed_optimizer:true}"]
    single_ov = overrides(tiny_model_dir, toy_manifests, single_dir, PROMPTS_PER_RANK * DP)
    single_ov += ["model.backend=hf", "model.tensor_parallel_size=1"]
    port, rdzv_id = free_port(), f"scaleout-{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    jobs = [Job(f"node{r}", torchrun_node(r, port, rdzv_id, multi_ov), str(work / f"node{r}.log")) for r in range(DP)]
    jobs.append(Job("single", [sys.executable, "-m", "nemo_grpo.cli", "train", "--config", RECIPE, *single_ov],
                    str(work / "single.log")))
    run_jobs(jobs, TIMEOUT_S)
    return {"multi": read_rows(multi_dir), "single": read_rows(single_dir), "multi_dir": multi_dir,
            "logs": [j.log_text() for j in jobs[:DP]], "wall_s": time.monotonic() - t0}


@pytest.mark.integration
def test_two_launches_form_one_tp2_dp2_world(runs):
    """Both launches' workers joined ONE world of 4 (TP 2 x DP 2) and the run wrote a multi-rank checkpoint."""
    for log in runs["logs"]:
        assert "world 4 = TP 2 x DP 2" in log, log[-3000:]
    ckpt = os.path.join(runs["multi_dir"], "checkpoints", f"step_{STEPS:06d}", "policy")
    assert os.path.isfile(os.path.join(ckpt, "metadata.json")), os.listdir(os.path.dirname(ckpt))
    assert os.path.isfile(os.path.join(runs["multi_dir"], "best", "config.json"))  # HF export of the TP shards


@pytest.mark.integration
def test_two_node_losses_equal_single_process(runs):
    multi, single = runs["multi"], runs["single"]
    for rm, rs in zip(multi, single):
        step = rm["step"]
        for key, rel in COMPARED.items():
            assert close(rm[key], rs[key], rel), (step, key, rm[key], rs[key])
        # a DP mean of per-rank counts: x DP = the global count
        assert rm["completion/counted_tokens"] * DP == rs["completion/counted_tokens"], step
        rel = GRAD_NORM_TOL.get(step, LATER_GRAD_NORM_TOL)
        assert close(rm["train/grad_norm"], rs["train/grad_norm"], rel), (step, rm["train/grad_norm"],
                                                                          rs["train/grad_norm"])
    # not a vacuous match: answers earn reward, a real update happened and moved the policy
    assert all(r["reward/mean"] > 0 for r in single) and single[0]["train/grad_norm"] > 1e-3
    assert single[0]["loss/on/kl"] == 0.0 and single[-1]["loss/on/kl"] > 0.0
    assert len({round(r["train/loss"], 6) for r in single}) == STEPS
