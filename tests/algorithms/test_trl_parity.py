"""Parity with TRL 1.16's GRPOTrainer, driven through TRL's OWN code paths (no re-typed formula):

* advantages: ``GRPOTrainer._generate_and_score_completions`` samples completions with a tiny GraniteForCausalLM,
  scores them with our reward function (which records the rewards) and normalises them itself;
  ``group_advantages`` must reproduce its advantages from the recorded rewards.
* loss: ``GRPOTrainer.compute_loss`` on TRL's completions with prepared old/ref log-probs (ratios far enough from 1
  that both clip sides are active, eps_high != eps, beta > 0, one empty completion) for loss_type "dapo" and
  "grpo"; ``grpo_loss`` on log-probs from the plain HF forward of the same model must match loss, every parameter
  gradient, and TRL's logged KL / clip fractions / entropy.

The model is float64 so the comparison is limited by the algorithms, not by float32 rounding.
"""
from __future__ import annotations

import pytest
import torch

from nemo_grpo.algorithms import LossConfig, group_advantages, grpo_loss, loss_normalizer

trl = pytest.importorskip("trl")

G = 4
PROMPTS = ["the red box", "one two", "left of the", "five four three"]
EPS, EPS_HIGH, BETA = 0.2, 0.28, 0.04


def _tiny_dir(tmp_path_factory) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GraniteConfig, GraniteForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|end_of_text|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["the red box is on the left of the blue one", "one two three four five"] * 10, trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end_of_text|>", pad_token="<pad>")
    # Granite's multipliers set away from 1 so a path that drops one (e.g. logits_scaling) would show.
    cfg = GraniteConfig(
        vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, embedding_multiplier=12.0, residual_multiplier=0.22,
        attention_multiplier=0.25, logits_scaling=2.0, tie_word_embeddings=True,
        eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id, bos_token_id=hf_tok.eos_token_id,
    )
    torch.manual_seed(0)
    out = str(tmp_path_factory.mktemp("tiny_granite_lm"))
    GraniteForCausalLM(cfg).to(torch.float64).save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out


class _RecordingReward:
    """Reward = a deterministic function of the completion text; prompt 'one two' always gets 1.0 so that one
    group has zero variance. Records what it returned, in TRL's order."""

    __name__ = "recording_reward"

    def __init__(self):
        self.calls: list[list[float]] = []

    def __call__(self, prompts, completions, **kwargs):
        r = [1.0 if p == "one two" else float(len(c) % 5) / 4.0 for p, c in zip(prompts, completions)]
        self.calls.append(r)
        return r


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return _tiny_dir(tmp_path_factory)


def _trainer(tiny_dir, tmp_path_factory, loss_type, reward, kl_correction=False, scale_rewards="group", **extra):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=str(tmp_path_factory.mktemp(f"trl_{loss_type}")), use_cpu=True, report_to="none",
        per_device_train_batch_size=len(PROMPTS) * G, num_generations=G, max_completion_length=8,
        beta=BETA, epsilon=EPS, epsilon_high=EPS_HIGH, loss_type=loss_type, save_strategy="no",
        model_init_kwargs={"dtype": torch.float64}, seed=0, bf16=False, fp16=False,
        use_bias_correction_kl=kl_correction, scale_rewards=scale_rewards, **extra,
    )
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ds = Dataset.from_dict({"prompt": PROMPTS})
    trainer = GRPOTrainer(model=tiny_dir, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok)
    trainer.model.train()
    # Set by HF Trainer's training loop (not run here): one micro-batch per optimizer step.
    trainer.current_gradient_accumulation_steps = 1
    return trainer


@pytest.fixture(scope="module")
def rollout(tiny_dir, tmp_path_factory):
    """One TRL rollout: its inputs dict and the rewards it was computed from."""
    reward = _RecordingReward()
    trainer = _trainer(tiny_dir, tmp_path_factory, "dapo", reward)
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS for _ in range(G)])
    assert len(reward.calls) == 1
    return out, torch.tensor(reward.calls[0], dtype=torch.float64)


def test_advantages_match_trl(rollout):
    out, rewards = rollout
    ours = group_advantages(rewards.view(len(PROMPTS), G))  # defaults = TRL's convention
    trl_adv = out["advantages"].to(torch.float64)
    assert ours.flatten().abs().max() > 0.5  # the rollout produced real signal, not an all-zero batch
    torch.testing.assert_close(ours.flatten(), trl_adv, atol=1e-6, rtol=1e-6)
    # The zero-variance group: exactly 0 by construction here; TRL's (r - mean) / 1e-4 can leave a rounding residue
    # (~1e-13) when the float mean of equal rewards is off by an ulp.
    assert torch.equal(ours[1], torch.zeros(G, dtype=ours.dtype))


