"""Smoke tests: every benchmark runs end to end at tiny sizes and writes consistent results (no timing assertions),
plus the premises the comparisons rest on (same model both sides, forced lengths, the scaling fit)."""
from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def _bench(name: str):
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    return importlib.import_module(name)


def _load(out: Path, name: str) -> dict:
    rec = json.loads((out / f"{name}.json").read_text())
    assert (out / f"{name}.md").read_text().startswith("# ")
    for key in ("date", "commit", "machine", "versions"):
        assert rec[key], key
    assert rec["machine"]["torch_threads"] == 1
    assert rec["versions"]["trl"] and rec["versions"]["torch"]
    return rec


def test_grpo_vs_trl_smoke(tmp_path):
    bench = _bench("bench_grpo_vs_trl")
    rec = bench.main(["--smoke", "--out", str(tmp_path)])
    rec = _load(tmp_path, "bench_grpo_vs_trl")
    s = rec["step_s"]
    assert s["ours_text"]["n"] == s["trl"]["n"] == s["ours_audio"]["n"] == s["ours_text_hf_step"]["n"] == 1
    assert rec["ratio_per_round"] == [rec["ratio_ours_over_trl"]]  # one round: the headline is that round's
    assert math.isclose(rec["ratio_ours_over_trl"], s["ours_text"]["median"] / s["trl"]["median"], rel_tol=1e-9)
    # both sides really run the same network: our scoring == GraniteForCausalLM's log-softmax
    assert rec["logprob_max_abs_diff_vs_GraniteForCausalLM"] < 1e-5
    assert set(rec["phases_s_total"]["ours_text"]) == {"rollout", "reward", "reference", "train"}


def test_rollout_smoke(tmp_path):
    bench = _bench("bench_rollout")
    bench.main(["--smoke", "--out", str(tmp_path)])
    rec = _load(tmp_path, "bench_rollout")
    assert set(rec["settings"]) == {"toy_utterances", "long_audio_3s"}
    for st in rec["settings"].values():
        assert st["tokens_per_call"] == 1 * 2 * 4
        assert st["probe_logprob_max_abs_diff"] < 1e-5  # HF-model decode path == lean step (checked in the bench)
        tps = st["tokens_per_s"]
        assert math.isclose(st["ratio_ours_over_hf"], tps["ours"]["median"] / tps["hf"]["median"], rel_tol=1e-3)
        assert st["paired_speedups"]["ours"] == [round(st["ratio_ours_over_hf"], 4)]  # one repeat: one pair
    # real espeak-ng audio of different lengths: the long setting has more audio and more prompt tokens
    toy, long = rec["settings"]["toy_utterances"], rec["settings"]["long_audio_3s"]
    assert 1.0 < toy["audio_s_max"] < long["audio_s_max"] and toy["prompt_tokens"] < long["prompt_tokens"]


def test_step_share_smoke(tmp_path, toy_corpus_dir):
    bench = _bench("bench_step_share")
    bench.main(["--smoke", "--rewards", "bleu", "chrf", "--corpus-dir", toy_corpus_dir, "--out", str(tmp_path)])
    rec = _load(tmp_path, "bench_step_share")
    assert set(rec["results"]) == {"bleu", "chrf"}
    for r in rec["results"].values():
        assert 0 < r["data"] < 1 and 0 < r["reward"] < 1
        assert math.isclose(r["share"], r["data"] + r["reward"])  # one step: the medians are that step's shares
        assert math.isclose(r["share"], r["share_of_sums"])
        assert r["prompts_per_step"] and all(b >= 1 for b in r["prompts_per_step"])


def test_scaling_smoke(tmp_path):
    bench = _bench("bench_scaling")
    bench.main(["--smoke", "--out", str(tmp_path)])
    rec = _load(tmp_path, "bench_scaling")
    assert {(r["G"], r["T"]) for r in rec["rows"]} == {(2, 4), (3, 4), (2, 2)}
    assert all(math.isfinite(rec[k]) for k in ("slope_vs_G", "slope_vs_T"))


