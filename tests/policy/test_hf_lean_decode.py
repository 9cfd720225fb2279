"""The lean KV-cache decode step (hf._LeanDecoder) samples exactly what the HF-model step (GraniteModel.forward +
DynamicCache, ``lean_decode = False``) samples: same tokens for the same generator seed, same log-probs, and those
log-probs equal a separate full scoring pass. Left-padded and unpadded prompts, top-p, greedy, with and without the
checkpoint's (peft-wrapped q/v) audio LoRA."""
import pytest
import torch

from nemo_grpo.policy.hf import HFGraniteSpeechPolicy, _LeanDecoder
from nemo_grpo.policy.inputs import build_prompt_batch
from nemo_grpo.policy.tiny import make_tiny


def _batches(policy):
    g = torch.Generator().manual_seed(0)
    waves = [torch.randn(16000, generator=g) * 0.1, torch.randn(9000, generator=g) * 0.1]
    padded = build_prompt_batch(policy.tokenizer, waves, ["<|audio|> what color is the box?", "translate <|audio|>"],
                                ["a", "b"], ["u1", "u2"], policy.config)
    assert not padded.attention_mask.bool().all()  # the second prompt is left-padded
    single = build_prompt_batch(policy.tokenizer, waves[:1], ["<|audio|> what?"], ["x"], ["u"], policy.config)
    return {"left_padded": padded, "unpadded": single}


def _generate(policy, ctx, lean, temperature, top_p):
    policy.lean_decode = lean
    calls = []
    policy._hidden = lambda *a, **k: calls.append(1) or type(policy)._hidden(policy, *a, **k)
    try:
        out = policy.generate(ctx, num_samples=4, max_new_tokens=24, temperature=temperature, top_p=top_p,
                              generator=torch.Generator().manual_seed(7))
    finally:
        del policy._hidden
        policy.lean_decode = True
    return out, len(calls)


@pytest.mark.parametrize("lora", [False, True], ids=["base", "audio_lora"])
def test_lean_decode_samples_exactly_what_the_hf_model_step_samples(tmp_path, lora):
    policy = HFGraniteSpeechPolicy.from_pretrained(make_tiny(str(tmp_path / "m"), seed=0, has_lora_adapter=lora))
    assert _LeanDecoder.supports(policy._lm)
    if lora:
        assert "lora" in type(policy._lm.layers[0].self_attn.q_proj).__module__  # peft-wrapped projections
    for name, batch in _batches(policy).items():
        ctx = policy.encode(batch)
        for temperature, top_p in ((1.0, 1.0), (0.8, 0.9), (0.0, 1.0)):
            lean, lean_calls = _generate(policy, ctx, True, temperature, top_p)
            ref, ref_calls = _generate(policy, ctx, False, temperature, top_p)
            assert lean_calls == 1 and ref_calls == lean.token_ids.shape[1]  # lean: only the prefill goes via HF
            what = f"{name} T={temperature} top_p={top_p}"
            assert torch.equal(lean.token_ids, ref.token_ids), what
            assert torch.equal(lean.mask, ref.mask), what
            assert not (lean.logprobs.is_inference() or lean.token_ids.is_inference())  # usable in training
            assert (lean.logprobs - ref.logprobs).abs().max() < 1e-6, what
            with torch.no_grad():
                scored, _ = policy.score(ctx, lean.token_ids, lean.group, temperature=temperature or 1.0)
            assert (scored - lean.logprobs)[lean.mask].abs().max() < 2e-6, what


def test_comparison_catches_a_decode_position_off_by_one(tmp_path, monkeypatch):
    """Negative control: lean decode steps whose RoPE positions are shifted by one (the classic left-padding bug)
    no longer match the HF-model step, so the exactness test above can fail."""
    policy = HFGraniteSpeechPolicy.from_pretrained(make_tiny(str(tmp_path / "m"), seed=0))
    ctx = policy.encode(_batches(policy)["left_padded"])
    ref, _ = _generate(policy, ctx, False, 1.0, 1.0)
    init = _LeanDecoder.__init__

    def shifted(self, *args):
        init(self, *args)
        self.cos, self.sin = self.cos.roll(1, 1), self.sin.roll(1, 1)

    monkeypatch.setattr(_LeanDecoder, "__init__", shifted)
    lean, _ = _generate(policy, ctx, True, 1.0, 1.0)
    # the random tiny model is nearly position-blind (measured 5e-5), still 50x the exactness test's 1e-6
    assert (lean.logprobs - ref.logprobs).abs().max() > 1e-5
