"""Group-relative advantages (paper Eq. 1) and the DAPO dynamic-sampling filter.

Shape legend: B prompts, G samples per prompt (the group), N = B*G completions (prompt-major).

Std convention. The paper writes ``std(R)`` without saying which estimator. TRL 1.16 (the peer implementation and,
as far as the paper says, the recipe it follows) uses the UNBIASED group std (Bessel, ``G - 1``) and adds 1e-4 to
the denominator: ``A = (r - mean) / (std_unbiased + 1e-4)``. Those are the defaults here, so TRL parity is exact;
``unbiased=False, eps=0.0`` gives the population-std reading of Eq. 1.

Zero-variance groups (every member has the same reward, so the group carries no learning signal) get advantages
of exactly 0, never NaN and never the rounding residue ``(r - mean) / eps`` that TRL leaves there (~1e-12).
"""
from __future__ import annotations

import torch

__all__ = ["group_advantages", "nonzero_variance_groups"]


def _check_rewards(rewards: torch.Tensor) -> None:
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, G], got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a float tensor, got {rewards.dtype}")
    bad = ~torch.isfinite(rewards)
    if bad.any():
        b, g = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"rewards[{b}, {g}] is not finite ({rewards[b, g].item()})")


def group_advantages(
    rewards: torch.Tensor,
    *,
    scale_by_std: bool = True,
    leave_one_out: bool = False,
    unbiased: bool = True,
    eps: float = 1e-4,
    exclude_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-group normalised advantages, paper Eq. 1: ``A_i = (r_i - mean(R)) / (std(R) + eps)``.

    Args:
        rewards:       [B, G] float, one group of G rewards per prompt.
        scale_by_std:  divide by the group std (Eq. 1). False gives Dr.GRPO's unscaled ``r - mean``.
        leave_one_out: baseline for member i is the mean of the OTHER included members (RLOO) instead of the
                       group mean; combined with ``scale_by_std`` the same group std divides it.
        unbiased:      Bessel-corrected std (``G - 1``), as TRL; False = population std.
        eps:           added to the std in the denominator (TRL: 1e-4). Must be >= 0.
        exclude_mask:  [B, G] bool or None. True = the member is left out of the group STATISTICS (mean, std,
                       leave-one-out baseline) but still receives an advantage against them. Mixed-policy GRPO
                       uses it to switch the off-policy member out; the default (None) includes every member,
                       as the paper and LUFFY do.

    Returns:
        [B, G] advantages, same dtype as ``rewards``. A group whose included rewards are all equal, or that has
        fewer than two included members (G = 1 included), gets exactly 0 for every member.
    """
    _check_rewards(rewards)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    include = torch.ones_like(rewards, dtype=torch.bool)
    if exclude_mask is not None:
        if exclude_mask.shape != rewards.shape or exclude_mask.dtype != torch.bool:
            raise ValueError(f"exclude_mask must be bool {tuple(rewards.shape)}, got {exclude_mask.dtype} "
                             f"{tuple(exclude_mask.shape)}")
        include = ~exclude_mask
    w = include.to(rewards.dtype)  # [B, G]
    n = w.sum(dim=1, keepdim=True)  # [B, 1] included members per group
    total = (rewards * w).sum(dim=1, keepdim=True)
    mean = total / n.clamp(min=1)
    if leave_one_out:
        # Included members exclude themselves from their baseline; excluded ones already are outside `total`.
        n_other = n - w
        baseline = (total - rewards * w) / n_other.clamp(min=1)
    else:
        baseline = mean
    centred = rewards - baseline  # [B, G]

    # Exact zero-variance test (max == min over included members): a float mean of equal values can miss them by
    # one ulp, which the std division would blow up to ~1e-12..1e-3.
    big = torch.finfo(rewards.dtype).max
    r_max = torch.where(include, rewards, -big).amax(dim=1, keepdim=True)
    r_min = torch.where(include, rewards, big).amin(dim=1, keepdim=True)
    degenerate = (r_max <= r_min) | (n < 2)  # [B, 1]

    if scale_by_std:
        ddof = 1 if unbiased else 0
        var = (((rewards - mean) * w) ** 2).sum(dim=1, keepdim=True) / (n - ddof).clamp(min=1)
        adv = centred / (var.sqrt() + eps)
    else:
        adv = centred
    return torch.where(degenerate, torch.zeros_like(adv), adv)


def nonzero_variance_groups(rewards: torch.Tensor) -> torch.Tensor:
    """DAPO dynamic sampling filter: which groups still carry a learning signal.

    Args:
        rewards: [B, G] float.

    Returns:
        keep: [B] bool, True where the group's rewards are not all equal (G = 1 groups are never kept). The recipe
        drops the others and refills the batch with freshly sampled prompts (DAPO); this function only decides.
    """
    _check_rewards(rewards)
    return rewards.amax(dim=1) > rewards.amin(dim=1)