def test_unscaled_advantages_match_trl_scale_rewards_none(tiny_dir, tmp_path_factory):
    """TRL's scale_rewards="none" (Dr.GRPO) == group_advantages(scale_by_std=False)."""
    reward = _RecordingReward()
    trainer = _trainer(tiny_dir, tmp_path_factory, "dapo", reward, scale_rewards="none")
    torch.manual_seed(1)
    out = trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS for _ in range(G)])
    rewards = torch.tensor(reward.calls[-1], dtype=torch.float64).view(len(PROMPTS), G)
    ours = group_advantages(rewards, scale_by_std=False)
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(ours.flatten(), out["advantages"].to(torch.float64), atol=1e-7, rtol=1e-6)


def _hf_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """log pi(completion token) [N, T] and entropy [N, T] from the plain HF forward (not TRL's fused head)."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attn = torch.cat([prompt_mask, completion_mask], dim=1)
    p_len, t_len = prompt_ids.shape[1], completion_ids.shape[1]
    logits = model(input_ids=input_ids, attention_mask=attn).logits[:, p_len - 1 : p_len + t_len - 1]
    logprobs = torch.log_softmax(logits.to(torch.float64), dim=-1)  # [N, T, V]
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logprobs.gather(-1, completion_ids[..., None]).squeeze(-1), entropy


@pytest.mark.parametrize("kl_correction", [False, True], ids=["plain_kl", "is_corrected_kl"])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_loss_and_grads_match_trl(rollout, tiny_dir, tmp_path_factory, loss_type, kl_correction):
    out, _ = rollout
    trainer = _trainer(tiny_dir, tmp_path_factory, loss_type, _RecordingReward(), kl_correction)
    model = trainer.model
    prompt_ids, prompt_mask = out["prompt_ids"], out["prompt_mask"]
    completion_ids = out["completion_ids"]
    mask = out["completion_mask"].bool().clone()
    mask[5] = False  # an empty completion (e.g. overlong-masked) must be handled identically
    n = completion_ids.shape[0]
    assert mask.sum() > n  # completions are longer than one token

    with torch.no_grad():
        cur, _ = _hf_logps(model, prompt_ids, prompt_mask, completion_ids, mask.long())
    gen = torch.Generator().manual_seed(1)
    # Ratios exp(+-0.35) reach past both clip bounds; the reference differs too so KL > 0.
    old = (cur + 0.35 * torch.randn(cur.shape, generator=gen, dtype=torch.float64)) * mask
    ref = (cur + 0.30 * torch.randn(cur.shape, generator=gen, dtype=torch.float64)) * mask
    adv = torch.randn(n, generator=gen, dtype=torch.float64)

    inputs = {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
        "completion_ids": completion_ids, "completion_mask": mask.long(),
        "old_per_token_logps": old, "ref_per_token_logps": ref, "advantages": adv,
        "num_items_in_batch": mask.sum(),
    }
    model.zero_grad()
    trl_loss = trainer.compute_loss(model, inputs)
    trl_loss.backward()
    trl_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    cfg = LossConfig(epsilon=EPS, epsilon_high=EPS_HIGH, beta=BETA, loss_type=loss_type,
                     kl_importance_correction=kl_correction)
    norm = loss_normalizer(mask, loss_type)

    # (a) Log-probs from TRL's own scorer (float32 fused LM head): isolates the loss algorithm. The loss agrees to
    # float64 rounding; gradients to ~1e-9 abs (TRL's kernel runs its backward GEMMs in float32).
    model.zero_grad()
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attn = torch.cat([prompt_mask, mask.long()], dim=1)
    logp, entropy, _ = trainer._get_per_token_logps_and_entropies(
        model, input_ids, attn, completion_ids.shape[1], compute_entropy=True
    )
    res = grpo_loss(logp, old, adv, mask, normalizer=norm, cfg=cfg, ref_logp=ref, entropy=entropy)
    res.loss.backward()
    torch.testing.assert_close(res.loss, trl_loss.detach(), atol=1e-9, rtol=1e-9)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, trl_grads[k], atol=1e-8, rtol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    assert max(g.abs().max() for g in trl_grads.values()) > 1e-3  # gradients are not trivially zero

    # (b) End to end with the plain float64 HF forward: differs only by TRL's float32 log-prob kernel (~1e-6).
    model.zero_grad()
    logp64, entropy64 = _hf_logps(model, prompt_ids, prompt_mask, completion_ids, mask.long())
    res64 = grpo_loss(logp64, old, adv, mask, normalizer=norm, cfg=cfg, ref_logp=ref, entropy=entropy64)
    res64.loss.backward()
    torch.testing.assert_close(res64.loss, trl_loss.detach(), atol=1e-6, rtol=1e-5)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, trl_grads[k], atol=1e-6, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")

    m = res.metrics
    assert m["on/clip_low"] > 0 and m["on/clip_high"] > 0  # both clip branches were exercised
    assert m["off/num_tokens"] == 0 and m["on/num_tokens"] == mask.sum()
    for ours, theirs in [("on/kl", "kl"), ("on/clip_low", "clip_ratio/low_mean"),
                         ("on/clip_high", "clip_ratio/high_mean"), ("on/entropy", "entropy")]:
        assert abs(float(m[ours]) - trl_metrics[theirs]) < 1e-6, (ours, float(m[ours]), trl_metrics[theirs])


CAP = 1.5  # truncated-IS cap: low enough that some of the perturbed sampler log-probs exceed it


def test_truncated_importance_sampling_matches_trl(tiny_dir, tmp_path_factory):
    """``grpo.tis_cap`` against TRL's own vLLM importance-sampling path (``vllm_importance_sampling_mode=
    "token_truncate"``): TRL's ``_generate_and_score_completions`` recomputes log pi_old and forms its weights from
    the sampler's log-probs, which here come from a stand-in inference engine (TRL's own sampler, its log-probs
    replaced by perturbed values, as a bf16 or vLLM sampler's differ from the trainer's). ``truncated_is_weights``
    must give TRL's weights; ``grpo_loss`` with ``tis_cap`` its loss and every gradient, KL term included (which TRL
    does not weight)."""
    from nemo_grpo.algorithms import truncated_is_weights

    trainer = _trainer(tiny_dir, tmp_path_factory, "dapo", _RecordingReward(),
                       vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=CAP)
    sample = trainer._generate_single_turn
    gen = torch.Generator().manual_seed(3)

    def engine(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        trainer.use_vllm = False  # TRL's HF sampler draws the tokens ...
        try:
            completion_ids, _ = sample(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        finally:
            trainer.use_vllm = True
        # ... and the "engine" reports log-probs near the model's (a random tiny LM is near-uniform: ~ -log V)
        logps = [(-5.7 + 0.4 * torch.randn(len(c), generator=gen, dtype=torch.float64)).tolist()
                 for c in completion_ids]
        return completion_ids, logps

    trainer._generate_single_turn = engine
    trainer.use_vllm = True  # TRL's vLLM-only branches: recompute log pi_old, importance weights, loss weighting
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS for _ in range(G)])
    mask = out["completion_mask"].bool()
    old, sampler = out["old_per_token_logps"], out["sampling_per_token_logps"]

    w, clipped = truncated_is_weights(torch.where(mask, old, 0.0), torch.where(mask, sampler, 0.0), CAP)
    torch.testing.assert_close(w, out["importance_sampling_ratio"], atol=1e-12, rtol=1e-12)
    assert 0 < clipped[mask].float().mean() < 1 and w[mask].min() < 1  # both sides of the cap exercised

    gen_adv = torch.Generator().manual_seed(4)
    adv = torch.randn(mask.shape[0], generator=gen_adv, dtype=torch.float64)
    ref = (old + 0.3 * torch.randn(old.shape, generator=gen_adv, dtype=torch.float64)) * mask
    inputs = {**out, "advantages": adv, "ref_per_token_logps": ref, "num_items_in_batch": mask.sum()}
    model = trainer.model
    model.zero_grad()
    trl_loss = trainer.compute_loss(model, inputs)
    trl_loss.backward()
    trl_grads = {k: p.grad.clone() for k, p in model.named_parameters()}

    model.zero_grad()
    input_ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
    attn = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
    logp, _, _ = trainer._get_per_token_logps_and_entropies(model, input_ids, attn, out["completion_ids"].shape[1],
                                                            compute_entropy=True)
    cfg = LossConfig(epsilon=EPS, epsilon_high=EPS_HIGH, beta=BETA, loss_type="dapo", tis_cap=CAP)
    res = grpo_loss(logp, old, adv, mask, normalizer=loss_normalizer(mask, "dapo"), cfg=cfg, ref_logp=ref,
                    sampler_logp=sampler)
    res.loss.backward()
    # TRL forms its weights in float32 (its log-probs are float32), grpo_loss in float64 (the advantages' dtype): they
    # agree to float32 rounding of w (the same comparison without tis_cap agrees to 1e-12)
    torch.testing.assert_close(res.loss, trl_loss.detach(), atol=1e-8, rtol=1e-6)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, trl_grads[k], atol=1e-8, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    assert max(g.abs().max() for g in trl_grads.values()) > 1e-3
    assert float(res.metrics["on/tis_clip_frac"]) == pytest.approx(float(clipped[mask].float().mean()))
    assert float(res.metrics["on/tis_weight_mean"]) == pytest.approx(float(w[mask].mean()))
