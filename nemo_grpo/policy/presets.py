"""The released Granite Speech 3.3 checkpoints' properties, as random-weight HF dirs reduced only in depth.

``nemo-grpo make-tiny --preset granite-speech-3.3-2b|granite-speech-3.3-8b [--llm-layers N] [--encoder-layers N]
OUT_DIR`` writes a checkpoint that has every property of the released ``granite-speech-3.3-{2b,8b}`` a first run
depends on, except the depth (and the trained weights):

* LLM (Granite 3.3): the released widths, heads / KV heads / head_dim, SwiGLU ffn, rope_theta 1e7, rms eps 1e-5,
  tied embeddings, no biases, the four Granite multipliers (attention 1/64 or 1/128, embedding 12, residual 0.22,
  logits_scaling 8 or 16), text attention dropout 0.0; ``num_hidden_layers`` = ``llm_layers`` (40 released).
* Tokenizer: exactly 49160 entries = ``vocab_size``: byte-level BPE ids 0..49151 (the StarCoder-style specials first:
  ``<|end_of_text|>`` = 0, ``<fim_prefix>``, ..., ``<fim_pad>`` = 4, ...), then the role tokens 49152..49158 and
  ``<|audio|>`` = 49159, the LAST embedding row. pad == eos == bos == unk == ``<|end_of_text|>``: no spare row, no
  distinct pad (what ``nemo_grpo.policy.tokens.resolve_pad`` must cope with).
* Encoder: CTC conformer, hidden 1024, 8 heads x 128, context 200, max_pos_emb 512, input 160, CTC output 256, conv
  kernel 15, dropout 0.1; ``num_layers`` = ``encoder_layers`` (16 released).
* Projector: BLIP-2 Q-Former, 2 layers, hidden 1024, 16 heads, ffn 4096, attention_probs_dropout_prob 0.1,
  hidden_dropout_prob 0.1; window 15, downsample 5.
* Audio LoRA: r 64, alpha 32 on q_proj / v_proj, saved as PEFT files beside the base weights
  (``has_lora_adapter: true``), with non-zero B so switching it on or off is observable.
* Weights stored in bfloat16, as released (``config.json`` dtype bfloat16).

At full depth the parameter counts are the released ones (tested): 2B ≈ 3.01 B (LLM 2.53 B), 8B ≈ 8.65 B
(LLM 8.17 B). Values from the published configs (recorded in the project's stack facts, Dec 2026).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

log = logging.getLogger(__name__)

# ids 0..18: the StarCoder-style specials Granite's tokenizer starts with (pad == eos == <|end_of_text|> = 0)
BASE_SPECIALS = [
    "<|end_of_text|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<filename>", "<gh_stars>",
    "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>", "<jupyter_code>",
    "<jupyter_output>", "<empty_output>", "<commit_before>", "<commit_msg>", "<commit_after>", "<reponame>",
]
BPE_SIZE = 49152  # ids 0..49151: the specials above, the byte alphabet, merges
# ids 49152..49159: the chat-role tokens Granite 3.3 adds, and <|audio|> as the very last row
ADDED_SPECIALS = ["<|start_of_role|>", "<|end_of_role|>", "<|tool_call|>", "<|start_of_cite|>", "<|end_of_cite|>",
                  "<|start_of_plugin|>", "<|end_of_plugin|>", "<|audio|>"]
VOCAB_SIZE = BPE_SIZE + len(ADDED_SPECIALS)  # 49160

_TEXT_COMMON: dict[str, Any] = dict(
    model_type="granite", vocab_size=VOCAB_SIZE, num_attention_heads=32, num_key_value_heads=8,
    max_position_embeddings=131072, rope_theta=1e7, rms_norm_eps=1e-5, tie_word_embeddings=True,
    attention_bias=False, mlp_bias=False, attention_dropout=0.0, hidden_act="silu", embedding_multiplier=12.0,
    residual_multiplier=0.22, bos_token_id=0, eos_token_id=0, pad_token_id=0, num_hidden_layers=40,
)
RELEASED: dict[str, dict[str, Any]] = {
    "granite-speech-3.3-2b": {"text": dict(hidden_size=2048, intermediate_size=8192, attention_multiplier=1 / 64,
                                           logits_scaling=8.0),
                              "parameters": 3.01e9, "llm_parameters": 2.53e9},
    "granite-speech-3.3-8b": {"text": dict(hidden_size=4096, intermediate_size=12800, attention_multiplier=1 / 128,
                                           logits_scaling=16.0),
                              "parameters": 8.65e9, "llm_parameters": 8.17e9},
}
ENCODER: dict[str, Any] = dict(input_dim=160, num_layers=16, hidden_dim=1024, feedforward_mult=4, num_heads=8,
                               dim_head=128, output_dim=256, context_size=200, max_pos_emb=512, dropout=0.1,
                               conv_kernel_size=15, conv_expansion_factor=2)
PROJECTOR: dict[str, Any] = dict(model_type="blip_2_qformer", hidden_size=1024, num_hidden_layers=2,
                                 num_attention_heads=16, intermediate_size=4096, encoder_hidden_size=1024,
                                 cross_attention_frequency=1, max_position_embeddings=2048, layer_norm_eps=1e-12,
                                 attention_probs_dropout_prob=0.1, hidden_dropout_prob=0.1)
LORA: dict[str, Any] = dict(r=64, lora_alpha=32, target_modules=["q_proj", "v_proj"])
PRESETS = tuple(RELEASED)


def preset_config(preset: str, llm_layers: int | None = None, encoder_layers: int | None = None):
    """GraniteSpeechConfig of ``preset`` with the LLM / encoder cut to the given depths (None = released depth)."""
    from transformers import GraniteSpeechConfig

    if preset not in RELEASED:
        raise ValueError(f"unknown preset {preset!r}; known: {list(PRESETS)}")
    text = {**_TEXT_COMMON, **RELEASED[preset]["text"]}
    encoder = dict(ENCODER)
    for key, value, where in (("num_hidden_layers", llm_layers, text), ("num_layers", encoder_layers, encoder)):
        if value is not None:
            if int(value) < 1:
                raise ValueError(f"--{'llm' if where is text else 'encoder'}-layers must be >= 1, got {value}")
            where[key] = int(value)
    return GraniteSpeechConfig(text_config=text, encoder_config=encoder, projector_config=dict(PROJECTOR),
                               audio_token_index=VOCAB_SIZE - 1, has_lora_adapter=True, window_size=15,
                               downsample_rate=5, tie_word_embeddings=True)


def granite_tokenizer():
    """A HF fast tokenizer with the released Granite 3.3 layout (see the module docstring).

    The merges: a small byte-level BPE trained on the project's embedded corpus (so English, German and the toy
    tasks tokenise into words), then filler merges of byte pairs, in a fixed order, up to 49152 BPE entries. The
    fillers rank after the trained merges, so they only ever join byte pairs the trained merges left apart."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from nemo_grpo.policy.tiny import CHAT_TEMPLATE, CORPUS, toy_vocabulary

    small = Tokenizer(models.BPE())
    small.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    small.train_from_iterator(CORPUS + toy_vocabulary(), trainers.BpeTrainer(
        vocab_size=2048, initial_alphabet=alphabet, show_progress=False))
    trained = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
               for m in json.loads(small.to_str())["model"]["merges"]]
    vocab = {tok: i for i, tok in enumerate(BASE_SPECIALS + alphabet)}
    merges = []
    for a, b in trained:
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    for a in alphabet:  # fillers up to the released BPE size
        for b in alphabet:
            if len(vocab) == BPE_SIZE:
                break
            if a + b not in vocab:
                vocab[a + b] = len(vocab)
                merges.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in BASE_SPECIALS + ADDED_SPECIALS])
    eot = BASE_SPECIALS[0]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eot, bos_token=eot, unk_token=eot, pad_token=eot,
        additional_special_tokens=BASE_SPECIALS[1:] + ADDED_SPECIALS, padding_side="left")
    fast.chat_template = CHAT_TEMPLATE
    if len(fast) != VOCAB_SIZE or fast.convert_tokens_to_ids("<|audio|>") != VOCAB_SIZE - 1:
        raise AssertionError(f"granite tokenizer layout broken: {len(fast)} entries")  # a bug here, not user error
    return fast


