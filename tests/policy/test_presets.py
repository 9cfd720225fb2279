"""The real-shape fixture (``make-tiny --preset``) and what its properties demand of the policy: the pad policy
for a full vocabulary with pad == eos, and no dropout while sampling, scoring and training."""
from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoTokenizer

from nemo_grpo.policy import presets
from nemo_grpo.policy.tokens import disable_dropout, resolve_pad, save_tokenizer


@pytest.mark.parametrize("preset,total,llm", [("granite-speech-3.3-2b", 3.01e9, 2.53e9),
                                              ("granite-speech-3.3-8b", 8.65e9, 8.17e9)])
def test_full_depth_preset_has_the_released_parameter_counts(preset, total, llm):
    n = presets.parameter_count(preset)  # meta device: no memory
    assert abs(n["total"] - total) / total < 0.005 and abs(n["llm"] - llm) / llm < 0.005, n


def test_preset_checkpoint_has_the_released_properties(preset_2b_dir):
    with open(os.path.join(preset_2b_dir, "config.json")) as f:
        cfg = json.load(f)
    text, enc, proj = cfg["text_config"], cfg["encoder_config"], cfg["projector_config"]
    assert (text["hidden_size"], text["num_attention_heads"], text["num_key_value_heads"],
            text["intermediate_size"], text["vocab_size"]) == (2048, 32, 8, 8192, 49160)
    assert (text["attention_multiplier"], text["embedding_multiplier"], text["residual_multiplier"],
            text["logits_scaling"]) == (1 / 64, 12.0, 0.22, 8.0)
    assert text["tie_word_embeddings"] and not text["attention_bias"] and text["attention_dropout"] == 0.0
    assert (enc["hidden_dim"], enc["num_heads"], enc["dim_head"], enc["output_dim"], enc["dropout"]) == (
        1024, 8, 128, 256, 0.1)
    assert (proj["num_hidden_layers"], proj["hidden_size"], proj["num_attention_heads"], proj["intermediate_size"],
            proj["attention_probs_dropout_prob"], proj["hidden_dropout_prob"]) == (2, 1024, 16, 4096, 0.1, 0.1)
    assert cfg["has_lora_adapter"] and cfg["audio_token_index"] == 49159 and cfg["dtype"] == "bfloat16"
    with open(os.path.join(preset_2b_dir, "adapter_config.json")) as f:
        lora = json.load(f)
    assert (lora["r"], lora["lora_alpha"], sorted(lora["target_modules"])) == (64, 32, ["q_proj", "v_proj"])
    from safetensors import safe_open

    with safe_open(os.path.join(preset_2b_dir, "model.safetensors"), "pt") as f:
        emb = [k for k in f.keys() if k.endswith("embed_tokens.weight")][0]
        assert f.get_slice(emb).get_shape() == [49160, 2048] and f.get_slice(emb).get_dtype() == "BF16"
    tok = AutoTokenizer.from_pretrained(preset_2b_dir)
    assert len(tok) == 49160 and tok.convert_tokens_to_ids("<|audio|>") == 49159
    assert tok.pad_token_id == tok.eos_token_id == 0 and "<fim_pad>" in tok.get_vocab()
    for s in ["Die Straße ist schön, Grüße aus Köln", "the red box is on the left"]:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == s and len(ids) < len(s) / 2  # whole-word pieces, not bytes


def test_make_tiny_cli_preset_options(tmp_path):
    from nemo_grpo.cli import main

    with pytest.raises(ValueError, match="--preset fixes the sizes"):
        main(["make-tiny", "--preset", "granite-speech-3.3-2b", "--hidden", "64", str(tmp_path / "a")])
    with pytest.raises(ValueError, match="needs --preset"):
        main(["make-tiny", "--llm-layers", "2", str(tmp_path / "b")])
    with pytest.raises(ValueError, match="must be >= 1"):
        presets.preset_config("granite-speech-3.3-8b", llm_layers=0)