def test_slope_is_the_log_log_exponent():
    bench = _bench("bench_scaling")
    assert bench.slope([(4, 1.0), (8, 2.0), (16, 4.0)]) == pytest.approx(1.0)
    assert bench.slope([(50, 3.0), (200, 48.0)]) == pytest.approx(2.0)


def test_fixed_length_forces_t_tokens_and_restores_eos(tiny_model_dir):
    common = _bench("common")
    from nemo_grpo.policy.hf import HFGraniteSpeechPolicy

    policy = HFGraniteSpeechPolicy.from_pretrained(tiny_model_dir)
    ctx = policy.encode(common.speech_batch(policy, 1))
    greedy = policy.generate(ctx, 1, 6, temperature=0.0)
    # declare the greedy first token the stop token: an unforced greedy run now stops after 1 token
    policy.eos_token_id = int(greedy.token_ids[0, 0])
    stopped = policy.generate(ctx, 2, 6, temperature=0.0)
    assert stopped.mask.sum(1).tolist() == [1, 1]
    with common.fixed_length(policy):
        forced = policy.generate(ctx, 2, 6, temperature=0.0)
    assert forced.mask.all() and forced.token_ids.shape == (2, 6)
    assert policy.eos_token_id == int(greedy.token_ids[0, 0])  # restored


def test_grpo_step_reproduces_one_step_of_the_recipe(tiny_model_dir, toy_corpus_dir, tmp_path):
    """The step the benchmarks time IS the recipe's step: one ``train_grpo`` step and one ``common.grpo_step`` on the
    same first batch, seeds and config move every weight identically."""
    common = _bench("common")
    step_share = _bench("bench_step_share")
    from nemo_grpo.policy.hf import HFGraniteSpeechPolicy
    from nemo_grpo.rewards import build_reward
    from nemo_grpo.train import runtime
    from nemo_grpo.train.config import validate
    from nemo_grpo.train.evaluate import make_loader_factory
    from nemo_grpo.train.grpo import train_grpo

    manifests = step_share.prepare_toy(toy_corpus_dir, str(tmp_path / "manifests"), 8)
    import yaml

    data = yaml.safe_load((common.REPO / "conf" / "data" / "toy.yaml").read_text())
    data.update(manifest_dir=manifests)
    data["train"].update(batch_size=2)
    raw = {"model": {"path": tiny_model_dir, "device": "cpu", "precision": "fp32"}, "data": data, "resume": "never",
           "output_dir": str(tmp_path / "run"), "grpo": {"num_generations": 3, "max_new_tokens": 8, "beta": 0.02},
           "reward": "chrf",  # random completions get distinct non-zero chrF (BLEU would be all 0: no gradient)
           "optim": {"lr": 1e-2, "schedule": "constant"},
           "trainer": {"max_steps": 1, "val_every": 0, "save_every": 0, "test_at_end": False},
           "logging": {"tensorboard": False, "progress_bar": False, "plot": False}}
    before = HFGraniteSpeechPolicy.from_pretrained(tiny_model_dir).state_dict()
    train_grpo(validate(raw))
    recipe = HFGraniteSpeechPolicy.from_pretrained(str(tmp_path / "run" / "best")).state_dict()

    cfg = validate(raw)
    torch.manual_seed(cfg.seed)
    s = common.StepSession(cfg, runtime.build_policy(cfg.model, trainable=True, seed=cfg.seed))
    s.generator.manual_seed(runtime.derive_seed(cfg.seed, "sampling", 0))
    stream = runtime.DataStream(lambda e: make_loader_factory(cfg, s.policy.tokenizer, 0, 1)("train", e), cfg.seed)
    common.grpo_step(s, next(stream), build_reward(cfg.reward), common.build_reference(s))
    ours = s.policy.state_dict()
    moved = 0
    for k, v in before.items():
        torch.testing.assert_close(ours[k] - v, recipe[k] - v, atol=1e-6, rtol=1e-5, msg=k)
        moved += int(not torch.equal(recipe[k], v))
    assert moved > 10  # the step really updated the LLM and projector