def attach_random_lora(model, rank: int, alpha: int, target_modules: list[str], seed: int,
                       b_scale: float = 0.2):
    """Attach a transformers-native LoRA adapter (what PEFT files load as) with random B instead of PEFT's zeros,
    so switching it on or off changes the outputs; returns its ``LoraConfig``."""
    from peft import LoraConfig

    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0,
                     bias="none", task_type="CAUSAL_LM")
    model.add_adapter(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * b_scale)
    return cfg


def make_preset(out_dir: str, preset: str, llm_layers: int | None = None, encoder_layers: int | None = None,
                seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> str:
    """Write the random-weight ``preset`` checkpoint (see the module docstring) into ``out_dir``; returns it.

    Deterministic in ``seed``. Peak memory ≈ 2x the fp32 model (init in fp32, cast): at 1 LLM layer and 1 encoder
    layer, 2B ≈ 0.3 B parameters, 8B ≈ 0.5 B."""
    from transformers import GraniteSpeechForConditionalGeneration

    from nemo_grpo.policy.hf import save_hf_dir

    config = preset_config(preset, llm_layers, encoder_layers)
    tokenizer = granite_tokenizer()
    torch.manual_seed(seed)
    model = GraniteSpeechForConditionalGeneration(config).eval()
    # B @ A of the size of a trained adapter's update: visible, not dominating the base weights
    attach_random_lora(model, LORA["r"], LORA["lora_alpha"], LORA["target_modules"], seed, b_scale=0.02)
    model.to(dtype)
    model.config.dtype = dtype
    save_hf_dir(model, tokenizer, out_dir)  # base + PEFT adapter files + config + tokenizer, as released
    n_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    with open(os.path.join(out_dir, "tiny_info.json"), "w") as f:
        json.dump({"seed": seed, "preset": preset, "llm_layers": config.text_config.num_hidden_layers,
                   "encoder_layers": config.encoder_config.num_layers, "parameters": n_params}, f, indent=1)
    log.info("wrote %s preset (%d params, %s) to %s", preset, n_params, dtype, out_dir)
    return out_dir


def parameter_count(preset: str, llm_layers: int | None = None, encoder_layers: int | None = None) -> dict:
    """Parameters of the preset at the given depths, counted on a meta-device model (no memory): total and LLM."""
    from transformers import GraniteSpeechForConditionalGeneration

    config = preset_config(preset, llm_layers, encoder_layers)
    with torch.device("meta"):
        model = GraniteSpeechForConditionalGeneration(config)
    total = sum(p.numel() for p in model.parameters())
    llm = sum(p.numel() for p in model.model.language_model.parameters())
    return {"total": total, "llm": llm}
