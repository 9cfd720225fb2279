"""The rollout engine: B prompts -> N = B*G completions (the GRPO hot path).

Each prompt's audio is encoded ONCE (``Policy.encode``); all G samples of all B prompts are drawn in one batched,
KV-cached ``Policy.generate`` call that stops each sequence at end-of-text and records log pi_old at sampling time.
For Mixed-Policy GRPO (paper Section 3.2) only G-1 samples are generated: the reference answer is tokenized as the
policy would emit it (text + eos) and appended as the G-th, OFF-POLICY member of its group. It is never generated
(LUFFY: pi_phi = 1, so its stored log-prob is 0) and is only scored in the training forward.

Shape legend: B prompts, G samples per prompt, N = B*G, T completion tokens.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from nemo_grpo.policy.base import Completions, Policy, PromptBatch, PromptContext

__all__ = ["Rollout", "rollout", "append_off_policy", "pad_right"]


@dataclass
class Rollout:
    """What ``rollout`` returns: the context to reuse for scoring, the completions and measurements.

    stats: seconds (``perf/rollout_s``: encode + generate), generated tokens (``rollout/gen_tokens``: counted
    tokens of sampled members, eos included) and ``perf/rollout_tokens_per_s``. Wall-clock values live under
    ``perf/`` (they are the only metrics that differ between two runs with the same seed).
    """

    ctx: PromptContext
    completions: Completions
    stats: dict[str, float] = field(default_factory=dict)


def pad_right(x: torch.Tensor, length: int, value: float | int | bool) -> torch.Tensor:
    """[N, T] -> [N, length] padded on the right with ``value`` (a new tensor; T <= length)."""
    if x.shape[1] == length:
        return x
    pad = torch.full((x.shape[0], length - x.shape[1]), value, dtype=x.dtype, device=x.device)
    return torch.cat([x, pad], dim=1)


def append_off_policy(gen: Completions, ref_ids: torch.Tensor, ref_mask: torch.Tensor, references: list[str],
                      pad_token_id: int, ref_truncated: torch.Tensor | None = None) -> Completions:
    """Append one off-policy member per group after the group's sampled members (prompt-major order kept).

    gen:      B*(G-1) sampled completions (prompt-major, ``gen.group`` sorted).
    ref_ids:  [B, T_r] tokenized references (eos included unless cut), ``ref_mask`` [B, T_r] bool;
    references: the B texts the members stand for (rewarded as such); ref_truncated: [B] bool (default all False).
    Returns B*G completions: for prompt b, rows b*G .. b*G+G-2 are its samples and row b*G+G-1 its reference,
    with log-prob 0 (pi_phi = 1), ``off_policy`` True.
    """
    b = ref_ids.shape[0]
    n_gen = len(gen)
    if n_gen % b:
        raise ValueError(f"{n_gen} sampled completions do not split into {b} groups")
    g1 = n_gen // b
    t = max(gen.token_ids.shape[1], ref_ids.shape[1])
    dev = gen.token_ids.device
    token_ids = torch.cat([pad_right(gen.token_ids, t, pad_token_id), pad_right(ref_ids.to(dev), t, pad_token_id)])
    mask = torch.cat([pad_right(gen.mask, t, False), pad_right(ref_mask.to(dev), t, False)])
    logprobs = torch.cat([pad_right(gen.logprobs, t, 0.0),
                          torch.zeros(b, t, dtype=gen.logprobs.dtype, device=dev)])
    ref_truncated = torch.zeros(b, dtype=torch.bool) if ref_truncated is None else ref_truncated
    truncated = torch.cat([gen.truncated, ref_truncated.to(dev)])
    off_policy = torch.cat([gen.off_policy, torch.ones(b, dtype=torch.bool, device=dev)])
    # Row order: for each prompt its g1 samples, then its reference (index n_gen + b in the concatenation).
    order = torch.tensor([i for p in range(b) for i in [*range(p * g1, (p + 1) * g1), n_gen + p]], device=dev)
    texts_all = list(gen.texts) + list(references)
    return Completions(
        token_ids=token_ids[order],
        mask=mask[order],
        logprobs=logprobs[order],
        truncated=truncated[order],
        group=torch.arange(b, device=dev).repeat_interleave(g1 + 1),
        texts=[texts_all[i] for i in order.tolist()],
        off_policy=off_policy[order],
    )


def rollout(
    policy: Policy,
    batch: PromptBatch | PromptContext,
    *,
    num_samples: int,
    mixed_policy: bool = False,
    max_new_tokens: int = 200,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Sample a group of ``num_samples`` (G) completions for each of the B prompts in ``batch``.

    batch: a PromptBatch (encoded here, once) or an already encoded PromptContext.
    mixed_policy: generate G-1 samples and append the reference answer as the off-policy G-th member.
    Returns a ``Rollout`` with N = B*G completions in prompt-major order.
    """
    if num_samples < (2 if mixed_policy else 1):
        raise ValueError(f"num_samples must be >= {2 if mixed_policy else 1}, got {num_samples}")
    t0 = time.perf_counter()
    with torch.no_grad():
        ctx = batch if isinstance(batch, PromptContext) else policy.encode(batch)
        n_gen = num_samples - 1 if mixed_policy else num_samples
        comps = policy.generate(ctx, n_gen, max_new_tokens, temperature=temperature, top_p=top_p,
                                generator=generator)
    elapsed = time.perf_counter() - t0
    tokens = float(comps.mask.sum())
    if mixed_policy:
        from nemo_grpo.policy.inputs import encode_completions

        refs = list(ctx.batch.references)
        ref_ids, ref_mask, ref_cut = encode_completions(policy.tokenizer, refs, max_tokens=max_new_tokens)
        # A reference cut at max_new_tokens is rewarded as what is trained (the cut text), not the full answer.
        texts = [policy.tokenizer.decode(ref_ids[i][ref_mask[i]], skip_special_tokens=True) if ref_cut[i] else refs[i]
                 for i in range(len(refs))]
        comps = append_off_policy(comps, ref_ids, ref_mask, texts, policy.pad_token_id, ref_cut)
    stats = {"perf/rollout_s": elapsed, "rollout/gen_tokens": tokens,
             "perf/rollout_tokens_per_s": tokens / max(elapsed, 1e-9)}
    return Rollout(ctx=ctx, completions=comps, stats=stats)
