"""Backend-agnostic batched sampling with a KV cache, and THE logits transform shared with scoring.

Every backend (HF ``hf.py``, megatron-core ``megatron/``) supplies two callables and reuses ``sample_tokens``:

    prefill() -> (raw_logits [N, V], cache)          next-token logits after the N prompts (already expanded to
                                                      N = B*G rows; a backend may prefill B rows and repeat).
    step(token_ids [N], cache, t) -> (raw_logits [N, V], cache)
                                                      feed token t of every row (finished rows get pad; their
                                                      outputs are ignored), return the next logits.

"raw" means straight from the LM head, before Granite's ``logits_scaling``. ``scale_logits`` (divide by
logits_scaling, then by temperature) and ``token_logprobs`` are the only places that turn raw logits into
probabilities, for sampling AND for ``Policy.score``; that is what makes the sampling-time log-probs equal a later
scoring pass.

Shape legend: N rows (= B*G), T new tokens, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

PrefillFn = Callable[[], tuple[torch.Tensor, Any]]
StepFn = Callable[[torch.Tensor, Any, int], tuple[torch.Tensor, Any]]


def scale_logits(logits: torch.Tensor, logits_scaling: float, temperature: float = 1.0) -> torch.Tensor:
    """THE logits transform: ``raw / logits_scaling / temperature`` in float32 (or wider). [..., V] -> [..., V].

    ``temperature == 0`` (greedy) scores at temperature 1.
    """
    out = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    out = out / logits_scaling
    if temperature not in (0.0, 1.0):
        out = out / temperature
    return out


def token_logprobs(scaled: torch.Tensor, token_ids: torch.Tensor, return_entropy: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(scaled)[token] and optionally the entropy of softmax(scaled). scaled [..., V], ids [...]."""
    logz = torch.logsumexp(scaled, dim=-1)  # [...]
    picked = scaled.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1) - logz
    entropy = None
    if return_entropy:
        logp = scaled - logz.unsqueeze(-1)
        entropy = -(logp.exp() * logp).sum(-1)
    return picked, entropy


def top_p_keep(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus set: keep [N, V] bool, the smallest most-probable set with mass >= top_p (top token always kept)."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    # keep a token while the mass strictly before it is still below top_p
    keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < top_p
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def _draw(scaled: torch.Tensor, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from softmax(scaled), restricted to the top-p nucleus. [N, V] -> [N]."""
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        probs = probs.masked_fill(~top_p_keep(probs, top_p), 0.0)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class SampleOutput:
    """token_ids [N, T] (pad after eos), mask [N, T] bool (tokens up to and incl. eos), logprobs [N, T]
    (log pi at sampling temperature, NOT top-p renormalised, 0 where mask is False), truncated [N] bool."""

    token_ids: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    truncated: torch.Tensor


@torch.no_grad()
def sample_tokens(
    prefill: PrefillFn,
    step: StepFn,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    logits_scaling: float,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> SampleOutput:
    """Sample up to ``max_new_tokens`` per row; a row stops at its eos and emits pad afterwards.

    ``temperature == 0`` means greedy (log-probs then at temperature 1). The returned log-probs are those of the
    full temperature-scaled distribution (what ``Policy.score`` computes), even when top-p truncates the draw,
    so they serve as log pi_old.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    logits, cache = prefill()  # [N, V]
    n = logits.shape[0]
    finished = torch.zeros(n, dtype=torch.bool, device=logits.device)
    tokens, masks, logps = [], [], []
    for t in range(max_new_tokens):
        scaled = scale_logits(logits, logits_scaling, temperature)  # [N, V]
        tok = scaled.argmax(-1) if temperature == 0 else _draw(scaled, top_p, generator)
        lp, _ = token_logprobs(scaled, tok)
        tok = tok.masked_fill(finished, pad_token_id)
        tokens.append(tok)
        masks.append(~finished)
        logps.append(lp.masked_fill(finished, 0.0))
        finished = finished | (tok == eos_token_id)
        if bool(finished.all()) or t == max_new_tokens - 1:
            break
        logits, cache = step(tok, cache, t)
    return SampleOutput(
        token_ids=torch.stack(tokens, 1),  # [N, T]
        mask=torch.stack(masks, 1),
        logprobs=torch.stack(logps, 1),
        truncated=~finished,
    )
