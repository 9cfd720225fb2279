"""The GRPO step (``nemo_grpo.train.grpo.grpo_step``) on the real tiny policy with real rewards: DAPO dynamic
sampling (zero-variance groups dropped, the batch refilled from freshly drawn prompts) and the expensive-reward
overlap with the reference pass.

Which groups carry signal is controlled through the references: against "§" (a character the tiny tokenizer
cannot emit) every completion scores chrF 0, so the group has zero variance; against a long English sentence the
G random completions score different chrF values."""
import pytest
import torch

from nemo_grpo.policy.hf import HFGraniteSpeechPolicy
from nemo_grpo.policy.inputs import build_prompt_batch
from nemo_grpo.rewards import build_reward
from nemo_grpo.train import runtime
from nemo_grpo.train.config import validate
from nemo_grpo.train.grpo import grpo_step, loss_config
from nemo_grpo.train.session import TrainSession

DEAD = "§"
LIVE = "the small red box is on the left of the green table near the window"
G = 4


class StepHarness:
    """The session attributes ``grpo_step`` reads, with ``TrainSession``'s own timer/autocast/optimizer_step; the
    train stream is a list of prompt batches and counts how many were drawn."""

    timer = TrainSession.timer
    autocast = TrainSession.autocast
    optimizer_step = TrainSession.optimizer_step

    def __init__(self, cfg, policy, batches):
        self.cfg, self.policy = cfg, policy
        self.dp_size, self.opt_step, self.total_opt_steps = 1, 0, 10
        self.device = torch.device("cpu")
        self.bf16 = runtime.use_bf16(cfg.model.precision, self.device)  # "bf16" autocasts on CPU too
        self.generator = torch.Generator().manual_seed(0)
        self.timers = {}
        self._stream, self.drawn = iter(batches), 0
        o = cfg.optim
        policy.configure_optimizer(lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps,
                                   max_grad_norm=o.max_grad_norm)
        policy.train()

    def next_batch(self):
        self.drawn += 1
        return next(self._stream)


def _cfg(model_dir, **grpo):
    return validate({"model": {"path": model_dir, "device": "cpu", "precision": "fp32"},
                     "grpo": {"num_generations": G, "beta": 0.0, "max_new_tokens": 8, **grpo},
                     "optim": {"lr": 1e-3, "schedule": "constant"},
                     "trainer": {"max_steps": 10, "micro_batch_size": 5, "val_every": 0, "save_every": 0}})


def _batch(policy, refs, tag):
    g = torch.Generator().manual_seed(len(tag))
    waves = [0.1 * torch.randn(8000 + 800 * i, generator=g) for i in range(len(refs))]
    return build_prompt_batch(policy.tokenizer, waves, ["<|audio|> answer the question"] * len(refs), refs,
                              [f"{tag}{i}" for i in range(len(refs))], policy.config)


@pytest.fixture()
def policy(tiny_model_dir):
    torch.manual_seed(0)
    return HFGraniteSpeechPolicy.from_pretrained(tiny_model_dir)


def _params(policy):
    return [p.detach().clone() for p in policy.trainable_parameters()]


def test_refill_replaces_zero_variance_groups_with_fresh_prompts(policy, tiny_model_dir):
    cfg = _cfg(tiny_model_dir, dynamic_sampling=True, dynamic_sampling_max_rounds=4)
    first = _batch(policy, [LIVE, DEAD, DEAD], "a")
    refill = [_batch(policy, [DEAD, LIVE, LIVE], "bb"), _batch(policy, [LIVE, LIVE, LIVE], "ccc")]
    s = StepHarness(cfg, policy, refill)
    reward = build_reward([{"name": "chrf"}])
    metrics, samples = grpo_step(s, first, reward, None, loss_config(cfg))
    # round 1 keeps its one informative group, round 2 fills the other two: B = 3 groups, the third batch unused
    assert s.drawn == 1
    assert metrics["dynamic_sampling/rounds"] == 2 and metrics["dynamic_sampling/groups"] == 3
    assert metrics["dynamic_sampling/short_groups"] == 0
    assert metrics["groups/zero_variance_frac"] == pytest.approx(3 / 6)  # 3 of the 6 sampled groups were dead
    assert len(samples) == 3 * G and {r for _, r in samples} == {LIVE}
    # the trained tokens are exactly the kept groups' tokens: 3 groups x G completions
    assert metrics["loss/on/num_tokens"] == metrics["completion/counted_tokens"] > 0


