"""Launch robustness: the process-group timeout reaches torch and megatron, gloo gets an interface in the Slurm
script, and a run states its layout at start."""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys

import pytest

from nemo_grpo.train.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SBATCH = os.path.join(ROOT, "scripts", "slurm", "grpo_multinode.sbatch")


def test_dist_timeout_is_a_trainer_key_long_enough_for_an_8b_checkpoint():
    cfg = load_config(os.path.join(ROOT, "conf", "grpo_librisqa_8b.yaml"), ["model.path=/ckpt"])
    assert cfg.trainer.dist_timeout_minutes >= 120
    assert load_config(os.path.join(ROOT, "conf", "grpo_librisqa_8b.yaml"),
                       ["model.path=/ckpt", "trainer.dist_timeout_minutes=240"]).trainer.dist_timeout_minutes == 240
    with pytest.raises(ValueError, match="trainer.dist_timeout_minutes"):
        load_config(os.path.join(ROOT, "conf", "grpo_librisqa_8b.yaml"),
                    ["model.path=/ckpt", "trainer.dist_timeout_minutes=0"])


def test_runtime_process_group_gets_the_configured_timeout(monkeypatch):
    import torch.distributed as dist

    from nemo_grpo.train import runtime

    seen = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.append(kw))  # records what torch would get
    monkeypatch.setenv("WORLD_SIZE", "2")
    runtime.init_distributed_from_env(180)
    assert seen[0]["timeout"] == datetime.timedelta(minutes=180)


def test_build_policy_hands_the_timeout_to_the_backend(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from nemo_grpo.train import runtime

    seen = {}
    monkeypatch.setitem(sys.modules, "_timeout_backend",
                        SimpleNamespace(build=lambda cfg, **kw: seen.update(kw) or _Frozen()))
    monkeypatch.setitem(runtime.BACKENDS, "spy", "_timeout_backend:build")
    cfg = SimpleNamespace(backend="spy", path=str(tmp_path), device="cpu")
    runtime.build_policy(cfg, trainable=False, dist_timeout_minutes=150)
    assert seen["dist_timeout_minutes"] == 150


class _Frozen:
    def trainable_parameters(self):
        return []

    def eval(self):
        return self


_MEGATRON_SPY = r"""
import json, sys
import torch.distributed as dist
from megatron.core import parallel_state as ps
seen = {}
real_pg, real_mp = dist.init_process_group, ps.initialize_model_parallel
def pg(*a, **k):
    seen["world_timeout_min"] = k["timeout"].total_seconds() / 60
    return real_pg(*a, **k)
def mp(*a, **k):
    seen["megatron_timeout_min"] = k.get("distributed_timeout_minutes")
    return real_mp(*a, **k)
dist.init_process_group, ps.initialize_model_parallel = pg, mp
from nemo_grpo.policy.megatron import parallel
parallel.init_model_parallel(1, timeout_minutes=7)
print(json.dumps(seen))
parallel.destroy()
"""


def test_megatron_groups_get_the_configured_timeout():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    res = subprocess.run([sys.executable, "-c", _MEGATRON_SPY], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"world_timeout_min": 7, "megatron_timeout_min": 7}


def _sbatch_stderr(tmp_path, env: dict[str, str]) -> str:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "scontrol").write_text("#!/bin/sh\necho gpu-node-07\necho gpu-node-08\n")
    (bindir / "ip").write_text("#!/bin/sh\necho 'default via 10.1.0.1 dev enp1s0f0 proto static metric 100'\n")
    for f in ("scontrol", "ip"):
        (bindir / f).chmod(0o755)
    full = dict(os.environ, DRY_RUN="1", SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu-node-[07-08]",
                PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", **env)
    if "GLOO_SOCKET_IFNAME" not in env:
        full.pop("GLOO_SOCKET_IFNAME", None)
    res = subprocess.run(["bash", SBATCH, "conf/grpo_librisqa_8b.yaml"], env=full, cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return res.stderr


def test_sbatch_sets_gloo_socket_ifname_beside_nccls(tmp_path):
    assert "GLOO_SOCKET_IFNAME=enp1s0f0" in _sbatch_stderr(tmp_path, {})  # this node's default-route NIC
    assert "GLOO_SOCKET_IFNAME=ib0" in _sbatch_stderr(tmp_path, {"GLOO_SOCKET_IFNAME": "ib0"})  # user's choice kept


def test_layout_line_names_world_tp_dp_sp_fp8():
    from types import SimpleNamespace

    from nemo_grpo.train.runtime import layout_summary

    cfg = SimpleNamespace(backend="megatron", sequence_parallel=True, precision="auto",
                          backend_options={"fp8": "hybrid", "fp8_recipe": "tensorwise"})
    assert layout_summary(cfg, 8, 2) == ("layout: backend megatron, world 8 = TP 4 x DP 2, sequence parallel on, "
                                         "FP8 hybrid (tensorwise recipe), precision auto")
    cfg = SimpleNamespace(backend="hf", sequence_parallel=False, precision="fp32", backend_options={})
    assert "world 2 = TP 1 x DP 2, sequence parallel off, FP8 off" in layout_summary(cfg, 2, 2)
