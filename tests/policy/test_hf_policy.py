"""HF Granite Speech policy: logits scaling vs GraniteForCausalLM, encode-once, sampling, scoring, checkpoints, LoRA."""
import pytest
import torch
from transformers import GraniteForCausalLM, GraniteSpeechForConditionalGeneration

from nemo_grpo.policy.base import Policy
from nemo_grpo.policy.hf import HFGraniteSpeechPolicy
from nemo_grpo.policy.inputs import build_prompt_batch, encode_completions
from nemo_grpo.policy.tiny import make_tiny


def _batch(policy, seed=0):
    g = torch.Generator().manual_seed(seed)
    waves = [torch.randn(16000, generator=g) * 0.1, torch.randn(9000, generator=g) * 0.1]
    return build_prompt_batch(policy.tokenizer, waves, ["<|audio|> what color is the box?", "translate <|audio|>"],
                              ["the box is red", "die Kiste ist rot"], ["u1", "u2"], policy.config)


def _reference_lm(policy):
    """GraniteForCausalLM built from the same text weights: the 4.x / text-only semantics (logits / scaling)."""
    ref = GraniteForCausalLM(policy.config.text_config).eval()
    state = {f"model.{k}": v for k, v in policy.model.model.language_model.state_dict().items()}
    state["lm_head.weight"] = policy.model.lm_head.weight
    ref.load_state_dict(state, strict=True)
    return ref


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return HFGraniteSpeechPolicy.from_pretrained(tiny_model_dir)


