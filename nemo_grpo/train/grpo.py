"""The GRPO / MP-GRPO recipe, in the order of the paper's Section 3.

Per step (``grpo_step``): a batch of B prompts -> rollout (G completions each; MP-GRPO: G-1 sampled + the reference
as an off-policy member) -> rewards (BLEU by default, Section 3.3) -> group advantages (Eq. 1) [-> DAPO dynamic
sampling: drop zero-variance groups, refill from fresh prompts] -> log pi_ref (beta > 0) [-> log pi_old recomputed
(bf16)] -> mu policy updates with the clipped token-level DAPO loss (Eqs. 2-3, beta * k3-KL to a frozen reference)
over micro-batches -> maybe validate / checkpoint (the session's ``end_step``). Expensive rewards (METEOR, BERTScore)
run on the reward function's worker thread while the reference pass runs, so they stay off the critical path; the
values are the same.

log pi_old (``grpo.old_logprobs``, resolved by ``config.resolve_old_logprobs``): pi_old is the policy that sampled,
and it stays fixed across the mu updates; the ratio measures the drift of the updated policy from it. Its log-probs
come from one of two places:
  * "sampled" (fp32 default): the log-probs recorded by the KV-cache sampler (``Completions.logprobs``, temperature
    applied). In fp32 they equal the training forward's before the update (to ~1e-6), so no extra pass is needed.
  * "recompute" (bf16 default, as verl and NeMo-RL): one no-grad scoring pass of the policy over the rollout before
    the updates (``old_logprobs``), with the training forward's micro-batches, temperature, autocast and mode. Under
    bf16 the sampler's numbers differ from the training pass's (different kernels and shapes: a KV cache vs one full
    forward), so with the sampled ones the first ratio at mu = 1 would not be 1 and the clipping would act on that
    noise; with the recomputed ones it is exactly 1.
``rollout/logprob_diff_{mean,max}`` log |sampler - trainer| log-prob before any update over the counted on-policy
tokens every step (from the recompute pass, or from the first update's forward when sampled). ``grpo.tis_cap``
additionally weights each on-policy token's policy-gradient term by the truncated importance weight
min(pi_old / pi_sampler, cap) for that mismatch (TRL / verl TIS; needs recompute). The policy turns dropout off at
load, and a frozen encoder stays in eval mode (BatchNorm), so sampling and scoring see the same network up to
numerics.

Shape legend: B prompts, G samples per prompt, N = B*G completions, T completion tokens.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from nemo_grpo.algorithms import (LossConfig, grpo_loss, group_advantages, loss_normalizer, mask_truncated,
                                  microbatch_slices, nonzero_variance_groups, reduce_metrics)
from nemo_grpo.policy.base import Completions, PromptBatch, PromptContext
from nemo_grpo.rollout import rollout
from nemo_grpo.train import runtime
from nemo_grpo.train.config import TrainConfig, resolve_old_logprobs
from nemo_grpo.train.session import TrainSession

log = logging.getLogger(__name__)


def loss_config(cfg: TrainConfig) -> LossConfig:
    g = cfg.grpo
    return LossConfig(epsilon=g.epsilon, epsilon_high=g.epsilon if g.epsilon_high is None else g.epsilon_high,
                      beta=g.beta, loss_type=g.loss_type, off_policy_shaping_gamma=g.policy_shaping_gamma,
                      tis_cap=g.tis_cap)


def train_grpo(cfg: TrainConfig) -> dict[str, Any]:
    """Run GRPO (``algorithm: grpo``) or Mixed-Policy GRPO (``mp_grpo``) to ``trainer.max_steps``; returns the
    run summary (best validation, test metrics, paths)."""
    from nemo_grpo.rewards import build_reward

    # a bad grpo.old_logprobs / grpo.tis_cap combination fails here, before any model is built
    resolve_old_logprobs(cfg.grpo, runtime.bf16_numerics(cfg.model, runtime.pick_device(cfg.model.device)))
    s = TrainSession(cfg, opt_steps_per_step=cfg.grpo.num_iterations)
    reward_fn = build_reward(cfg.reward)
    loss_cfg = loss_config(cfg)
    # The KL reference is the starting policy, frozen; built only when the KL term is on (beta > 0).
    ref = runtime.build_policy(cfg.model, trainable=False, seed=cfg.seed) if cfg.grpo.beta > 0 else None
    s.policy.train()
    while s.step < cfg.trainer.max_steps:
        metrics, samples = grpo_step(s, s.next_batch(), reward_fn, ref, loss_cfg)
        s.end_step(s.dp_mean(metrics), samples)
    reward_fn.close()
    return s.finish()


@dataclass
class Groups:
    """Whole groups of ONE rollout that enter the loss. They share that rollout's prompt context (audio encoded
    once); ``comps.group`` indexes the prompts of ``ctx``.

    comps: N completions (all G members of each group); adv: [N] advantages (Eq. 1, computed over the full group);
    mask: [N, T] bool, True = the token enters the loss; refs: N reference texts (for sample logs);
    ref_logp: [N, T] log pi_ref (beta > 0), filled by ``sample_groups`` or ``grpo_step``;
    in_batch: False for dynamic sampling's all-masked stand-in (no row of it counts in the loss normaliser);
    old_logp: [N, T] log pi_old recomputed by the policy before the updates (``grpo.old_logprobs`` recompute), filled
    by ``grpo_step``; None = the sampler's ``comps.logprobs`` serve as log pi_old.
    """

    ctx: PromptContext
    comps: Completions
    adv: torch.Tensor
    mask: torch.Tensor
    refs: list[str]
    ref_logp: torch.Tensor | None = None
    in_batch: bool = True
    old_logp: torch.Tensor | None = None

    def select(self, groups: torch.Tensor) -> "Groups":
        """Only the completions of the given prompt indices [K] (rows keep their order and their ``group``)."""
        rows = torch.isin(self.comps.group, groups.to(self.comps.group.device)).nonzero().flatten()
        return Groups(self.ctx, self.comps.select(rows), self.adv[rows], self.mask[rows],
                      [self.refs[i] for i in rows.tolist()], None if self.ref_logp is None else self.ref_logp[rows],
                      self.in_batch, None if self.old_logp is None else self.old_logp[rows])


def grpo_step(s: Any, batch: PromptBatch, reward_fn: Any, ref: Any, loss_cfg: LossConfig
              ) -> tuple[dict[str, float], list[tuple[str, str]]]:
    """One GRPO step on ``batch``: sample scored groups, score them under the reference (and, with
    ``grpo.old_logprobs`` resolved to recompute, under the policy itself: log pi_old), mu policy updates.

    ``s`` is the recipe's session (``TrainSession``): cfg, policy, generator, dp_size, bf16, timer(name), autocast(),
    next_batch() (dynamic sampling only), optimizer_step(). Returns (rank-local metrics, (hyp, ref) samples)."""
    groups, metrics = sample_groups(s, batch, reward_fn, ref)
    with s.timer("reference"):
        for gr in groups:
            if ref is not None and gr.ref_logp is None:
                gr.ref_logp = reference_logprobs(ref, gr.ctx, gr.comps, s)
    if resolve_old_logprobs(s.cfg.grpo, runtime.bf16_numerics(s.cfg.model, s.device)) == "recompute":
        with s.timer("old_logprobs"):
            for gr in groups:
                gr.old_logp = old_logprobs(s, gr)
    with s.timer("train"):
        metrics.update(policy_update(s, groups, loss_cfg))
    samples = [(gr.comps.texts[i], gr.refs[i]) for gr in groups for i in range(len(gr.comps))
               if not gr.comps.off_policy[i]]
    return metrics, samples


def sample_groups(s: Any, batch: PromptBatch, reward_fn: Any, ref: Any = None
                  ) -> tuple[list[Groups], dict[str, float]]:
    """Rollout -> rewards -> advantages for ``batch``; returns the groups to train on and the step's metrics.

    Dynamic sampling (DAPO, ``grpo.dynamic_sampling``): groups whose rewards are all equal carry no gradient (their
    advantages are 0), so they are dropped and the batch is refilled with the informative groups of freshly drawn
    prompts (``s.next_batch()``) until it again holds B groups, with at most ``grpo.dynamic_sampling_max_rounds``
    rollouts per step. Still short after that, the step trains on the groups it found; if it found none, it returns
    the last round with every token masked (``policy_update`` then skips the update). The reference log-probs are
    then computed by ``grpo_step`` for the kept groups only."""
    g = s.cfg.grpo
    if not g.dynamic_sampling:
        everything, info = sample_round(s, batch, reward_fn, ref)
        return [everything], {**rollout_stats([info]), **group_stats([everything])}
    target, kept, rounds, chosen = len(batch), 0, [], []
    while True:
        everything, info = sample_round(s, batch if not rounds else s.next_batch(), reward_fn, None)
        rounds.append(info)
        informative = info[2].nonzero().flatten()[: target - kept]
        if len(informative):
            chosen.append(everything.select(informative))
            kept += len(informative)
        if kept >= target or len(rounds) >= g.dynamic_sampling_max_rounds:
            break
    if kept < target:
        log.warning("dynamic sampling: %d of %d groups carry signal after %d rollouts "
                    "(grpo.dynamic_sampling_max_rounds); training on those", kept, target, len(rounds))
    if not chosen:  # this rank trains on nothing; its masked stand-in keeps its collectives in step with the others
        everything.in_batch = False
        chosen = [everything]
    return chosen, {**rollout_stats(rounds), **group_stats(chosen), "dynamic_sampling/rounds": float(len(rounds)),
                    "dynamic_sampling/groups": float(kept), "dynamic_sampling/short_groups": float(target - kept)}


def sample_round(s: Any, batch: PromptBatch, reward_fn: Any, ref: Any = None) -> tuple[Groups, tuple]:
    """One rollout of ``batch`` (B prompts) with its rewards and advantages: (all B groups, (rollout, rewards,
    keep [B])). An expensive reward (``reward_fn.expensive``) is submitted to the reward worker and the reference
    log-probs (``ref`` given, beta > 0) are computed meanwhile, so it stays off the critical path."""
    cfg, g = s.cfg, s.cfg.grpo
    with s.timer("rollout"), s.autocast():
        ro = rollout(s.policy, batch, num_samples=g.num_generations, mixed_policy=cfg.algorithm == "mp_grpo",
                     max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                     generator=s.generator)
    comps = ro.completions
    refs = [batch.references[i] for i in comps.group.tolist()]
    ref_logp = None
    if reward_fn.expensive and ref is not None:
        pending = reward_fn.submit(comps.texts, refs)
        with s.timer("reference"):
            ref_logp = reference_logprobs(ref, ro.ctx, comps, s)
        with s.timer("reward"):
            rewards = pending.result()
    else:
        with s.timer("reward"):
            rewards = reward_fn(comps.texts, refs)
    with s.timer("reward"):
        adv, mask, keep = advantages_and_mask(rewards.total, comps, cfg)
    return Groups(ro.ctx, comps, adv, mask, refs, ref_logp), (ro, rewards, keep)


def advantages_and_mask(total: torch.Tensor, comps: Completions, cfg: TrainConfig
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rewards [N] -> advantages [N] (Eq. 1 per group), the loss mask [N, T] and the informative groups keep [B].

    The mask drops truncated completions (overlong masking) and, under dynamic sampling, zero-variance groups (the
    latter only matters when ``sample_groups`` finds no informative group at all)."""
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
    return adv, mask, keep


