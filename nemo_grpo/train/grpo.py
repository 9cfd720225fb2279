"""The GRPO / MP-GRPO recipe, in the order of the paper's Section 3.

Per step: a batch of B prompts -> rollout (G completions each; MP-GRPO: G-1 sampled + the reference as an
off-policy member) -> rewards (BLEU by default, Section 3.3) -> group advantages (Eq. 1) -> mu policy updates with
the clipped token-level DAPO loss (Eqs. 2-3, beta * k3-KL to a frozen reference when beta > 0) over micro-batches
-> maybe validate / checkpoint.

log pi_old: the log-probs recorded at sampling time (``Completions.logprobs``, temperature applied). With mu = 1
and no dropout they equal the policy's own scoring pass before the update, so the first ratio is exactly 1. With
mu > 1 they stay fixed across the mu updates (the standard GRPO definition: pi_old is the sampling policy); the
ratio then measures the drift of the updated policy from it. The Granite dropouts are 0, and a frozen encoder stays
in eval mode (BatchNorm), so sampling and scoring see the same network.

Shape legend: B prompts, G samples per prompt, N = B*G completions, T completion tokens.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from nemo_grpo.algorithms import (LossConfig, grpo_loss, group_advantages, loss_normalizer, mask_truncated,
                                  microbatch_slices, nonzero_variance_groups, reduce_metrics)
from nemo_grpo.rollout import rollout
from nemo_grpo.train import runtime
from nemo_grpo.train.config import TrainConfig
from nemo_grpo.train.session import TrainSession

log = logging.getLogger(__name__)


def loss_config(cfg: TrainConfig) -> LossConfig:
    g = cfg.grpo
    return LossConfig(epsilon=g.epsilon, epsilon_high=g.epsilon if g.epsilon_high is None else g.epsilon_high,
                      beta=g.beta, loss_type=g.loss_type, off_policy_shaping_gamma=g.policy_shaping_gamma)


def train_grpo(cfg: TrainConfig) -> dict[str, Any]:
    """Run GRPO (``algorithm: grpo``) or Mixed-Policy GRPO (``mp_grpo``) to ``trainer.max_steps``; returns the
    run summary (best validation, test metrics, paths)."""
    from nemo_grpo.rewards import build_reward

    g = cfg.grpo
    s = TrainSession(cfg, opt_steps_per_step=g.num_iterations)
    reward_fn = build_reward(cfg.reward)
    loss_cfg = loss_config(cfg)
    # The KL reference is the starting policy, frozen; built only when the KL term is on (beta > 0).
    ref = runtime.build_policy(cfg.model, trainable=False, seed=cfg.seed) if g.beta > 0 else None
    s.policy.train()
    while s.step < cfg.trainer.max_steps:
        batch = s.next_batch()
        with s.timer("rollout"), s.autocast():
            ro = rollout(s.policy, batch, num_samples=g.num_generations, mixed_policy=cfg.algorithm == "mp_grpo",
                         max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                         generator=s.generator)
        comps = ro.completions
        with s.timer("reward"):
            refs = [batch.references[i] for i in comps.group.tolist()]
            rewards = reward_fn(comps.texts, refs)
        adv, mask, stats = advantages_and_mask(rewards.total, comps, cfg)
        with s.timer("reference"):
            ref_logp = reference_logprobs(ref, batch, comps, cfg, s) if ref is not None else None
        with s.timer("train"):
            train_metrics = policy_update(s, ro.ctx, comps, adv, mask, ref_logp, loss_cfg)
        metrics = {**ro.stats, **stats, **reward_stats(rewards, comps), **train_metrics}
        samples = [(comps.texts[i], refs[i]) for i in range(len(comps)) if not comps.off_policy[i]]
        s.end_step(s.dp_mean(metrics), samples)
    reward_fn.close()
    return s.finish()


def advantages_and_mask(total: torch.Tensor, comps: Any, cfg: TrainConfig
                        ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Rewards [N] -> advantages [N] (Eq. 1 per group) and the loss mask [N, T] (overlong / dynamic sampling).

    Dynamic sampling (DAPO) drops zero-variance groups from the loss and from the token normaliser; the batch is
    not refilled (documented deviation: a refill would make step cost data-dependent)."""
    g = cfg.grpo
    rewards = total.view(-1, g.num_generations)  # [B, G]
    exclude = None
    if cfg.algorithm == "mp_grpo" and not g.off_policy_in_group_stats:
        exclude = comps.off_policy.view_as(rewards)
    adv = group_advantages(rewards, scale_by_std=g.scale_rewards, exclude_mask=exclude).flatten()  # [N]
    keep = nonzero_variance_groups(rewards)  # [B]
    mask = comps.mask
    if g.mask_truncated_completions:
        mask = mask_truncated(mask, comps.truncated)
    if g.dynamic_sampling:
        mask = mask & keep[comps.group][:, None]
    gen = ~comps.off_policy
    lengths = comps.mask.sum(dim=1).float()[gen]
    stats = {
        "groups/zero_variance_frac": 1.0 - keep.float().mean().item(),
        "advantage/mean": adv.mean().item(), "advantage/std": adv.std().item() if adv.numel() > 1 else 0.0,
        "advantage/abs_mean": adv.abs().mean().item(),
        "completion/len_mean": lengths.mean().item(), "completion/len_max": lengths.max().item(),
        "completion/truncated_frac": comps.truncated[gen].float().mean().item(),
        "completion/counted_tokens": float(mask.sum()),
    }
    return adv, mask, stats