def _ref_logprobs(policy, ref, ctx, token_ids, group, temperature):
    with torch.no_grad():
        prompt = policy.model.model.get_merged_audio_embeddings(
            ctx.batch.input_ids, policy.model.model.projector(ctx.audio), ctx.batch.input_features_mask)[group]
        embeds = torch.cat([prompt, policy.model.model.language_model.embed_tokens(token_ids)], 1)
        mask = torch.cat([ctx.batch.attention_mask[group], torch.ones_like(token_ids)], 1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = ref(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits
        p = prompt.shape[1]
        logp = torch.log_softmax(logits[:, p - 1:-1] / temperature, -1)
        return logp.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)


def test_is_a_policy(policy):
    assert isinstance(policy, Policy)
    assert policy.pad_token_id != policy.eos_token_id
    assert policy.logits_scaling == 4.0


def test_logits_scaling_matches_granite_causal_lm_and_negative_control(policy):
    ref = _reference_lm(policy)
    # text only: the HF 5.x speech forward is off by exactly logits_scaling; GraniteForCausalLM is the reference
    ids = policy.tokenizer("the red box is on the left", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        unfixed = policy.model(input_ids=ids).logits
    assert torch.allclose(unfixed / policy.logits_scaling, want, atol=1e-5)
    assert (torch.log_softmax(unfixed, -1) - torch.log_softmax(want, -1)).abs().max() > 1e-2
    # with audio, through the policy's score(): equal at T=1 and T=0.7
    ctx = policy.encode(_batch(policy))
    tokens, _, _ = encode_completions(policy.tokenizer, ["the box is red", "rot", "die Kiste", "blue"])
    group = torch.tensor([0, 0, 1, 1])
    for temp in (1.0, 0.7):
        with torch.no_grad():
            got, _ = policy.score(ctx, tokens, group, temperature=temp)
        assert (got - _ref_logprobs(policy, ref, ctx, tokens, group, temp)).abs().max() < 1e-5
    # negative control: the same score() without the division (5.x behaviour) disagrees with the reference
    saved = policy.logits_scaling
    try:
        policy.logits_scaling = 1.0
        with torch.no_grad():
            bad, _ = policy.score(ctx, tokens, group)
    finally:
        policy.logits_scaling = saved
    assert (bad - _ref_logprobs(policy, ref, ctx, tokens, group, 1.0)).abs().max() > 1e-2


def test_audio_encoded_once_per_prompt(policy):
    calls = {"encoder": [], "projector": []}
    hooks = [policy.model.model.encoder.register_forward_hook(lambda m, i, o: calls["encoder"].append(i[0].shape[0])),
             policy.model.model.projector.register_forward_hook(
                 lambda m, i, o: calls["projector"].append(i[0].shape[0]))]
    try:
        ctx = policy.encode(_batch(policy))
        comp = policy.generate(ctx, num_samples=4, max_new_tokens=6, generator=torch.Generator().manual_seed(0))
        for _ in range(3):  # e.g. old, reference and current policy passes
            policy.score(ctx, comp.token_ids, comp.group)
    finally:
        for h in hooks:
            h.remove()
    assert calls["encoder"] == [2]  # one call, B = 2 prompts (not N = 8)
    assert calls["projector"] == [2, 2, 2, 2]  # once per forward (1 generate + 3 scores), batch B


def _sft(policy, ctx, texts, steps, lr=3e-2):
    tokens, mask, _ = encode_completions(policy.tokenizer, texts)
    group = torch.arange(len(texts))
    policy.train()
    losses = []
    for _ in range(steps):
        logp, _ = policy.score(ctx, tokens, group)
        loss = -(logp * mask).sum() / mask.sum()
        loss.backward()
        policy.optimizer_step(lr)
        losses.append(float(loss.detach()))
    policy.eval()
    return losses


def test_sampling_eos_padding_and_logprobs_equal_scoring(tiny_model_dir):
    policy = HFGraniteSpeechPolicy.from_pretrained(tiny_model_dir)
    ctx = policy.encode(_batch(policy))
    policy.configure_optimizer(lr=3e-2, weight_decay=0.0, betas=(0.9, 0.99), eps=1e-8, max_grad_norm=1.0)
    losses = _sft(policy, ctx, ["ja", "nein"], steps=15)  # teach short answers so samples stop at eos
    assert losses[-1] < losses[0] * 0.5
    comp = policy.generate(ctx, num_samples=6, max_new_tokens=12, temperature=1.0, top_p=0.95,
                           generator=torch.Generator().manual_seed(1))
    n, t = comp.token_ids.shape
    assert n == 12 and comp.group.tolist() == [0] * 6 + [1] * 6
    stopped = ~comp.truncated
    assert stopped.sum() >= 6  # most samples learned to stop
    for i in range(n):
        length = int(comp.mask[i].sum())
        assert comp.mask[i, :length].all() and not comp.mask[i, length:].any()  # a prefix
        if stopped[i]:
            assert comp.token_ids[i, length - 1] == policy.eos_token_id
            assert (comp.token_ids[i, :length - 1] != policy.eos_token_id).all()
            assert (comp.token_ids[i, length:] == policy.pad_token_id).all()
            assert (comp.logprobs[i, length:] == 0).all()
        else:
            assert length == t and (comp.token_ids[i] != policy.eos_token_id).all()
    # the same sampling-time log-probs from a separate full (no-cache) scoring pass, fp32
    for temp in (1.0, 0.8):
        comp = policy.generate(ctx, 6, 12, temperature=temp, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            logp, ent = policy.score(ctx, comp.token_ids, comp.group, temperature=temp, return_entropy=True)
        assert (logp - comp.logprobs)[comp.mask].abs().max() < 1e-5
        assert ent.shape == logp.shape and (ent >= 0).all()
    # seeded: same generator seed, same samples
    a = policy.generate(ctx, 3, 8, generator=torch.Generator().manual_seed(5))
    b = policy.generate(ctx, 3, 8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.token_ids, b.token_ids)


def test_save_load_round_trip_and_optimizer_state(tiny_model_dir, tmp_path):
    policy = HFGraniteSpeechPolicy.from_pretrained(tiny_model_dir)
    batch = _batch(policy)
    ctx = policy.encode(batch)
    policy.configure_optimizer(lr=1e-2, weight_decay=0.01, betas=(0.9, 0.99), eps=1e-8, max_grad_norm=1.0)
    _sft(policy, ctx, ["ja", "nein"], steps=3)
    tokens, _, _ = encode_completions(policy.tokenizer, ["die rote Kiste", "ja"])
    group = torch.tensor([0, 1])
    with torch.no_grad():
        want, _ = policy.score(ctx, tokens, group)
    policy.save_pretrained(str(tmp_path / "hf"))
    assert GraniteSpeechForConditionalGeneration.from_pretrained(str(tmp_path / "hf")) is not None
    reloaded = HFGraniteSpeechPolicy.from_pretrained(str(tmp_path / "hf"))
    with torch.no_grad():
        got, _ = reloaded.score(reloaded.encode(batch), tokens, group)
    assert torch.equal(got, want)
    # checkpoint: a fresh policy + load_checkpoint continues exactly like the original
    policy.save_checkpoint(str(tmp_path / "ckpt"))
    fresh = HFGraniteSpeechPolicy.from_pretrained(tiny_model_dir)
    fresh.load_checkpoint(str(tmp_path / "ckpt"))
    fresh.configure_optimizer(lr=1e-2, weight_decay=0.01, betas=(0.9, 0.99), eps=1e-8, max_grad_norm=1.0)
    _sft(policy, ctx, ["ja", "nein"], steps=1)
    _sft(fresh, fresh.encode(batch), ["ja", "nein"], steps=1)
    for (name, a), b in zip(policy.state_dict().items(), fresh.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-7), name
    # a policy without the optimizer state diverges (the check above is not vacuous)
    blank = HFGraniteSpeechPolicy.from_pretrained(str(tmp_path / "ckpt"))
    blank.configure_optimizer(lr=1e-2, weight_decay=0.01, betas=(0.9, 0.99), eps=1e-8, max_grad_norm=1.0)
    _sft(blank, blank.encode(batch), ["ja", "nein"], steps=1)
    assert not torch.allclose(blank.model.lm_head.weight, policy.model.lm_head.weight, atol=1e-7)


def test_frozen_encoder_stays_in_eval(policy):
    policy.train()
    assert not policy.model.model.encoder.training and policy.model.model.projector.training
    assert not any(p.requires_grad for p in policy.model.model.encoder.parameters())
    policy.eval()


def test_audio_lora_on_with_audio_matches_hf_generate(tmp_path):
    out = make_tiny(str(tmp_path / "lora"), seed=0, has_lora_adapter=True)
    policy = HFGraniteSpeechPolicy.from_pretrained(out)
    hf = GraniteSpeechForConditionalGeneration.from_pretrained(out).eval()
    batch = _batch(policy)
    one = build_prompt_batch(policy.tokenizer, [torch.randn(16000) * 0.1], ["<|audio|> what?"], ["x"], ["u"],
                             policy.config)
    # greedy is invariant to logits scaling, so HF generate (which turns the adapter on for audio) is a reference
    comp = policy.generate(policy.encode(one), num_samples=1, max_new_tokens=8, temperature=0.0)
    with torch.no_grad():
        want = hf.generate(input_ids=one.input_ids, attention_mask=one.attention_mask,
                           input_features=one.input_features, input_features_mask=one.input_features_mask,
                           do_sample=False, max_new_tokens=8, eos_token_id=policy.eos_token_id,
                           pad_token_id=policy.pad_token_id)[:, one.input_ids.shape[1]:]
    assert torch.equal(comp.token_ids[:, : want.shape[1]], want)
    # and the scores are those of HF's own forward with the adapter ON (and not of the adapter-off model)
    ctx = policy.encode(batch)
    tokens, _, _ = encode_completions(policy.tokenizer, ["die rote Kiste", "ja"])
    group = torch.tensor([0, 1])
    with torch.no_grad():
        got, _ = policy.score(ctx, tokens, group)
        hf.enable_adapters()
        on = _hf_forward_logprobs(hf, batch, tokens, group)
        hf.disable_adapters()
        off = _hf_forward_logprobs(hf, batch, tokens, group)
    assert (got - on).abs().max() < 1e-5
    assert (got - off).abs().max() > 1e-3


def _hf_forward_logprobs(hf, batch, tokens, group):
    """HF's full forward on prompt+completion rows, with the 4.x logits division applied by hand."""
    ids = torch.cat([batch.input_ids[group], tokens], 1)
    mask = torch.cat([batch.attention_mask[group], torch.ones_like(tokens)], 1)
    logits = hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                input_features=batch.input_features[group], input_features_mask=batch.input_features_mask[group]
                ).logits / hf.config.text_config.logits_scaling
    p = batch.input_ids.shape[1]
    return torch.log_softmax(logits[:, p - 1:-1], -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def test_lora_training_and_round_trip(tiny_model_dir, tmp_path):
    policy = HFGraniteSpeechPolicy.from_pretrained(tiny_model_dir, train_llm=False, train_projector=False,
                                                   lora={"r": 4, "lora_alpha": 8})
    names = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    batch = _batch(policy)
    ctx = policy.encode(batch)
    policy.configure_optimizer(lr=1e-2, weight_decay=0.0, betas=(0.9, 0.99), eps=1e-8, max_grad_norm=1.0)
    _sft(policy, ctx, ["ja", "nein"], steps=3)
    tokens, _, _ = encode_completions(policy.tokenizer, ["ja", "nein"])
    group = torch.tensor([0, 1])
    with torch.no_grad():
        want, _ = policy.score(ctx, tokens, group)
    policy.save_pretrained(str(tmp_path / "hf"))
    reloaded = HFGraniteSpeechPolicy.from_pretrained(str(tmp_path / "hf"))
    assert reloaded.model._hf_peft_config_loaded
    with torch.no_grad():
        got, _ = reloaded.score(reloaded.encode(batch), tokens, group)
    assert (got - want).abs().max() < 1e-6


def test_pad_equal_to_eos_gets_a_distinct_pad(tiny_model_dir, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    d = str(tmp_path / "eospad")
    shutil.copytree(tiny_model_dir, d)
    tok = AutoTokenizer.from_pretrained(d)
    tok.pad_token = tok.eos_token  # what Granite's real tokenizer does
    tok.save_pretrained(d)
    assert AutoTokenizer.from_pretrained(d).pad_token_id == tok.eos_token_id
    policy = HFGraniteSpeechPolicy.from_pretrained(d)
    rows = policy.model.get_input_embeddings().num_embeddings
    assert policy.pad_token_id != policy.eos_token_id
    assert policy.pad_token_id < rows
    # the export keeps the checkpoint's tokenizer (pad == eos) and its vocabulary size
    policy.save_pretrained(str(tmp_path / "export"))
    exported = AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    assert exported.pad_token_id == exported.eos_token_id and len(exported) == len(tok)
    assert HFGraniteSpeechPolicy.from_pretrained(str(tmp_path / "export")).model.get_input_embeddings(
    ).num_embeddings == rows