def rollout_stats(rounds: list[tuple[Any, Any, torch.Tensor]]) -> dict[str, float]:
    """Rollout time/tokens summed over this step's rollouts; rewards over every SAMPLED member they produced (the
    reference's reward in MP-GRPO, 1 for BLEU, would flatter the curve); the zero-variance group fraction."""
    secs = sum(ro.stats["perf/rollout_s"] for ro, _, _ in rounds)
    tokens = sum(ro.stats["rollout/gen_tokens"] for ro, _, _ in rounds)
    gen = [~ro.completions.off_policy for ro, _, _ in rounds]
    total = torch.cat([r.total[m] for (_, r, _), m in zip(rounds, gen)])
    keep = torch.cat([k for _, _, k in rounds])
    out = {"perf/rollout_s": secs, "rollout/gen_tokens": tokens, "perf/rollout_tokens_per_s": tokens / max(secs, 1e-9),
           "groups/zero_variance_frac": 1.0 - keep.float().mean().item(),
           "reward/mean": total.mean().item(), "reward/std": total.std().item()}
    for name in rounds[0][1].components:
        vals = torch.cat([r.components[name][m] for (_, r, _), m in zip(rounds, gen)])
        out[f"reward/{name}/mean"] = vals.mean().item()
        out[f"reward/{name}/std"] = vals.std().item()
    off = [r.total[ro.completions.off_policy] for ro, r, _ in rounds]
    if any(len(o) for o in off):
        out["reward/off_policy_mean"] = torch.cat(off).mean().item()
    return out


