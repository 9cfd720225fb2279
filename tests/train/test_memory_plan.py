"""The per-GPU memory plan (nemo_grpo.train.memory_plan): against measured CPU memory, on the shipped recipes, in
``train --dry-run``."""
import functools
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from nemo_grpo.train.config import load_config, validate
from nemo_grpo.train.memory_plan import H100_BYTES, load_shapes, plan_memory

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(ROOT, "tests", "train", "memory_worker.py")

# Two model sizes (Granite layout, tiny tokenizer, an 8192-row vocab so the logits buffers weigh as at the real
# 49160 relative to the layers) x micro-batch 4; size "a" also with activation checkpointing.
SIZES = {
    "a": dict(hidden=256, text_ffn=1024, text_layers=2, text_heads=8, text_kv_heads=2, encoder_layers=1),
    "b": dict(hidden=384, text_ffn=1536, text_layers=4, text_heads=6, text_kv_heads=2, encoder_layers=1),
}
VOCAB = 8192
CASES = [("a", 96, False), ("b", 128, False), ("a", 96, True)]  # (size, new tokens, checkpointing)
MICRO_BATCH = 4


def _model_dir(out: str, **sizes) -> str:
    from transformers import GraniteSpeechForConditionalGeneration

    from nemo_grpo.policy.tiny import tiny_config, train_tokenizer

    tokenizer = train_tokenizer()
    config, _ = tiny_config(tokenizer, **sizes)
    config.text_config.vocab_size = VOCAB  # rows beyond the tokenizer are never sampled here; they size the logits
    torch.manual_seed(0)
    GraniteSpeechForConditionalGeneration(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """[(case, worker result, plan)] for CASES, measured in ONE fresh subprocess (see memory_worker.py)."""
    dirs = {k: _model_dir(str(tmp_path_factory.mktemp(f"mem_{k}")), **v) for k, v in SIZES.items()}
    specs = [dict(model_dir=dirs[k], micro_batch=MICRO_BATCH, new_tokens=t, checkpointing=c) for k, t, c in CASES]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    res = subprocess.run([sys.executable, WORKER, json.dumps(specs)], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    results = [json.loads(line) for line in res.stdout.strip().splitlines()[-len(CASES):]]
    out = []
    for (k, t, c), spec, r in zip(CASES, specs, results):
        # the same run as the planner sees it: prompt = the batch's padded prompt length, fp32 on CPU
        cfg = validate({"model": {"path": spec["model_dir"], "precision": "fp32", "device": "cpu",
                                  "activation_checkpointing": c},
                        "data": {"max_prompt_tokens": r["prompt_tokens"], "train": {"batch_size": 2}},
                        "grpo": {"max_new_tokens": t}, "trainer": {"micro_batch_size": MICRO_BATCH}})
        out.append(((k, t, c), r, load_shapes(spec["model_dir"]), plan_memory(load_shapes(spec["model_dir"]), cfg,
                                                                             device="cpu")))
    return out


def test_plan_within_25_percent_of_measured_cpu_memory(measured):
    """Compared: what one training micro-batch adds on top of the loaded policy while an earlier micro-batch's
    gradients are alive (gradient accumulation): gradients + activations + logits buffers, fp32 on CPU, measured as
    the process's peak anonymous RSS over the baseline. The static parts are checked exactly by parameter count."""
    report = []
    for (k, t, c), r, shapes, plan in measured:
        assert r["params"] == shapes.total_params
        assert r["trainable_params"] == shapes.llm_params + shapes.projector_params  # frozen encoder
        planned = sum(plan.item(n).nbytes for n in ("gradients", "activations", "logits"))
        err = planned / r["measured_bytes"] - 1
        report.append(f"size {k} T={t} ckpt={c}: planned {planned / 2**20:.0f} MiB, measured "
                      f"{r['measured_bytes'] / 2**20:.0f} MiB ({err:+.0%})")
        assert abs(err) < 0.25, report
    print("\n".join(report))
    (_, a, _, _), _, (_, ac, _, _) = measured
    assert ac["measured_bytes"] < 0.9 * a["measured_bytes"]  # checkpointing does save memory


@functools.lru_cache(maxsize=None)
def _shapes(path):
    return load_shapes(path)


RECIPES = sorted(p for p in glob.glob(os.path.join(ROOT, "conf", "*.yaml")) if p.endswith(("_2b.yaml", "_8b.yaml"))
                 or "_2b_" in os.path.basename(p))


@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_recipe_plan_fits_an_80gb_h100(recipe):
    """Every 2B / 8B recipe at its intended world size (2B: one GPU per replica; 8B: one TP=4 group) fits."""
    cfg = load_config(recipe)
    world = cfg.model.tensor_parallel_size if cfg.model.backend == "megatron" else 1
    plan = plan_memory(_shapes(cfg.model.path), cfg, world)
    assert plan.budget_bytes == H100_BYTES == 80e9
    assert plan.fits, f"{os.path.basename(recipe)}: {plan.total_bytes / 1e9:.1f} GB"


def test_2b_grpo_without_the_knobs_does_not_fit():
    """Negative control: the 2B GRPO recipe at its old micro-batch 16 without checkpointing plans ~106 GB."""
    recipe = os.path.join(ROOT, "conf", "grpo_librisqa_2b.yaml")
    before = load_config(recipe, ["trainer.micro_batch_size=16", "model.activation_checkpointing=false"])
    plan = plan_memory(_shapes(before.model.path), before, 1)
    assert not plan.fits and 95e9 < plan.total_bytes < 115e9
    assert plan.item("activations").nbytes > 30 * 2**30  # the activations are what does not fit


def test_8b_plan_shards_over_tp_and_dp():
    recipe = os.path.join(ROOT, "conf", "grpo_librisqa_8b.yaml")
    cfg = load_config(recipe)
    shapes = _shapes(cfg.model.path)
    p4, p8 = plan_memory(shapes, cfg, 4), plan_memory(shapes, cfg, 8)
    assert (p4.tensor_parallel, p4.data_parallel, p8.data_parallel) == (4, 1, 2)
    # the distributed optimizer halves Adam's state over DP=2; weights stay (replicated across DP)
    assert p8.item("optimizer (Adam)").nbytes == pytest.approx(p4.item("optimizer (Adam)").nbytes / 2)
    assert p8.item("weights").nbytes == p4.item("weights").nbytes
    # the LLM is split over TP: one rank holds ~1/4 of it plus the replicated encoder/projector
    width = 2 if cfg.model.backend_options.get("params_dtype") == "bf16" else 4  # bytes per weight
    llm_rank = p4.item("weights").nbytes - width * (shapes.encoder_params + shapes.projector_params)
    assert llm_rank == pytest.approx(width * shapes.llm_params / 4)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        plan_memory(shapes, cfg, 6)


def test_unknown_model_path_names_the_key(tmp_path):
    with pytest.raises(ValueError, match="model.path"):
        load_shapes(str(tmp_path / "not-a-preset"))


def test_dry_run_prints_the_plan(capsys):
    from nemo_grpo.cli import main

    recipe = os.path.join(ROOT, "conf", "grpo_librisqa_8b.yaml")
    assert main(["train", "--config", recipe, "--dry-run", "--world-size", "8"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["model"]["tensor_parallel_size"] == 4  # stdout: the config alone (scripts parse it)
    assert "memory plan per GPU (shapes: preset granite-speech-3.3-8b" in err
    assert "world 8 = TP 4 x DP 2" in err and "rollout KV cache" in err and "of 80 GB (H100): fits" in err
    assert main(["train", "--config", recipe, "--dry-run", "--world-size", "6"]) == 2
    assert "tensor_parallel_size" in capsys.readouterr().err
    # a checkpoint that is not on this machine: the config still validates, the plan is skipped with a note
    assert main(["train", "--config", recipe, "--dry-run", "model.path=/ckpt/elsewhere"]) == 0
    assert "memory plan skipped" in capsys.readouterr().err
