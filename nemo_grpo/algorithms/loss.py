"""The GRPO / DAPO policy loss (paper Eqs. 2-3) with mixed-policy (Section 3.2) support and k3 KL to a reference.

Shape legend: N completions in this micro-batch, T completion tokens (padded).

Per token (i, t) with advantage A_i (one per completion):

    on-policy  (sampled by pi_old):   s = exp(logp - old_logp)
                                      l = min(s * A, clip(s, 1 - epsilon, 1 + epsilon_high) * A)      Eq. 2
    off-policy (the injected reference, pi_phi = 1, LUFFY):
                                      s = f(pi_theta) = f(exp(logp)),  f(p) = p / (p + gamma) if shaping else p
                                      l = s * A   (no clipping unless ``clip_off_policy``)             Eq. 4
    KL (every counted token):         k = exp(ref_logp - logp) - (ref_logp - logp) - 1                 (k3)
                                      (times s on on-policy tokens if ``kl_importance_correction``)
    truncated IS (``tis_cap``, on-policy only):
                                      w = min(exp(old_logp - sampler_logp), tis_cap), detached; l <- w * l
    per-token loss:                   -(l - beta * k)      (w weights the policy-gradient term only, as TRL)

Aggregation (``loss_type``):
    "dapo" (paper Eq. 3, default): sum of per-token losses over every counted token / ``normalizer``, where
           ``normalizer`` is the number of counted tokens of the WHOLE group batch (all micro-batches, all
           data-parallel ranks; ``token_normalizer`` gives the local part to all-reduce).
    "grpo" (DeepSeekMath / TRL "grpo"): per-sequence token mean, summed over sequences / ``normalizer`` = the
           number of sequences of the whole batch (``sequence_normalizer``; empty rows count, as in TRL).
Because the normaliser is global, summing ``loss.backward()`` over micro-batches gives exactly the gradient of one
pass over the whole batch (tested); across data-parallel ranks, SUM the gradients (or average them and divide the
global normaliser by the DP size).

Several policy updates per rollout batch (mu > 1): ``old_logp`` is the log-prob under the policy that sampled
(stored at rollout time, e.g. ``Completions.logprobs``) and stays fixed for all mu updates; ``logp`` is recomputed
with grad at every update. At the first update ``logp == old_logp`` (up to sampling-vs-scoring numerics), so s = 1,
nothing is clipped, and the gradient is the plain policy gradient ``-A * grad(logp)`` (plus the KL term; tested).
When the sampler's numerics differ from the training pass's (bf16, another inference engine), ``old_logp`` is the
trainer's own no-grad score of the rollout before the updates, and the sampler's log-probs enter only through the
truncated importance weight ``w`` (``tis_cap``; TRL's ``vllm_importance_sampling_mode="token_truncate"``, verl's TIS).

Masked-out tokens (mask False) contribute exactly 0 to the loss AND the gradient, whatever garbage logp/old_logp
hold there (-inf, NaN): they are replaced by 0 with ``where`` before any arithmetic, never multiplied by the mask.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import torch

__all__ = [
    "LossConfig",
    "LossOutput",
    "grpo_loss",
    "kl_k3",
    "token_normalizer",
    "truncated_is_weights",
    "sequence_normalizer",
    "loss_normalizer",
    "microbatch_slices",
    "reduce_metrics",
]

LOSS_TYPES = ("dapo", "grpo")


@dataclass(frozen=True)
class LossConfig:
    """Loss hyper-parameters. Defaults follow the paper (Eq. 2 symmetric clip 0.2, beta 0.02, DAPO aggregation).

    epsilon:       lower clip, ratio floor 1 - epsilon.
    epsilon_high:  upper clip, ratio ceiling 1 + epsilon_high (DAPO's clip-higher uses 0.28).
    beta:          k3-KL weight; 0 disables the KL term and ``ref_logp`` is then not needed at all.
    loss_type:     "dapo" (token-level, Eq. 3) or "grpo" (sequence mean then mean over sequences).
    off_policy_shaping_gamma: None = off-policy ratio pi_theta; a float gamma > 0 = LUFFY policy shaping
                   f(p) = p / (p + gamma) (LUFFY uses 0.1).
    clip_off_policy: apply the same min/clip to the off-policy ratio (LUFFY and the paper: False).
    kl_importance_correction: multiply the on-policy per-token KL by the (differentiable) ratio s, the
                   DeepSeek-V3.2 unbiased reverse-KL gradient; TRL >= 1.x turns it on by default
                   (``use_bias_correction_kl``). The paper's Eq. 3 has the plain k3 term: default False.
                   Off-policy tokens never get it (pi_phi = 1 is not a sampling distribution).
    tis_cap:       None = no truncated importance sampling; a float C > 0 = weight each on-policy token's
                   policy-gradient term by min(exp(old_logp - sampler_logp), C), detached (``grpo_loss`` then
                   needs ``sampler_logp``). TRL's default cap is 3.0 (``vllm_importance_sampling_clip_max``).
    """

    epsilon: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.02
    loss_type: Literal["dapo", "grpo"] = "dapo"
    off_policy_shaping_gamma: float | None = None
    clip_off_policy: bool = False
    kl_importance_correction: bool = False
    tis_cap: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.epsilon < 1.0:
            raise ValueError(f"epsilon must be in [0, 1), got {self.epsilon}")
        if self.epsilon_high < 0.0:
            raise ValueError(f"epsilon_high must be >= 0, got {self.epsilon_high}")
        if self.beta < 0.0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        g = self.off_policy_shaping_gamma
        if g is not None and not g > 0.0:
            raise ValueError(f"off_policy_shaping_gamma must be > 0 or None, got {g}")
        if self.tis_cap is not None and not self.tis_cap > 0.0:
            raise ValueError(f"tis_cap must be > 0 or None, got {self.tis_cap}")

    @classmethod
    def from_dict(cls, d: dict) -> "LossConfig":
        """Build from a config mapping; unknown keys raise ValueError naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown loss config key(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


@dataclass
class LossOutput:
    """loss: scalar tensor to ``backward()`` (already divided by the global normaliser).

    metrics: detached scalar tensors (no ``.item()``: the caller syncs once). Keys ``{on,off}/<name>``:
        num_tokens    counted tokens of that kind in this micro-batch (weights for the means below)
        policy_loss   mean of -l over those tokens
        kl            mean KL term over those tokens as it enters the loss (k3, ratio-weighted under
                      ``kl_importance_correction``; 0 when no ref_logp is given)
        clip_low      fraction of tokens whose lower clip is active (s < 1 - epsilon and A < 0)
        clip_high     fraction whose upper clip is active (s > 1 + epsilon_high and A > 0); both 0 for
                      off-policy tokens unless ``clip_off_policy``
        ratio_mean    mean s (off-policy: the possibly shaped pi_theta); ``ratio_max`` is a max (-inf if none)
        entropy       mean entropy, only when ``entropy`` is given
    and, with ``tis_cap``, ``on/tis_weight_mean`` (mean truncated IS weight w) and ``on/tis_clip_frac`` (fraction
    of tokens whose raw weight exceeded the cap).
    plus ``num_sequences`` and ``loss`` (this micro-batch's contribution). Combine micro-batches with
    ``reduce_metrics``.
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi_theta || pi_ref) per token: exp(ref - logp) - (ref - logp) - 1 >= 0. [N, T] -> [N, T]."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def token_normalizer(mask: torch.Tensor) -> torch.Tensor:
    """Local "dapo" normaliser: the number of counted tokens in ``mask`` [N, T] (float scalar).

    Sum it over every micro-batch of the group batch and all-reduce (SUM) over data-parallel ranks BEFORE the
    first ``grpo_loss`` call of the batch."""
    return mask.sum().to(torch.float32)


def sequence_normalizer(mask: torch.Tensor) -> torch.Tensor:
    """Local "grpo" normaliser: the number of sequences (rows of ``mask`` [N, T], empty ones included)."""
    return torch.tensor(float(mask.shape[0]), device=mask.device)


def loss_normalizer(mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """``token_normalizer`` for "dapo", ``sequence_normalizer`` for "grpo"."""
    if loss_type == "dapo":
        return token_normalizer(mask)
    if loss_type == "grpo":
        return sequence_normalizer(mask)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def microbatch_slices(n: int, micro_batch_size: int) -> list[slice]:
    """Row slices covering ``range(n)`` in chunks of ``micro_batch_size`` (the last may be shorter).

    With the global normaliser, ``sum(grpo_loss(x[s], ...).loss for s in slices)`` has the full-batch gradient."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    return [slice(i, min(i + micro_batch_size, n)) for i in range(0, n, micro_batch_size)]


def truncated_is_weights(old_logp: torch.Tensor, sampler_logp: torch.Tensor, cap: float
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated importance weights for the sampler/trainer mismatch: w = min(exp(old_logp - sampler_logp), cap)
    and clipped = the raw ratio exceeded the cap. [N, T] x2 -> [N, T] float (detached), [N, T] bool.

    ``old_logp`` is the trainer's log-prob of the sampled token before any update, ``sampler_logp`` the sampler's.
    Neutralise uncounted positions (equal values there give w = 1) before calling."""
    raw = torch.exp((old_logp - sampler_logp).detach())
    return torch.clamp(raw, max=cap), raw > cap


def _check_inputs(logp, old_logp, advantages, mask, ref_logp, off_policy, cfg, sampler_logp=None) -> None:
    n_t = tuple(logp.shape)
    if logp.dim() != 2:
        raise ValueError(f"logp must be [N, T], got {n_t}")
    for name, t in (("old_logp", old_logp), ("mask", mask), ("ref_logp", ref_logp), ("sampler_logp", sampler_logp)):
        if t is not None and tuple(t.shape) != n_t:
            raise ValueError(f"{name} must have shape {n_t} like logp, got {tuple(t.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool (True = token counts), got {mask.dtype}")
    if tuple(advantages.shape) != n_t[:1]:
        raise ValueError(f"advantages must be [N] = {n_t[:1]}, got {tuple(advantages.shape)}")
    if off_policy is not None and (tuple(off_policy.shape) != n_t[:1] or off_policy.dtype != torch.bool):
        raise ValueError(f"off_policy must be bool [N] = {n_t[:1]}, got {off_policy.dtype} {tuple(off_policy.shape)}")
    if cfg.beta > 0 and ref_logp is None:
        raise ValueError("ref_logp is required when beta > 0")
    if cfg.tis_cap is not None and sampler_logp is None:
        raise ValueError("sampler_logp is required when tis_cap is set")


def _masked_mean(x: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    return torch.where(sel, x, 0).sum() / sel.sum().clamp(min=1)


def _clipped(s: torch.Tensor, adv: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """Eq. 2: min(s * A, clip(s, 1 - eps, 1 + eps_high) * A)."""
    return torch.minimum(s * adv, torch.clamp(s, 1.0 - cfg.epsilon, 1.0 + cfg.epsilon_high) * adv)


def _surrogate(logp, old_logp, adv, off_policy, cfg):
    """Per-token surrogate l [N, T] (both kinds), the on-policy ratio s [N, T] and the off-policy f(pi_theta)."""
    ratio = torch.exp(logp - old_logp)  # only on-policy entries are used
    p = torch.exp(logp)  # pi_theta / pi_phi with pi_phi = 1
    gamma = cfg.off_policy_shaping_gamma
    s_off = p if gamma is None else p / (p + gamma)
    l_off = _clipped(s_off, adv, cfg) if cfg.clip_off_policy else s_off * adv
    return torch.where(off_policy[:, None], l_off, _clipped(ratio, adv, cfg)), ratio, s_off


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    normalizer: float | torch.Tensor,
    cfg: LossConfig,
    ref_logp: torch.Tensor | None = None,
    off_policy: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    sampler_logp: torch.Tensor | None = None,
) -> LossOutput:
    """Clipped GRPO/DAPO loss of one micro-batch (see the module docstring for the formulas).

    Args:
        logp:       [N, T] log pi_theta of the completion tokens, WITH grad.
        old_logp:   [N, T] log pi_old (no grad): the sampler's log-probs, or the trainer's own score of the rollout
                    before the updates; ignored for off-policy rows.
        advantages: [N] one advantage per completion (``group_advantages(...).flatten()``).
        mask:       [N, T] bool, True = the token counts (eos included, padding and overlong-masked rows excluded).
        normalizer: global token count ("dapo") or sequence count ("grpo") of the whole batch, > 0 (a zero count
                    is clamped to 1 so an all-empty batch gives loss 0, not NaN).
        cfg:        LossConfig.
        ref_logp:   [N, T] log pi_ref (no grad); required iff cfg.beta > 0.
        off_policy: [N] bool, True for mixed-policy reference members (pi_phi = 1). None = all on-policy.
        entropy:    [N, T] per-token policy entropy, for metrics only.
        sampler_logp: [N, T] the sampler's log-probs (no grad); required iff cfg.tis_cap is set (truncated IS).

    The loss is computed in the widest dtype among logp/old_logp/ref_logp and at least float32.
    """
    _check_inputs(logp, old_logp, advantages, mask, ref_logp, off_policy, cfg, sampler_logp)
    if off_policy is None:
        off_policy = torch.zeros(logp.shape[0], dtype=torch.bool, device=logp.device)
    off_tok = off_policy[:, None] & mask  # [N, T]
    on_tok = ~off_policy[:, None] & mask  # [N, T]
    # Compute in the widest input dtype, at least float32 (bf16 log-probs would round the ratio to ~1e-2).
    dt = torch.promote_types(torch.promote_types(logp.dtype, old_logp.dtype), torch.float32)
    if ref_logp is not None:
        dt = torch.promote_types(dt, ref_logp.dtype)
    adv = advantages.to(dt)[:, None]  # [N, 1]
    # Neutralise uncounted positions first: padding may hold -inf/NaN log-probs, and where() (unlike * mask)
    # passes neither their values nor a NaN gradient on.
    logp = torch.where(mask, logp.to(dt), 0.0)
    old_logp = torch.where(on_tok, old_logp.to(dt), 0.0)  # off-policy rows: no pi_old

    lterm, ratio, s_off = _surrogate(logp, old_logp, adv, off_policy, cfg)
    tis = None
    if cfg.tis_cap is not None:  # on-policy tokens only: the neutralised entries give w = 1 elsewhere
        tis = truncated_is_weights(old_logp, torch.where(on_tok, sampler_logp.to(dt), 0.0), cfg.tis_cap)
        lterm = tis[0] * lterm

    kl = None
    per_token = -lterm
    if ref_logp is not None:
        kl = kl_k3(logp, torch.where(mask, ref_logp.to(dt), 0.0))
        if cfg.kl_importance_correction:
            kl = torch.where(off_policy[:, None], kl, kl * ratio)
        if cfg.beta > 0:
            per_token = per_token + cfg.beta * kl
    per_token = torch.where(mask, per_token, 0.0)

    norm = torch.as_tensor(normalizer, dtype=per_token.dtype, device=logp.device).clamp(min=1.0)
    if cfg.loss_type == "dapo":
        loss = per_token.sum() / norm
    else:
        seq = per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1).to(per_token.dtype)  # [N]
        loss = seq.sum() / norm

    metrics = _metrics(lterm, kl, entropy, on_tok, off_tok, ratio, s_off, adv, cfg, loss, logp.shape[0], tis)
    return LossOutput(loss=loss, metrics=metrics)


@torch.no_grad()
def _metrics(lterm, kl, entropy, on_tok, off_tok, ratio, s_off, adv, cfg, loss, n_seq, tis):
    dev = ratio.device
    m: dict[str, torch.Tensor] = {"loss": loss.detach(), "num_sequences": torch.tensor(float(n_seq), device=dev)}
    zero = torch.zeros((), dtype=ratio.dtype, device=dev)
    neg_inf = torch.tensor(float("-inf"), dtype=ratio.dtype, device=dev)
    for key, sel, s, clips in (("on", on_tok, ratio, True), ("off", off_tok, s_off, cfg.clip_off_policy)):
        m[f"{key}/num_tokens"] = sel.sum().to(torch.float32)
        m[f"{key}/policy_loss"] = _masked_mean(-lterm, sel)
        m[f"{key}/kl"] = _masked_mean(kl, sel) if kl is not None else zero
        if clips:
            low = (s < 1.0 - cfg.epsilon) & (adv < 0)
            high = (s > 1.0 + cfg.epsilon_high) & (adv > 0)
            m[f"{key}/clip_low"] = _masked_mean(low.to(ratio.dtype), sel)
            m[f"{key}/clip_high"] = _masked_mean(high.to(ratio.dtype), sel)
        else:
            m[f"{key}/clip_low"] = zero
            m[f"{key}/clip_high"] = zero
        m[f"{key}/ratio_mean"] = _masked_mean(s, sel)
        m[f"{key}/ratio_max"] = torch.where(sel, s, neg_inf).amax() if sel.numel() else neg_inf
        if entropy is not None:
            m[f"{key}/entropy"] = _masked_mean(entropy.to(ratio.dtype), sel)
    if tis is not None:
        m["on/tis_weight_mean"] = _masked_mean(tis[0], on_tok)
        m["on/tis_clip_frac"] = _masked_mean(tis[1].to(ratio.dtype), on_tok)
    return {k: v.detach() for k, v in m.items()}


def reduce_metrics(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Combine the metrics of several micro-batches (or ranks, after gathering): counts and ``loss`` are summed,
    ``*_max`` maxed, every other ``{on,off}/x`` is a mean weighted by that kind's ``num_tokens``."""
    if not parts:
        raise ValueError("reduce_metrics needs at least one metrics dict")
    out: dict[str, torch.Tensor] = {}
    for k in parts[0]:
        vals = [p[k] for p in parts]
        if k in ("loss", "num_sequences") or k.endswith("/num_tokens"):
            out[k] = torch.stack(vals).sum()
        elif k.endswith("_max"):
            out[k] = torch.stack(vals).amax()
        else:
            w = torch.stack([p[k.split("/")[0] + "/num_tokens"].to(vals[0].dtype) for p in parts])
            out[k] = (torch.stack(vals) * w).sum() / w.sum().clamp(min=1)
    return out