def reward_stats(rewards: Any, comps: Any) -> dict[str, float]:
    """Mean/std of the total and of every reward component over the SAMPLED members (the reference's reward, 1 for
    BLEU, would flatter the curve)."""
    gen = ~comps.off_policy
    out = {"reward/mean": rewards.total[gen].mean().item(), "reward/std": rewards.total[gen].std().item()}
    for name, vals in rewards.components.items():
        out[f"reward/{name}/mean"] = vals[gen].mean().item()
        out[f"reward/{name}/std"] = vals[gen].std().item()
    if comps.off_policy.any():
        out["reward/off_policy_mean"] = rewards.total[comps.off_policy].mean().item()
    return out


@torch.no_grad()
def reference_logprobs(ref: Any, batch: Any, comps: Any, cfg: TrainConfig, s: TrainSession) -> torch.Tensor:
    """log pi_ref [N, T] of every completion under the frozen reference (same temperature as sampling)."""
    with s.autocast():
        ctx = ref.encode(batch)
        parts = [ref.score(ctx, comps.token_ids[sl], comps.group[sl], temperature=cfg.grpo.temperature)[0].float()
                 for sl in microbatch_slices(len(comps), cfg.trainer.micro_batch_size)]
    return torch.cat(parts)


def policy_update(s: TrainSession, ctx: Any, comps: Any, adv: torch.Tensor, mask: torch.Tensor,
                  ref_logp: torch.Tensor | None, loss_cfg: LossConfig) -> dict[str, float]:
    """mu optimizer steps on one rollout batch; each accumulates ``grpo_loss`` over micro-batches.

    The loss normaliser (token count for "dapo") is global: summed over the whole batch and all DP ranks, so
    micro-batching and data parallelism give the gradient of one pass over the global batch. ``Policy.optimizer_step``
    AVERAGES gradients over DP ranks (the DDP convention), hence the global count divided by the DP size."""
    cfg = s.cfg
    normalizer = runtime.dp_sum(loss_normalizer(mask, loss_cfg.loss_type), s.dp_size) / s.dp_size
    slices = microbatch_slices(len(comps), cfg.trainer.micro_batch_size)
    parts, opt = [], {}
    for _ in range(cfg.grpo.num_iterations):
        for sl in slices:
            with s.autocast():
                logp, entropy = s.policy.score(ctx, comps.token_ids[sl], comps.group[sl],
                                               temperature=cfg.grpo.temperature, return_entropy=True)
            out = grpo_loss(logp.float(), comps.logprobs[sl], adv[sl], mask[sl], normalizer=normalizer,
                            cfg=loss_cfg, ref_logp=None if ref_logp is None else ref_logp[sl],
                            off_policy=comps.off_policy[sl], entropy=entropy)
            out.loss.backward()
            parts.append(out.metrics)
        opt = s.optimizer_step()
    m = reduce_metrics(parts)
    metrics = {f"loss/{k}": float(v) for k, v in m.items() if not k.endswith("num_sequences")}
    # the loss of one pass (parts hold mu passes over the same batch)
    metrics["train/loss"] = float(m["loss"]) / cfg.grpo.num_iterations
    metrics.pop("loss/loss", None)
    if not comps.off_policy.any():
        metrics = {k: v for k, v in metrics.items() if not k.startswith("loss/off/")}
    return {**metrics, **opt}