def test_refill_loss_equals_closed_form_over_kept_groups(policy, tiny_model_dir):
    """mu = 1, beta = 0: every ratio is 1 (log pi_old recorded at sampling), so the DAPO loss is
    -sum_n A_n * len_n / sum_n len_n over the kept completions; recompute it from the logged advantages."""
    from nemo_grpo.train import grpo as recipe

    cfg = _cfg(tiny_model_dir, dynamic_sampling=True)
    s = StepHarness(cfg, policy, [_batch(policy, [LIVE, DEAD], "bb")])
    reward = build_reward([{"name": "chrf"}])
    groups, _ = recipe.sample_groups(s, _batch(policy, [DEAD, LIVE], "a"), reward)
    assert [len(gr.comps) for gr in groups] == [G, G] and s.drawn == 1
    assert [gr.comps.group.unique().tolist() for gr in groups] == [[1], [0]]  # prompt indices of each rollout
    lens = torch.cat([gr.mask.sum(1).float() for gr in groups])
    adv = torch.cat([gr.adv for gr in groups])
    expected = -(adv * lens).sum() / lens.sum()
    out = recipe.policy_update(s, groups, loss_config(cfg))
    assert out["train/loss"] == pytest.approx(expected.item(), abs=1e-6)


def test_no_informative_group_skips_the_update_after_max_rounds(policy, tiny_model_dir):
    """A first step trains (AdamW moments become non-zero); the second finds no informative group in 3 rollouts
    and must leave the weights exactly as they are (a zero-gradient AdamW step would still move them)."""
    cfg = _cfg(tiny_model_dir, dynamic_sampling=True, dynamic_sampling_max_rounds=3)
    dead = [_batch(policy, [DEAD, DEAD], "b" * k) for k in range(1, 4)]
    s = StepHarness(cfg, policy, dead)
    reward = build_reward([{"name": "chrf"}])
    first, _ = grpo_step(s, _batch(policy, [LIVE, LIVE], "a"), reward, None, loss_config(cfg))
    assert s.drawn == 0 and first["train/grad_norm"] > 0 and s.opt_step == 1
    before = _params(policy)
    metrics, _ = grpo_step(s, dead[0], reward, None, loss_config(cfg))
    assert s.drawn == 2 and metrics["dynamic_sampling/rounds"] == 3 and metrics["dynamic_sampling/short_groups"] == 2
    assert metrics["completion/counted_tokens"] == 0 and metrics["train/skipped_update"] == 1
    assert metrics["train/loss"] == 0 and metrics["train/grad_norm"] == 0 and s.opt_step == 1
    assert all(torch.equal(a, b) for a, b in zip(before, _params(policy)))


def test_without_dynamic_sampling_the_batch_is_used_as_drawn(policy, tiny_model_dir):
    cfg = _cfg(tiny_model_dir)
    s = StepHarness(cfg, policy, [])
    metrics, samples = grpo_step(s, _batch(policy, [LIVE, DEAD], "a"), build_reward([{"name": "chrf"}]), None,
                                 loss_config(cfg))
    assert s.drawn == 0 and not any(k.startswith("dynamic_sampling/") for k in metrics)
    assert len(samples) == 2 * G and metrics["groups/zero_variance_frac"] == 0.5
    assert set(s.timers) == {"rollout", "reward", "reference", "train"}


@pytest.mark.integration
def test_tiny_recipe_with_dynamic_sampling_runs_and_logs_refills(tiny_model_dir, toy_manifests, tmp_path):
    """The whole recipe (real toy corpus through the NeMo lhotse loader, BLEU reward) with refills on: the random
    tiny policy scores BLEU 0 on nearly every group, so refills happen and are logged per step."""
    import json
    import os

    from nemo_grpo.train.cmd import run_config
    from nemo_grpo.train.config import load_config
    from tests.train.conftest import tiny_overrides

    out = str(tmp_path / "run")
    ov = tiny_overrides(tiny_model_dir, toy_manifests, out, **{
        "grpo.dynamic_sampling": True, "grpo.dynamic_sampling_max_rounds": 2, "trainer.max_steps": 2,
        "trainer.val_every": 0, "trainer.test_at_end": False})
    summary = run_config(load_config(os.path.join("conf", "tiny_grpo.yaml"), ov))
    assert summary["step"] == 2
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2]
    assert any(r["dynamic_sampling/rounds"] == 2 for r in rows)  # a refill happened
    for r in rows:
        assert 1 <= r["dynamic_sampling/rounds"] <= 2
        # B groups per step: the first batch's size (<= data.train.batch_size; bucketing may cap it)
        assert 1 <= r["dynamic_sampling/groups"] + r["dynamic_sampling/short_groups"] <= 4


