"""Prompt batching (processor semantics) and the offline tiny checkpoint / make-tiny CLI."""
import json
import os

import pytest
import torch
from transformers import AutoTokenizer, GraniteSpeechForConditionalGeneration

from nemo_grpo.policy.features import num_audio_tokens
from nemo_grpo.policy.inputs import build_prompt_batch, encode_completions


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return GraniteSpeechForConditionalGeneration.from_pretrained(tiny_model_dir).eval()


def test_tiny_tokenizer_specials(tok, model):
    assert tok.eos_token == "<|end_of_text|>" and tok.pad_token == "<|pad|>"
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.convert_tokens_to_ids("<|audio|>") == model.config.audio_token_index
    for s in ["Die Straße ist schön, Grüße aus Köln", "the red box is on the left"]:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == s
    text = tok.apply_chat_template([{"role": "user", "content": "<|audio|> hi"}], add_generation_prompt=True,
                                   tokenize=False)
    assert text == "<|start_of_role|>user<|end_of_role|><|audio|> hi<|end_of_text|>\n" \
                   "<|start_of_role|>assistant<|end_of_role|>"
    c = model.config.text_config
    assert (c.logits_scaling, c.embedding_multiplier, c.residual_multiplier) != (1.0, 1.0, 1.0)
    assert 3e5 < sum(p.numel() for p in model.parameters()) < 6e5


def test_build_prompt_batch_processor_semantics(tok, model):
    waves = [torch.randn(16000) * 0.1, torch.randn(7000) * 0.1]
    batch = build_prompt_batch(tok, waves, ["<|audio|> what color?", "translate <|audio|>"], ["red", "rot"],
                               ["u1", "u2"], model.config, system_prompt="be brief")
    a_id = model.config.audio_token_index
    sizes = [num_audio_tokens(16000, model.config), num_audio_tokens(7000, model.config)]
    assert (batch.input_ids == a_id).sum(1).tolist() == sizes == batch.input_features_mask.sum(1).tolist()
    assert batch.input_features_mask.shape == (2, max(sizes))
    # left padding: row 1 (shorter audio) starts with pad, and the mask marks exactly the non-pad prefix
    assert batch.attention_mask[1, 0] == 0 and batch.input_ids[1, 0] == tok.pad_token_id
    assert torch.equal(batch.attention_mask.bool(), batch.input_ids != tok.pad_token_id)
    # each row, unpadded, is the chat template with the placeholder expanded by the processor's count
    for b, (msg, n) in enumerate(zip(["<|audio|> what color?", "translate <|audio|>"], sizes)):
        text = tok.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": msg}],
                                       add_generation_prompt=True, tokenize=False).replace("<|audio|>", "<|audio|>" * n)
        row = batch.input_ids[b][batch.attention_mask[b].bool()].tolist()
        assert row == tok(text, add_special_tokens=False)["input_ids"]
    # the HF model accepts it (its placeholder/feature count check) and the padding row is harmless
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                input_features=batch.input_features, input_features_mask=batch.input_features_mask)
    assert torch.isfinite(out.logits).all()


def test_build_prompt_batch_errors_name_the_item(tok, model):
    with pytest.raises(ValueError, match="long_one"):
        build_prompt_batch(tok, [torch.randn(16000 * 30)], ["<|audio|>"], ["x"], ["long_one"], model.config,
                           max_prompt_tokens=64)
    with pytest.raises(ValueError, match="no_placeholder"):
        build_prompt_batch(tok, [torch.randn(16000)], ["what?"], ["x"], ["no_placeholder"], model.config)


def test_encode_completions(tok):
    ids, mask, cut = encode_completions(tok, ["die rote Kiste", "ja"])
    assert ids.shape == mask.shape and mask.dtype == torch.bool and cut.tolist() == [False, False]
    for i, text in enumerate(["die rote Kiste", "ja"]):
        n = int(mask[i].sum())
        assert ids[i, n - 1] == tok.eos_token_id
        assert (ids[i, n:] == tok.pad_token_id).all()
        assert tok.decode(ids[i, : n - 1]) == text
    # a text that does not fit with its eos is cut WITHOUT eos (like a sampled completion at the length limit)
    full = tok("die rote Kiste ist links", add_special_tokens=False)["input_ids"]
    assert len(full) > 3
    ids, mask, cut = encode_completions(tok, ["die rote Kiste ist links", "ja"], max_tokens=3)
    assert ids.shape == (2, 3) and cut.tolist() == [True, False] and mask[0].all()
    assert ids[0].tolist() == full[:3] and tok.eos_token_id not in ids[0].tolist()
    assert ids[1, int(mask[1].sum()) - 1] == tok.eos_token_id
    # exactly fitting (text + eos == max_tokens) is not a cut
    ids, mask, cut = encode_completions(tok, ["die rote Kiste ist links"], max_tokens=len(full) + 1)
    assert not cut[0] and ids[0, -1] == tok.eos_token_id


def test_make_tiny_cli(tmp_path):
    from nemo_grpo.cli import main

    out = str(tmp_path / "t")
    assert main(["make-tiny", out, "--seed", "3", "--hidden", "32", "--logits-scaling", "2.0"]) == 0
    m = GraniteSpeechForConditionalGeneration.from_pretrained(out)
    assert m.config.text_config.hidden_size == 32 and m.config.text_config.logits_scaling == 2.0
    assert json.load(open(os.path.join(out, "tiny_info.json")))["seed"] == 3
    with pytest.raises(ValueError, match="bogus"):
        from nemo_grpo.policy.tiny import make_tiny
        make_tiny(str(tmp_path / "u"), bogus=1)
