"""GRPO core (paper Section 3): group advantages, the clipped DAPO/GRPO loss with k3 KL, mixed-policy members,
dynamic-sampling and overlong-masking helpers. Pure tensor code, independent of any model backend.

One policy update over a rollout batch of B prompts x G samples (N = B*G rows, prompt-major), split into
micro-batches and data-parallel ranks::

    adv = group_advantages(rewards.view(B, G), exclude_mask=None).flatten()          # [N]
    mask = mask_truncated(comp.mask, comp.truncated) if overlong_masking else comp.mask  # [N, T]
    norm = loss_normalizer(mask, cfg.loss_type)            # local count; all-reduce SUM over DP ranks
    for s in microbatch_slices(N_local, micro_batch_size):
        logp, ent = policy.score(ctx, comp.token_ids[s], comp.group[s], return_entropy=True)
        out = grpo_loss(logp, comp.logprobs[s], adv[s], mask[s], normalizer=norm, cfg=cfg,
                        ref_logp=ref_logp[s] if cfg.beta > 0 else None, off_policy=comp.off_policy[s], entropy=ent)
        out.loss.backward()                                # gradients accumulate to the full-batch gradient
        parts.append(out.metrics)
    metrics = reduce_metrics(parts)                        # then policy.optimizer_step(lr)

With mu > 1 updates per rollout, repeat the loop mu times with the same ``comp.logprobs`` (log pi_old). When the
sampler's numerics differ from the training forward's (bf16), log pi_old is instead the policy's own no-grad score of
the rollout before the updates, and ``comp.logprobs`` goes in as ``sampler_logp`` (truncated IS, ``cfg.tis_cap``).
"""
from nemo_grpo.algorithms.advantages import group_advantages, nonzero_variance_groups
from nemo_grpo.algorithms.loss import (
    LossConfig,
    LossOutput,
    grpo_loss,
    kl_k3,
    loss_normalizer,
    microbatch_slices,
    reduce_metrics,
    sequence_normalizer,
    token_normalizer,
    truncated_is_weights,
)
from nemo_grpo.algorithms.masking import mask_truncated

__all__ = [
    "LossConfig",
    "LossOutput",
    "group_advantages",
    "grpo_loss",
    "kl_k3",
    "loss_normalizer",
    "mask_truncated",
    "microbatch_slices",
    "nonzero_variance_groups",
    "reduce_metrics",
    "sequence_normalizer",
    "token_normalizer",
    "truncated_is_weights",
]
