"""GRPO core (paper Section 3): group advantages, the clipped DAPO/GRPO loss with k3 KL, mixed-policy members,
dynamic-sampling and overlong-masking helpers. Pure tensor code, independent of any model backend."""
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
]