def test_pad_policy_keeps_vocabulary_eos_and_export(preset_2b_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(preset_2b_dir)
    pad = resolve_pad(tok, 49160, reserved=(49159,))
    assert pad == tok.convert_tokens_to_ids("<fim_pad>") == tok.pad_token_id != tok.eos_token_id
    assert len(tok) == 49160  # no row added: the embedding matrix and its TP split are untouched
    save_tokenizer(tok, str(tmp_path / "export"))
    exported = AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    assert exported.pad_token_id == exported.eos_token_id == 0 and len(exported) == 49160
    assert tok.pad_token_id == pad  # the in-memory pad survives the export


def test_pad_policy_spare_row_and_clear_error(preset_2b_dir):
    fim_pad = AutoTokenizer.from_pretrained(preset_2b_dir).convert_tokens_to_ids("<fim_pad>")
    tok = AutoTokenizer.from_pretrained(preset_2b_dir)
    with pytest.raises(ValueError, match="fill all 49160 embedding rows"):  # no usable special, no spare row
        resolve_pad(tok, 49160, reserved=(fim_pad,))
    assert resolve_pad(tok, 49168, reserved=(fim_pad,)) == 49160 == tok.pad_token_id  # a spare row: <|pad|> there


def _released_dropout(model: torch.nn.Module, p: float = 0.1) -> None:
    """Put the released projector dropouts back (what a policy that only zeroes nn.Dropout modules leaves on)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = p


def test_disable_dropout_reaches_the_qformer_attention_function(preset_2b_dir):
    """transformers applies the Q-Former's attention dropout from a float attribute inside the attention function:
    zeroing nn.Dropout modules alone leaves it on in training mode."""
    from transformers.models.granite_speech.modeling_granite_speech import GraniteSpeechEncoderProjector

    cfg = presets.preset_config("granite-speech-3.3-2b", llm_layers=1, encoder_layers=1)
    proj = GraniteSpeechEncoderProjector(cfg).train()
    x = torch.randn(1, 30, 1024)
    for m in proj.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    assert not torch.equal(proj(x), proj(x))  # attention dropout still active
    assert disable_dropout(proj) > 0
    assert torch.equal(proj(x), proj(x))


@pytest.fixture(scope="module")
def hf_preset(preset_2b_dir):
    from nemo_grpo.policy.hf import HFGraniteSpeechPolicy

    return HFGraniteSpeechPolicy.from_pretrained(preset_2b_dir)


def _batch(policy):
    from nemo_grpo.policy.inputs import build_prompt_batch

    g = torch.Generator().manual_seed(0)
    waves = [torch.randn(16000, generator=g) * 0.1, torch.randn(9000, generator=g) * 0.1]
    return build_prompt_batch(policy.tokenizer, waves, ["<|audio|> what is said?", "Translate <|audio|> now"],
                              ["a", "b"], ["u1", "u2"], policy.config)


def test_hf_policy_on_the_preset_samples_and_scores_alike_in_training_mode(hf_preset):
    """The GRPO step samples and scores with the policy in training mode. With the released dropouts off, the
    recorded log pi_old equals the scoring pass (first ratio 1 up to float rounding, fp32); with them on (the
    old nn.Dropout-only policy), it does not."""
    pol = hf_preset
    assert pol.pad_token_id == pol.tokenizer.convert_tokens_to_ids("<fim_pad>") and pol.eos_token_id == 0
    batch = _batch(pol)
    assert batch.input_ids[1, 0] == pol.pad_token_id  # left padding with the resolved pad
    pol.train()
    try:
        ctx = pol.encode(batch)
        comps = pol.generate(ctx, 2, 6, temperature=1.0, generator=torch.Generator().manual_seed(1))
        assert comps.mask.sum() >= 6
        logp, _ = pol.score(ctx, comps.token_ids, comps.group)
        assert (logp.detach() - comps.logprobs)[comps.mask].abs().max() < 1e-5
        _released_dropout(pol.model)
        logp, _ = pol.score(ctx, comps.token_ids, comps.group)
        assert (logp.detach() - comps.logprobs)[comps.mask].abs().max() > 1e-3
    finally:
        disable_dropout(pol.model)
        pol.eval()