def group_stats(groups: list[Groups]) -> dict[str, float]:
    """Advantage and completion-length statistics of what enters the loss."""
    adv = torch.cat([gr.adv for gr in groups])
    lengths = torch.cat([gr.comps.mask.sum(dim=1).float()[~gr.comps.off_policy] for gr in groups])
    truncated = torch.cat([gr.comps.truncated[~gr.comps.off_policy] for gr in groups])
    return {
        "advantage/mean": adv.mean().item(), "advantage/std": adv.std().item() if adv.numel() > 1 else 0.0,
        "advantage/abs_mean": adv.abs().mean().item(),
        "completion/len_mean": lengths.mean().item(), "completion/len_max": lengths.max().item(),
        "completion/truncated_frac": truncated.float().mean().item(),
        "completion/counted_tokens": float(sum(gr.mask.sum() for gr in groups)),
    }


@torch.no_grad()
def reference_logprobs(ref: Any, ctx: PromptContext, comps: Completions, s: Any) -> torch.Tensor:
    """log pi_ref [N, T] of ``comps`` (prompts of ``ctx``) under the frozen reference (sampling temperature)."""
    cfg = s.cfg
    with s.autocast():
        ctx = ref.encode(ctx.batch)
        parts = [ref.score(ctx, comps.token_ids[sl], comps.group[sl], temperature=cfg.grpo.temperature)[0].float()
                 for sl in microbatch_slices(len(comps), cfg.trainer.micro_batch_size)]
    return torch.cat(parts)


