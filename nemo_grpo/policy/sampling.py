"""Backend-agnostic batched sampling with a KV cache, and THE logits transform shared with scoring.

Every backend (HF ``hf.py``, megatron-core ``megatron/``) supplies two callables and reuses ``sample_tokens``:

    prefill() -> (raw_logits [N, V], cache)          next-token logits after the N prompts (already expanded to
                                                      N = B*G rows; a backend may prefill B rows and repeat).
    step(token_ids [N], cache, t) -> (raw_logits [N, V], cache)
                                                      feed token t of every row (finished rows get pad; their
                                                      outputs are ignored), return the next logits.

"raw" means straight from the LM head, before Granite's ``logits_scaling``. ``scale_logits`` (divide by
logits_scaling, then by temperature) followed by ``torch.log_softmax`` (inside ``token_logprobs``, and in the
sampler's loop) is the only path from raw logits to probabilities, for sampling AND for ``Policy.score``; that is
what makes the sampling-time log-probs equal a later scoring pass.

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
    """log softmax(scaled)[token] and optionally the entropy of softmax(scaled) (not differentiable).
    scaled [..., V], ids [...] -> [...], [...]."""
    # one fused log_softmax kernel (forward and backward) instead of logsumexp's several; it is also what the
    # sampler gathers from, so sampling-time and scoring log-probs come out of the same op
    logp = torch.log_softmax(scaled, dim=-1)  # [..., V]
    picked = logp.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if return_entropy:  # a metric (no loss uses it): kept out of the autograd graph, saving its [..., V] buffers
        logp_d = logp.detach()
        entropy = -(logp_d.exp() * logp_d).sum(-1)
    return picked, entropy


def top_p_keep(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus set: keep [N, V] bool, the smallest most-probable set with mass >= top_p (top token always kept)."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    # keep a token while the mass strictly before it is still below top_p
    keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < top_p
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def draw_inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One token per row by inverse-CDF: the first v with cdf[v] >= u * cdf[V-1]. probs [N, V] >= 0 (need not
    sum to 1: a top-p-masked row is renormalised by its own total), uniform [N, 1] float64 in (0, 1] -> [N] long.

    The CDF is accumulated in float64, so a token's chance is its probability to ~1e-16 (a float32 CDF would
    round tokens below ~6e-8 of mass to nothing or to an ulp). u in (0, 1] makes the target lie in
    (0, total]: a zero-probability token (cdf[v] == cdf[v-1]) can never be the first to reach it, and the
    last token with mass always does, so the index is always valid."""
    cdf = probs.cumsum(-1, dtype=torch.float64)  # [N, V], non-decreasing
    return torch.searchsorted(cdf, uniform * cdf[:, -1:]).squeeze(-1)


def _draw(logp: torch.Tensor, top_p: float, uniform: torch.Tensor) -> torch.Tensor:
    """One token per row from exp(logp) [N, V] (log-softmaxed), restricted to the top-p nucleus -> [N]."""
    probs = logp.exp()
    if top_p < 1.0:
        probs = probs.masked_fill(~top_p_keep(probs, top_p), 0.0)
    return draw_inverse_cdf(probs, uniform)


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
    stop_check_every: int | None = None,
) -> SampleOutput:
    """Sample up to ``max_new_tokens`` per row; a row stops at its eos and emits pad afterwards.

    ``temperature == 0`` means greedy (log-probs then at temperature 1). The returned log-probs are those of the
    full temperature-scaled distribution (what ``Policy.score`` computes), even when top-p truncates the draw,
    so they serve as log pi_old. Draws are inverse-CDF (``draw_inverse_cdf``) with one uniform per row and token
    from ``generator``, all taken before the first step. ``stop_check_every``: steps between host-side "all rows
    finished?" checks (default 1 on CPU, 8 elsewhere); the output is the same for any value.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if stop_check_every is not None and stop_check_every < 1:
        raise ValueError(f"stop_check_every must be >= 1, got {stop_check_every}")
    logits, cache = prefill()  # [N, V]
    n, dev = logits.shape[0], logits.device
    sampling = temperature != 0
    # one draw of all uniforms per rollout (1 - rand: in (0, 1], see draw_inverse_cdf), not one call per token
    uniforms = (1.0 - torch.rand(max_new_tokens, n, 1, generator=generator, dtype=torch.float64, device=dev)
                ) if sampling else None  # [T, N, 1]
    if stop_check_every is None:  # a host sync per token is cheap on CPU, a pipeline stall on an accelerator
        stop_check_every = 1 if dev.type == "cpu" else 8
    finished = torch.zeros(n, dtype=torch.bool, device=dev)
    all_live = torch.ones(n, dtype=torch.bool, device=dev)
    none_finished = True  # known on the host: no row has finished yet, so nothing needs masking this step
    tokens, masks, logps = [], [], []
    for t in range(max_new_tokens):
        scaled = scale_logits(logits, logits_scaling, temperature)  # [N, V]
        logp = torch.log_softmax(scaled, dim=-1)
        tok = _draw(logp, top_p, uniforms[t]) if sampling else scaled.argmax(-1)
        lp = logp.gather(-1, tok.unsqueeze(-1)).squeeze(-1)  # what token_logprobs computes
        if none_finished:
            live, finished = all_live, tok == eos_token_id
        else:
            live = ~finished
            tok, lp = tok.masked_fill(finished, pad_token_id), lp.masked_fill(finished, 0.0)
            finished = finished | (tok == eos_token_id)
        tokens.append(tok)
        masks.append(live)
        logps.append(lp)
        if t == max_new_tokens - 1:
            break
        none_finished = False
        if (t + 1) % stop_check_every == 0:
            done = int(finished.sum())  # the one host sync of a checked step
            if done == n:
                break
            none_finished = done == 0
        logits, cache = step(tok, cache, t)
    mask = torch.stack(masks, 1)  # [N, T]
    # with sparse stop checks, steps after every row finished add all-pad columns: drop them
    used = len(masks) if stop_check_every == 1 else int(mask.any(0).sum())
    return SampleOutput(
        token_ids=torch.stack(tokens, 1)[:, :used],  # [N, T]
        mask=mask[:, :used],
        logprobs=torch.stack(logps, 1)[:, :used],
        truncated=~finished,
    )
