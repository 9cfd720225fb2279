"""grpo_loss beyond TRL parity: mixed-policy (off-policy) path, gradient checks, micro-batching, NaN safety.

TRL has no mixed-policy loss, so the off-policy path is checked against (1) a scalar float64 reference written
from the paper/LUFFY definitions with ``math`` (one token at a time, no tensor code shared with the module),
(2) the analytic gradient of f(p) = p / (p + gamma), and (3) autograd-vs-finite-difference gradcheck.
"""
from __future__ import annotations

import math

import pytest
import torch

from nemo_grpo.algorithms import (
    LossConfig,
    grpo_loss,
    kl_k3,
    loss_normalizer,
    microbatch_slices,
    reduce_metrics,
    token_normalizer,
)

D = torch.float64
EPS, EPS_HIGH = 0.2, 0.28


def _batch(n=6, t=5, off_rows=(2,), seed=0, empty_rows=(4,)):
    """logp/old/ref [n, t] float64 with log-ratios kept away from the clip kinks (so finite differences are valid)."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(n, t, generator=g, dtype=D) * 3 - 0.05
    choices = torch.tensor([-0.5, -0.1, 0.05, 0.15, 0.5], dtype=D)
    d = choices[torch.randint(0, len(choices), (n, t), generator=g)]
    logp = (old + d).clamp(max=-1e-3)
    ref = logp + 0.3 * torch.randn(n, t, generator=g, dtype=D)
    mask = torch.rand(n, t, generator=g) > 0.25
    mask[:, 0] = True
    for r in empty_rows:
        mask[r] = False
    adv = torch.randn(n, generator=g, dtype=D)
    off = torch.zeros(n, dtype=torch.bool)
    off[list(off_rows)] = True
    # Off-policy rows: old_logp is ignored (Completions stores 0 there); a non-zero filler shows it is unused.
    old = torch.where(off[:, None], torch.full_like(old, -0.7), old)
    return logp, old, ref, mask, adv, off


def _reference_loss(logp, old, ref, mask, adv, off, cfg: LossConfig, sampler=None) -> float:
    """Scalar float64 reference from the paper's Eqs. 2-4 and LUFFY's f(p) = p / (p + gamma); with ``cfg.tis_cap``
    the on-policy policy-gradient term times min(exp(old - sampler), cap) (TRL's token_truncate IS)."""
    n, t = logp.shape
    total, seq_terms = 0.0, []
    for i in range(n):
        a, acc, cnt = float(adv[i]), 0.0, 0
        for j in range(t):
            if not bool(mask[i, j]):
                continue
            lp = float(logp[i, j])
            if bool(off[i]):
                p = math.exp(lp)
                s = p if cfg.off_policy_shaping_gamma is None else p / (p + cfg.off_policy_shaping_gamma)
                lterm = min(s * a, min(max(s, 1 - cfg.epsilon), 1 + cfg.epsilon_high) * a) if cfg.clip_off_policy \
                    else s * a
                w = 1.0
            else:
                s = math.exp(lp - float(old[i, j]))
                lterm = min(s * a, min(max(s, 1 - cfg.epsilon), 1 + cfg.epsilon_high) * a)
                w = s if cfg.kl_importance_correction else 1.0
                if cfg.tis_cap is not None:
                    lterm *= min(math.exp(float(old[i, j]) - float(sampler[i, j])), cfg.tis_cap)
            dlt = float(ref[i, j]) - lp
            k3 = math.exp(dlt) - dlt - 1
            acc += -(lterm - cfg.beta * w * k3)
            cnt += 1
        total += acc
        seq_terms.append(acc / max(cnt, 1))
    if cfg.loss_type == "dapo":
        return total / max(int(mask.sum()), 1)
    return sum(seq_terms) / n


CONFIGS = [
    LossConfig(epsilon=EPS, epsilon_high=EPS_HIGH, beta=0.04),
    LossConfig(epsilon=EPS, epsilon_high=EPS_HIGH, beta=0.04, loss_type="grpo"),
    LossConfig(epsilon=EPS, epsilon_high=EPS_HIGH, beta=0.02, off_policy_shaping_gamma=0.1),
    LossConfig(beta=0.02, off_policy_shaping_gamma=0.1, clip_off_policy=True, loss_type="grpo"),
    LossConfig(beta=0.02, kl_importance_correction=True, off_policy_shaping_gamma=0.5),
    LossConfig(beta=0.0),
]
IDS = ["dapo", "grpo", "dapo-shaped", "grpo-shaped-clipoff", "kl-is-shaped", "beta0"]


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_matches_scalar_reference(cfg):
    logp, old, ref, mask, adv, off = _batch(off_rows=(1, 3))
    out = grpo_loss(logp, old, adv, mask, normalizer=loss_normalizer(mask, cfg.loss_type), cfg=cfg,
                    ref_logp=ref, off_policy=off)
    want = _reference_loss(logp, old, ref, mask, adv, off, cfg)
    assert abs(out.loss.item() - want) < 1e-12, (out.loss.item(), want)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_gradcheck_on_and_off_policy(cfg):
    logp, old, ref, mask, adv, off = _batch(n=4, t=4, off_rows=(1,), empty_rows=())
    norm = loss_normalizer(mask, cfg.loss_type)

    def f(lp):
        return grpo_loss(lp, old, adv, mask, normalizer=norm, cfg=cfg, ref_logp=ref, off_policy=off).loss

    assert torch.autograd.gradcheck(f, (logp.clone().requires_grad_(),), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_off_policy_gradient_is_shaped_policy_gradient():
    """d loss / d logp at an off-policy token = -A * f'(p) * p / |G| with f(p) = p/(p+gamma): gamma*p/(p+gamma)^2."""
    logp, old, ref, mask, adv, off = _batch(off_rows=(0, 2))
    for gamma in (None, 0.1):
        lp = logp.clone().requires_grad_()
        cfg = LossConfig(beta=0.0, off_policy_shaping_gamma=gamma)
        grpo_loss(lp, old, adv, mask, normalizer=token_normalizer(mask), cfg=cfg, off_policy=off).loss.backward()
        p = logp.exp()
        w = p if gamma is None else gamma * p / (p + gamma) ** 2
        want = torch.where(mask, -adv[:, None] * w / mask.sum(), 0.0)
        torch.testing.assert_close(lp.grad[off], want[off], rtol=1e-12, atol=1e-15)
        assert (lp.grad[off[:, None] & mask].abs() > 0).all()


def test_first_update_is_plain_policy_gradient():
    """mu = 1 (or the first of mu updates): logp == old_logp -> ratio 1, nothing clipped, grad = -A * grad(logp)."""
    logp, _, _, mask, adv, _ = _batch(off_rows=())
    for loss_type in ("dapo", "grpo"):
        lp = logp.clone().requires_grad_()
        cfg = LossConfig(beta=0.0, loss_type=loss_type)
        out = grpo_loss(lp, logp.clone(), adv, mask, normalizer=loss_normalizer(mask, loss_type), cfg=cfg)
        out.loss.backward()
        if loss_type == "dapo":
            want = -adv[:, None] * mask / mask.sum()
        else:
            want = -adv[:, None] * mask / mask.sum(1, keepdim=True).clamp(min=1) / mask.shape[0]
        torch.testing.assert_close(lp.grad, want.to(D), rtol=1e-12, atol=1e-15)
        assert out.metrics["on/ratio_mean"] == 1.0 and out.metrics["on/ratio_max"] == 1.0
        assert out.metrics["on/clip_low"] == 0 and out.metrics["on/clip_high"] == 0


def test_clipping_zeroes_gradient_only_on_the_clipped_side():
    # one token per row: (log ratio, advantage)
    cases = [(math.log(1.5), 1.0), (math.log(1.5), -1.0), (math.log(0.7), -1.0), (math.log(0.7), 1.0),
             (math.log(1.25), 1.0)]
    old = torch.full((len(cases), 1), -1.0, dtype=D)
    lp0 = old + torch.tensor([[c[0]] for c in cases], dtype=D)
    adv = torch.tensor([c[1] for c in cases], dtype=D)
    mask = torch.ones(len(cases), 1, dtype=torch.bool)
    for eps_high, zero in ((0.28, [True, False, True, False, False]), (0.2, [True, False, True, False, True])):
        lp = lp0.clone().requires_grad_()
        out = grpo_loss(lp, old, adv, mask, normalizer=5, cfg=LossConfig(beta=0.0, epsilon_high=eps_high))
        out.loss.backward()
        assert (lp.grad[:, 0] == 0).tolist() == zero, eps_high
        assert out.metrics["on/clip_low"].item() == pytest.approx(1 / 5)
        assert out.metrics["on/clip_high"].item() == pytest.approx((1 + (eps_high == 0.2)) / 5)


def test_off_policy_is_not_clipped_unless_asked():
    lp0 = torch.tensor([[math.log(0.5)]], dtype=D)  # pi_theta 0.5 < 1 - eps: would be clipped with A < 0
    adv, mask, off = torch.tensor([-1.0], dtype=D), torch.ones(1, 1, dtype=torch.bool), torch.tensor([True])
    for clip, zero in ((False, False), (True, True)):
        lp = lp0.clone().requires_grad_()
        cfg = LossConfig(beta=0.0, clip_off_policy=clip)
        out = grpo_loss(lp, torch.zeros_like(lp0), adv, mask, normalizer=1, cfg=cfg, off_policy=off)
        out.loss.backward()
        assert bool(lp.grad[0, 0] == 0) == zero
        assert out.metrics["off/clip_low"].item() == (1.0 if clip else 0.0)
        assert out.metrics["off/num_tokens"] == 1 and out.metrics["on/num_tokens"] == 0


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_microbatches_give_the_full_batch_gradient(loss_type):
    logp, old, ref, mask, adv, off = _batch(n=10, t=7, off_rows=(3, 7), empty_rows=(5,))
    cfg = LossConfig(beta=0.04, epsilon_high=EPS_HIGH, loss_type=loss_type, off_policy_shaping_gamma=0.1)
    full_lp = logp.clone().requires_grad_()
    norm = loss_normalizer(mask, loss_type)
    full = grpo_loss(full_lp, old, adv, mask, normalizer=norm, cfg=cfg, ref_logp=ref, off_policy=off,
                     entropy=-logp)
    full.loss.backward()
    for mbs in (1, 3, 4):
        lp = logp.clone().requires_grad_()
        slices = microbatch_slices(logp.shape[0], mbs)
        # the global normaliser is the sum of the micro-batches' local ones (an all-reduce under DP)
        g_norm = sum(loss_normalizer(mask[s], loss_type) for s in slices)
        assert g_norm == norm
        parts, total = [], 0.0
        for s in slices:
            o = grpo_loss(lp[s], old[s], adv[s], mask[s], normalizer=g_norm, cfg=cfg, ref_logp=ref[s],
                          off_policy=off[s], entropy=-logp[s])
            o.loss.backward()
            total = total + o.loss.detach()
            parts.append(o.metrics)
        torch.testing.assert_close(total, full.loss.detach(), rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(lp.grad, full_lp.grad, rtol=1e-12, atol=1e-15)
        red = reduce_metrics(parts)
        for k, v in full.metrics.items():
            torch.testing.assert_close(red[k].to(D), v.to(D), rtol=1e-12, atol=1e-12, msg=lambda m, k=k: f"{k}: {m}")


def test_empty_completions_and_garbage_padding_give_no_nan():
    logp, old, ref, mask, _, off = _batch(off_rows=(2,), empty_rows=(0, 4))
    adv = torch.zeros(logp.shape[0], dtype=D)  # a zero-variance group everywhere
    adv[3] = 1.0
    # what padding may hold: -inf, +inf, NaN log-probs
    junk = torch.tensor([float("-inf"), float("nan"), float("inf")], dtype=D)
    bad = torch.where(mask, logp, junk[torch.arange(logp.numel()).view_as(logp) % 3])
    bad_old = torch.where(mask, old, junk[(torch.arange(logp.numel()).view_as(logp) + 1) % 3])
    bad_ref = torch.where(mask, ref, float("nan"))
    for loss_type in ("dapo", "grpo"):
        lp = bad.clone().requires_grad_()
        cfg = LossConfig(loss_type=loss_type, off_policy_shaping_gamma=0.1, kl_importance_correction=True)
        out = grpo_loss(lp, bad_old, adv, mask, normalizer=loss_normalizer(mask, loss_type), cfg=cfg,
                        ref_logp=bad_ref, off_policy=off, entropy=torch.where(mask, 1.0, float("nan")))
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(lp.grad).all()
        assert (lp.grad[~mask] == 0).all() and (lp.grad[3][mask[3]] != 0).all()
        assert all(torch.isfinite(v) for k, v in out.metrics.items() if not k.endswith("ratio_max"))


def test_all_empty_batch_is_zero_not_nan():
    logp = torch.randn(3, 4, dtype=D, requires_grad=True)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    out = grpo_loss(logp, logp.detach(), torch.randn(3, dtype=D), mask, normalizer=token_normalizer(mask),
                    cfg=LossConfig(), ref_logp=logp.detach())
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.equal(logp.grad, torch.zeros_like(logp))
    assert out.metrics["on/num_tokens"] == 0 and out.metrics["on/ratio_max"] == float("-inf")


def test_k3_is_an_unbiased_kl_estimator():
    """E_{x ~ pi}[k3(x)] = KL(pi || ref) exactly, for categorical distributions (independent of TRL)."""
    g = torch.Generator().manual_seed(3)
    logpi = torch.log_softmax(torch.randn(50, generator=g, dtype=D), 0)
    logref = torch.log_softmax(torch.randn(50, generator=g, dtype=D), 0)
    k = kl_k3(logpi, logref)
    assert (k >= 0).all() and kl_k3(logpi, logpi).abs().max() == 0
    exact = (logpi.exp() * (logpi - logref)).sum()
    torch.testing.assert_close((logpi.exp() * k).sum(), exact, rtol=1e-12, atol=1e-14)


def test_low_precision_inputs_are_computed_in_float32():
    logp, old, _, mask, adv, _ = _batch(off_rows=())
    out = grpo_loss(logp.to(torch.bfloat16), old.float(), adv, mask, normalizer=token_normalizer(mask),
                    cfg=LossConfig(beta=0.0))
    assert out.loss.dtype == torch.float32


def test_everything_stays_on_the_inputs_device():
    """Run on the 'meta' device: any tensor created on the CPU by default would show up (or fail) here."""
    logp, old, ref, mask, adv, off = (x.to("meta") for x in _batch())
    cfg = LossConfig(loss_type="grpo", off_policy_shaping_gamma=0.1)
    out = grpo_loss(logp, old, adv, mask, normalizer=loss_normalizer(mask, "grpo"), cfg=cfg, ref_logp=ref,
                    off_policy=off, entropy=logp)
    assert out.loss.device.type == "meta"
    assert {v.device.type for v in reduce_metrics([out.metrics, out.metrics]).values()} == {"meta"}


def _sampler(old, seed=5):
    """Sampler log-probs near ``old`` (a bf16 / inference-engine mismatch), far enough that a cap of 1.2 bites."""
    g = torch.Generator().manual_seed(seed)
    return old + 0.3 * torch.randn(old.shape, generator=g, dtype=D)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_truncated_is_matches_scalar_reference(loss_type):
    """tis_cap: only the on-policy policy-gradient term is weighted (not the KL, not off-policy rows)."""
    logp, old, ref, mask, adv, off = _batch(off_rows=(1, 3))
    sampler = _sampler(old)
    cfg = LossConfig(epsilon=EPS, epsilon_high=EPS_HIGH, beta=0.04, loss_type=loss_type, tis_cap=1.2)
    out = grpo_loss(logp, old, adv, mask, normalizer=loss_normalizer(mask, loss_type), cfg=cfg, ref_logp=ref,
                    off_policy=off, sampler_logp=sampler)
    want = _reference_loss(logp, old, ref, mask, adv, off, cfg, sampler)
    assert abs(out.loss.item() - want) < 1e-12, (out.loss.item(), want)
    plain = _reference_loss(logp, old, ref, mask, adv, off, LossConfig(epsilon=EPS, epsilon_high=EPS_HIGH, beta=0.04,
                                                                       loss_type=loss_type))
    assert abs(want - plain) > 1e-3  # the weights matter here
    on = ~off[:, None] & mask
    raw = torch.exp(old - sampler)
    assert 0 < float(out.metrics["on/tis_clip_frac"]) < 1
    assert float(out.metrics["on/tis_clip_frac"]) == pytest.approx(float((raw[on] > 1.2).double().mean()))
    assert float(out.metrics["on/tis_weight_mean"]) == pytest.approx(float(raw[on].clamp(max=1.2).mean()))
    assert "off/tis_weight_mean" not in out.metrics


def test_truncated_is_weight_is_detached():
    """The weight scales the gradient, it is not differentiated: at ratio 1 (mu = 1, recomputed log pi_old) the
    gradient is -w * A * grad(logp) / |tokens|."""
    logp, old, _, mask, adv, _ = _batch(off_rows=())
    sampler = _sampler(logp)
    lp = logp.clone().requires_grad_()
    cfg = LossConfig(beta=0.0, tis_cap=1.2)
    grpo_loss(lp, logp.clone(), adv, mask, normalizer=token_normalizer(mask), cfg=cfg,
              sampler_logp=sampler).loss.backward()
    w = torch.exp(logp - sampler).clamp(max=1.2)
    torch.testing.assert_close(lp.grad, torch.where(mask, -w * adv[:, None] / mask.sum(), 0.0), rtol=1e-12,
                               atol=1e-15)


def test_input_and_config_errors():
    logp, old, ref, mask, adv, off = _batch()
    cfg = LossConfig()
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old, adv, mask, normalizer=1, cfg=cfg)
    grpo_loss(logp, old, adv, mask, normalizer=1, cfg=LossConfig(beta=0.0))  # beta = 0: no reference needed
    with pytest.raises(ValueError, match="mask"):
        grpo_loss(logp, old, adv, mask.long(), normalizer=1, cfg=cfg, ref_logp=ref)
    with pytest.raises(ValueError, match="old_logp"):
        grpo_loss(logp, old[:, :-1], adv, mask, normalizer=1, cfg=cfg, ref_logp=ref)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logp, old, adv[:, None], mask, normalizer=1, cfg=cfg, ref_logp=ref)
    with pytest.raises(ValueError, match="off_policy"):
        grpo_loss(logp, old, adv, mask, normalizer=1, cfg=cfg, ref_logp=ref, off_policy=off.long())
    with pytest.raises(ValueError, match="sampler_logp"):
        grpo_loss(logp, old, adv, mask, normalizer=1, cfg=LossConfig(beta=0.0, tis_cap=2.0))
    with pytest.raises(ValueError, match="sampler_logp"):
        grpo_loss(logp, old, adv, mask, normalizer=1, cfg=LossConfig(beta=0.0, tis_cap=2.0), sampler_logp=old[:1])
    for key, val in (("epsilon", -0.1), ("epsilon_high", -1.0), ("beta", -0.5), ("loss_type", "bnpo"),
                     ("off_policy_shaping_gamma", 0.0), ("tis_cap", 0.0)):
        with pytest.raises(ValueError, match=key):
            LossConfig(**{key: val})
    with pytest.raises(ValueError, match="epsilon_hi"):
        LossConfig.from_dict({"epsilon_hi": 0.3})
    assert LossConfig.from_dict({"epsilon_high": 0.28}).epsilon_high == 0.28
    with pytest.raises(ValueError, match="micro_batch_size"):
        microbatch_slices(4, 0)
    assert microbatch_slices(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
