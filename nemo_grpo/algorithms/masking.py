"""Overlong masking (DAPO): drop truncated completions from the loss without touching the caller's mask.

Shape legend: N completions, T completion tokens.
"""
from __future__ import annotations

import torch

__all__ = ["mask_truncated"]


def mask_truncated(mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """A NEW mask [N, T] with every token of truncated completions set False.

    Args:
        mask:      [N, T] bool, True = the token counts.
        truncated: [N] bool, True = the completion hit max_new_tokens without an eos (``Completions.truncated``).

    The input mask is not modified. Truncated rows still count as sequences for the "grpo" normaliser (their
    per-sequence mean is 0), and their rewards still enter the group statistics: only their gradient is removed.
    """
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool [N, T], got {mask.dtype} {tuple(mask.shape)}")
    if truncated.shape != mask.shape[:1] or truncated.dtype != torch.bool:
        raise ValueError(f"truncated must be bool [N] = {tuple(mask.shape[:1])}, got {truncated.dtype} "
                         f"{tuple(truncated.shape)}")
    return mask & ~truncated[:, None]