def score_microbatch(s: Any, gr: Groups, sl: slice, return_entropy: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The policy's log-probs [n, T] (float32; + entropy [n, T]) of the completions ``gr.comps[sl]``: THE training
    forward (sampling temperature, the session's autocast, the policy's current train/eval mode), shared by the
    updates and the log pi_old recompute so both run identical computations."""
    with s.autocast():
        logp, entropy = s.policy.score(gr.ctx, gr.comps.token_ids[sl], gr.comps.group[sl],
                                       temperature=s.cfg.grpo.temperature, return_entropy=return_entropy)
    return logp.float(), entropy


@torch.no_grad()
def old_logprobs(s: Any, gr: Groups) -> torch.Tensor:
    """log pi_old [N, T]: the policy's own score of ``gr`` before the updates, over the training forward's exact
    micro-batches (``score_microbatch``), so that in the same precision the first ratio at mu = 1 is exactly 1."""
    return torch.cat([score_microbatch(s, gr, sl)[0]
                      for sl in microbatch_slices(len(gr.comps), s.cfg.trainer.micro_batch_size)])


def logprob_mismatch(trainer_logp: torch.Tensor, gr: Groups, sl: slice) -> dict[str, torch.Tensor]:
    """|sampler - trainer| log-prob [n, T] of ``gr``'s rows ``sl`` over their counted on-policy tokens (off-policy
    members have no sampler), as ``reduce_metrics`` parts: ``rollout/num_tokens``, ``rollout/logprob_diff_mean``,
    ``rollout/logprob_diff_max`` (0 when no token counts). ``trainer_logp``: the policy's, before any update."""
    sel = gr.mask[sl] & ~gr.comps.off_policy[sl, None]
    diff = torch.where(sel, (trainer_logp.detach().double() - gr.comps.logprobs[sl].double()).abs(), 0.0)
    n = sel.sum()
    return {"rollout/num_tokens": n.float(), "rollout/logprob_diff_mean": diff.sum() / n.clamp(min=1),
            "rollout/logprob_diff_max": diff.amax() if diff.numel() else diff.new_zeros(())}