def test_expensive_reward_overlaps_reference_pass_with_identical_result(tiny_model_dir):
    """METEOR is an expensive reward: it runs on the reward worker thread while the reference pass runs. Same
    policy, batch and seed through the sequential path (the same reward declared cheap) give identical metrics and
    identical updated weights."""
    from nemo_grpo.rewards.combine import RewardFunction
    from nemo_grpo.train import runtime

    class Sequential(RewardFunction):
        expensive = False

    cfg = _cfg(tiny_model_dir, beta=0.02)
    results = []
    for overlap in (True, False):
        torch.manual_seed(0)
        policy = HFGraniteSpeechPolicy.from_pretrained(tiny_model_dir)
        ref = runtime.build_policy(cfg.model, trainable=False, seed=cfg.seed)
        rf = build_reward([{"name": "meteor"}])
        if not overlap:
            rf = Sequential(rf.components)
        assert rf.expensive is overlap
        s = StepHarness(cfg, policy, [])
        metrics, _ = grpo_step(s, _batch(policy, [LIVE, LIVE], "a"), rf, ref, loss_config(cfg))
        assert (rf._pool is not None) is overlap  # the worker thread was used only when overlapping
        rf.close()
        results.append((metrics, _params(policy)))
    (m1, p1), (m2, p2) = results
    keys = [k for k in m1 if not k.startswith("perf/")]
    assert keys and sorted(keys) == sorted(k for k in m2 if not k.startswith("perf/"))
    assert "loss/on/kl" in m1 and m1["reward/meteor/mean"] > 0
    assert all(m1[k] == m2[k] for k in keys), {k: (m1[k], m2[k]) for k in keys if m1[k] != m2[k]}
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))


@pytest.mark.integration
def test_training_run_survives_bad_utterances_and_reports_them(tiny_model_dir, toy_manifests, tmp_path, caplog):
    """Half of the CoVoST2 training cuts lose their audio after preparation: the GRPO run does not die, skips
    them, and its log and summary.json state what was skipped (counts; summary.json names the cuts)."""
    import json
    import logging
    import os
    import shutil

    from lhotse import CutSet

    from nemo_grpo.train.cmd import run_config
    from nemo_grpo.train.config import load_config
    from tests.train.conftest import tiny_overrides

    manifests = tmp_path / "manifests"
    shutil.copytree(toy_manifests, manifests)
    path = manifests / "covost2_cuts_train.jsonl.gz"
    cuts = list(CutSet.from_file(path))
    gone = []
    for k, cut in enumerate(cuts):
        if k % 2:
            src = tmp_path / f"gone_{k}.mp3"
            shutil.copy(cut.recording.sources[0].source, src)
            cut.recording.sources[0].source = str(src)
            os.remove(src)
            gone.append(cut.id)
    CutSet.from_cuts(cuts).to_file(path)
    out = str(tmp_path / "run")
    ov = tiny_overrides(tiny_model_dir, str(manifests), out, **{"trainer.max_steps": 3, "trainer.val_every": 0,
                                                              "trainer.test_at_end": False})
    with caplog.at_level(logging.INFO):
        summary = run_config(load_config(os.path.join("conf", "tiny_grpo.yaml"), ov))
    assert summary["step"] == 3
    skips = json.load(open(os.path.join(out, "summary.json")))["train_data_skips"]
    assert skips["counts"].get("missing_file", 0) > 0 and set(skips["counts"]) == {"missing_file"}
    named = json.dumps(skips["examples"])
    assert any(cid in named for cid in gone)
    # the totals in the run's own log (each cut is also logged as skipped where it is loaded: the loader worker)
    assert skips["summary"] in caplog.text and "missing_file" in caplog.text


def test_stand_in_groups_do_not_count_in_the_loss_normaliser(tiny_model_dir):
    """A rank whose dynamic sampling found nothing trains on an all-masked stand-in (``in_batch=False``) so that its
    collectives stay in step; with loss_type "grpo" (a per-sequence normaliser) its rows must not count, or every
    rank's gradient shrinks. Same groups with and without a stand-in part -> the same gradient norm."""
    from nemo_grpo.train import grpo as recipe

    cfg = _cfg(tiny_model_dir, loss_type="grpo")
    norms = []
    for with_stand_in in (False, True):
        torch.manual_seed(0)
        policy = HFGraniteSpeechPolicy.from_pretrained(tiny_model_dir)
        s = StepHarness(cfg, policy, [])
        reward = build_reward([{"name": "chrf"}])
        real, _ = recipe.sample_round(s, _batch(policy, [LIVE, LIVE], "a"), reward)
        parts = [real]
        if with_stand_in:
            stand_in, _ = recipe.sample_round(s, _batch(policy, [DEAD, DEAD], "bb"), reward)
            stand_in.mask, stand_in.in_batch = torch.zeros_like(stand_in.mask), False
            parts.append(stand_in)
        norms.append(recipe.policy_update(s, parts, loss_config(cfg))["train/grad_norm"])
    assert norms[0] > 0 and norms[1] == pytest.approx(norms[0], rel=1e-6)
