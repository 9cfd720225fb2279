"""Every recipe in conf/ composes (hydra), validates against the schema, carries the paper's settings, and runs one
real training step (+ a validation pass) with the tiny model substituted for the checkpoint and the toy corpus for
the data. The megatron (8B) recipes run in one subprocess at TP=1 (tensor parallelism has its own tests)."""
import glob
import json
import os
import subprocess
import sys

import pytest

from nemo_grpo.train.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = sorted(p for p in glob.glob(os.path.join(ROOT, "conf", "*.yaml")) if not p.endswith("base.yaml"))
PAPER = [r for r in RECIPES if not os.path.basename(r).startswith("tiny_")]


def _name(p):
    return os.path.basename(p)[:-5]


def test_recipe_set_is_complete():
    names = {_name(p) for p in PAPER}
    for algo in ("grpo", "mp_grpo", "sft"):
        for task in ("librisqa", "covost2"):
            for size in ("2b", "8b"):
                assert f"{algo}_{task}_{size}" in names
    for reward in ("rouge1", "rouge2", "rougeL", "meteor"):
        assert f"grpo_librisqa_2b_reward_{reward}" in names


@pytest.mark.parametrize("path", PAPER, ids=_name)
def test_paper_recipe_composes_with_paper_settings(path):
    cfg = load_config(path)
    name = _name(path)
    assert cfg.algorithm == name.split("_librisqa")[0].split("_covost2")[0]
    g = cfg.grpo
    assert (g.num_generations, g.beta, g.epsilon, g.temperature, g.max_new_tokens, g.loss_type) == (
        8, 0.02, 0.2, 1.0, 200, "dapo")
    assert (cfg.eval.top_p, cfg.eval.temperature) == (0.9, 0.9)
    assert cfg.data["max_prompt_tokens"] == 256
    assert cfg.model.backend == ("megatron" if "_8b" in name else "hf")  # incl. the *_8b_fp8 variants
    assert cfg.model.tensor_parallel_size == (4 if "_8b" in name else 1)
    assert cfg.optim.lr <= (5e-5 if cfg.algorithm == "sft" else 1e-5)
    assert cfg.eval.lang == ("de" if "covost2" in name else "en")
    reward = name.split("_reward_")[1] if "_reward_" in name else "bleu"
    assert cfg.reward == {reward: 1.0}
    assert cfg.output_dir == f"runs/{name}"


def dry_run_overrides(model_dir, manifests, out_dir, backend_tp1=False):
    ov = {"model.path": model_dir, "data.manifest_dir": manifests, "output_dir": out_dir, "trainer.max_steps": 1,
          "trainer.val_max_batches": 1, "trainer.test_at_end": False, "grpo.max_new_tokens": 6,
          "eval.max_new_tokens": 6, "data.train.num_workers": 0, "data.train.batch_size": 2,
          "data.train.num_buckets": 2, "logging.progress_bar": False, "logging.tensorboard": False,
          "logging.plot": False, "model.device": "cpu"}
    if backend_tp1:
        ov["model.tensor_parallel_size"] = 1
    return [f"{k}={v}" for k, v in ov.items()]


@pytest.mark.integration
# the *_8b_fp8 recipes need Transformer Engine (tests/megatron/test_megatron_gpu_paths.py checks their error here)
@pytest.mark.parametrize("path", [p for p in RECIPES if "_8b" not in _name(p)], ids=_name)
def test_recipe_dry_run_one_step(path, tiny_model_dir, toy_manifests, tmp_path):
    from nemo_grpo.train.cmd import run_config

    out = str(tmp_path / "run")
    cfg = load_config(path, dry_run_overrides(tiny_model_dir, toy_manifests, out))
    summary = run_config(cfg)
    assert summary["step"] == 1 and summary["best"]["value"] is not None  # one step + a validation ran
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    key = "train/loss" if cfg.algorithm == "sft" else "reward/mean"
    assert rows[0]["step"] == 1 and rows[0][key] is not None
    assert os.path.isfile(os.path.join(out, "best", "config.json"))


@pytest.mark.integration
def test_megatron_recipes_dry_run_one_step(tiny_model_dir, toy_manifests, tmp_path):
    recipes = [p for p in RECIPES if _name(p).endswith("8b")]
    script = (
        "import sys, json\n"
        "from nemo_grpo.train.config import load_config\n"
        "from nemo_grpo.train.cmd import run_config\n"
        "for path, overrides in json.loads(sys.argv[1]):\n"
        "    cfg = load_config(path, overrides)\n"
        "    assert cfg.model.backend == 'megatron'\n"
        "    s = run_config(cfg)\n"
        "    print('DONE', path, s['step'], s['best']['value'], flush=True)\n")
    spec = [(p, dry_run_overrides(tiny_model_dir, toy_manifests, str(tmp_path / _name(p)), backend_tp1=True))
            for p in recipes]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", script, json.dumps(spec)], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.count("DONE") == len(recipes) == 6


@pytest.mark.integration
def test_hydra_example_script_runs_a_recipe(tiny_model_dir, toy_manifests, tmp_path):
    """examples/train_sft.py (NeMo's hydra_runner) composes conf/ and trains; plain hydra needs ++ for new keys."""
    out = str(tmp_path / "run")
    ov = [o if o.split("=")[0] in ("model.path", "output_dir") else "++" + o
          for o in dry_run_overrides(tiny_model_dir, toy_manifests, out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "train_sft.py"), "--config-name", "tiny_sft",
                          *ov], env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert rows[0]["step"] == 1 and rows[0]["train/loss"] > 0