def policy_update(s: Any, groups: list[Groups], loss_cfg: LossConfig) -> dict[str, float]:
    """mu optimizer steps on one step's groups; each accumulates ``grpo_loss`` over micro-batches of every part.

    The loss normaliser (token count for "dapo") is global: summed over all parts and all DP ranks, so
    micro-batching, refilled parts and data parallelism give the gradient of one pass over the global batch.
    ``Policy.optimizer_step`` AVERAGES gradients over DP ranks (the DDP convention), hence the global count divided
    by the DP size.

    log pi_old: ``gr.old_logp`` when recomputed, else the sampler's ``comps.logprobs``; the sampler's log-probs also
    feed the truncated importance weight (``loss_cfg.tis_cap``) and the mismatch metrics, which come from the
    recompute pass or, without one, from the first update's forward (the policy before any update; no extra pass).

    No counted token anywhere (every group masked out by dynamic sampling or overlong masking): no update at all,
    since an AdamW step on zero gradients would still move the weights by momentum. The normaliser is global, so
    every rank skips together; the lr schedule does not advance."""
    cfg = s.cfg
    local = torch.stack([sum(loss_normalizer(gr.mask, loss_cfg.loss_type) * gr.in_batch for gr in groups),
                         sum(gr.mask.sum().float() for gr in groups)])
    normalizer, counted = runtime.dp_sum(local, s.dp_size) / s.dp_size  # one all-reduce for both
    if float(counted) == 0:
        return {"train/loss": 0.0, "train/grad_norm": 0.0, "train/skipped_update": 1.0}
    parts, opt = [], {}
    mismatch = [logprob_mismatch(gr.old_logp, gr, slice(None)) for gr in groups if gr.old_logp is not None]
    for it in range(cfg.grpo.num_iterations):
        for gr in groups:
            comps = gr.comps
            old = comps.logprobs if gr.old_logp is None else gr.old_logp
            for sl in microbatch_slices(len(comps), cfg.trainer.micro_batch_size):
                logp, entropy = score_microbatch(s, gr, sl, return_entropy=True)
                if it == 0 and gr.old_logp is None:  # the policy before any update: the mismatch at no extra cost
                    mismatch.append(logprob_mismatch(logp, gr, sl))
                out = grpo_loss(logp, old[sl], gr.adv[sl], gr.mask[sl], normalizer=normalizer, cfg=loss_cfg,
                                ref_logp=None if gr.ref_logp is None else gr.ref_logp[sl],
                                off_policy=comps.off_policy[sl], entropy=entropy, sampler_logp=comps.logprobs[sl])
                out.loss.backward()
                parts.append(out.metrics)
        opt = s.optimizer_step()
    m = dp_reduce_metrics({**reduce_metrics(parts), **reduce_metrics(mismatch)}, s.dp_size)
    metrics = {f"loss/{k}": float(v) for k, v in m.items()
               if not k.endswith("num_sequences") and not k.startswith("rollout/")}
    metrics.update({k: float(m[k]) for k in ("rollout/logprob_diff_mean", "rollout/logprob_diff_max")})
    # the loss of one pass (parts hold mu passes over the same batch)
    metrics["train/loss"] = float(m["loss"]) / cfg.grpo.num_iterations
    metrics.pop("loss/loss", None)
    if not any(gr.comps.off_policy.any() for gr in groups):
        metrics = {k: v for k, v in metrics.items() if not k.startswith("loss/off/")}
    return {**metrics, **opt}


def dp_reduce_metrics(m: dict[str, torch.Tensor], dp_size: int) -> dict[str, torch.Tensor]:
    """``reduce_metrics`` across data-parallel ranks: every token-weighted mean re-weighted by each rank's token
    count and maxima maxed, so a rank with few (or no) counted tokens does not drag a mean towards 0. Counts and the
    loss stay rank-local (the session's ``dp_mean`` averages them, which is right for the loss: each rank's share is
    normalised by the global count / dp_size)."""
    if dp_size == 1:
        return m
    means = [k for k in m if "/" in k and not k.endswith(("/num_tokens", "_max"))]
    weights = [m[k.split("/")[0] + "/num_tokens"].double() for k in means]
    vec = torch.stack([m[k].double() * w for k, w in zip(means, weights)] + weights)
    total = runtime.dp_sum(vec, dp_size)
    out = dict(m)
    for i, k in enumerate(means):
        out[k] = total[i] / total[len(means) + i].clamp(min=1)
    maxes = [k for k in m if k.endswith("_max")]
    if maxes:
        out.update(zip(maxes, runtime.dp_max(torch.stack([m[k].double() for k in maxes]))))
    return out
