"""``nemo-grpo make-tiny OUT_DIR``: a tiny random Granite Speech checkpoint in HF format, built fully offline.

What it writes (loads with ``GraniteSpeechForConditionalGeneration.from_pretrained`` / ``AutoTokenizer``):
  * ``config.json`` + ``model.safetensors``: encoder 2 conformer layers x hidden 64 (block context 64), a 1-layer
    Q-Former (hidden 64), Granite text model 2 layers x hidden 64 (4 heads / 2 kv heads), tied embeddings
    (~0.45 M parameters). Granite's multipliers are NON-trivial by default (logits_scaling 4, attention 1/8,
    embedding 6, residual 0.5) so every test exercises them, as the real 2b/8b checkpoints do (8/16, 1/64, 12, 0.22).
  * a byte-level BPE tokenizer trained in well under a second on the embedded English + German corpus below and
    the toy tasks' vocabulary (``nemo_grpo.data.toy``), with
    Granite's special tokens: ``<|end_of_text|>`` (eos, id 0 like Granite), ``<|start_of_role|>``, ``<|end_of_role|>``,
    ``<|audio|>`` (= ``audio_token_index``) and ``<|pad|>`` (pad, DISTINCT from eos so models learn to stop), plus
    a Granite-style chat template (no default system prompt).
  * optionally (``has_lora_adapter=True``) an audio LoRA adapter on the LM's q/v projections saved the way the real
    checkpoints ship it (``adapter_config.json`` + ``adapter_model.safetensors`` next to the base weights), with
    random non-zero B so switching it on/off changes the outputs.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any

import torch

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>", "<|audio|>", "<|pad|>"]

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content'] + '<|end_of_text|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_of_role|>assistant<|end_of_role|>' }}{%- endif %}"
)

_EN_NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen " \
    "sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand"
_DE_NUMBERS = "null eins zwei drei vier fünf sechs sieben acht neun zehn elf zwölf dreizehn vierzehn fünfzehn " \
    "sechzehn siebzehn achtzehn neunzehn zwanzig dreißig vierzig fünfzig sechzig siebzig achtzig neunzig " \
    "hundert tausend einundzwanzig zweiundzwanzig dreiundvierzig"
CORPUS = [
    _EN_NUMBERS, _DE_NUMBERS,
    "the red box is on the left. the blue ball is on the right. the green cup is under the table.",
    "What color is the box? The box is red. Where is the ball? The ball is on the right side.",
    "Is the cup on the table? No, the cup is under the table. Yes, it is. How many apples are there?",
    "There are three apples and two oranges. The small dog sleeps near the big house by the river.",
    "Answer the question about the audio. Translate the audio into German. Transcribe the audio.",
    "Listen to the speech and answer: who is speaking? A man is speaking. A woman reads a short story.",
    "die rote Kiste ist links. der blaue Ball ist rechts. die grüne Tasse ist unter dem Tisch.",
    "Welche Farbe hat die Kiste? Die Kiste ist rot. Wo ist der Ball? Der Ball ist auf der rechten Seite.",
    "Es gibt drei Äpfel und zwei Orangen. Der kleine Hund schläft neben dem großen Haus am Fluss.",
    "Übersetze den Satz ins Deutsche. Die Straße ist schön. Ich möchte einen Kaffee, bitte. Grüße aus Köln.",
    "Über die Brücke gehen. Schöne Grüße. Mädchen, Jungen, Bäume, Vögel, süß, heiß, weiß, Fuß, groß.",
    "The weather is nice today. Das Wetter ist heute schön. Thank you very much. Vielen Dank.",
    "0 1 2 3 4 5 6 7 8 9 10 42 100 2024, . ? ! : ; ' \" ( ) -",
]

# Text / encoder / projector sizes and the Granite multipliers; ``make_tiny(**overrides)`` may change any of these.
DEFAULTS: dict[str, Any] = {
    "vocab_size": 640,
    "hidden": 64,
    "text_layers": 2,
    "text_heads": 4,
    "text_kv_heads": 2,
    "text_ffn": 192,
    "encoder_layers": 2,
    "encoder_heads": 4,
    "encoder_context": 64,
    "encoder_ctc_dim": 32,
    "qformer_layers": 1,
    "qformer_heads": 4,
    "logits_scaling": 4.0,
    "attention_multiplier": 0.125,
    "embedding_multiplier": 6.0,
    "residual_multiplier": 0.5,
    "has_lora_adapter": False,
    "lora_rank": 4,
    "lora_alpha": 8,
}


def toy_vocabulary() -> list[str]:
    """The toy tasks' phrases (``nemo_grpo.data.toy.vocabulary_text``), one BPE training document per line.

    Without them the German toy references ("Die Nummer lautet drei zwo fünf") are 14-23 byte-level pieces each,
    which the tiny model barely learns to spell; with them, a reference is a handful of whole-word tokens.
    """
    from nemo_grpo.data.toy import vocabulary_text  # lazy: the data package must not load at tiny's import

    lines = vocabulary_text().splitlines()
    # The scene phrases repeat each English word dozens of times while a German frame word ("null", "zwo",
    # "Zimmer") occurs once or twice: without a boost BPE leaves those split; 4 extra copies of the word list make
    # every toy word a single token at vocab_size 640 (German references: mean 6.4 tokens, max 9).
    words = " ".join(sorted({w.strip("?.,") for line in lines for w in line.split()}))
    return lines + [words] * 4


def train_tokenizer(vocab_size: int = DEFAULTS["vocab_size"]):
    """Byte-level BPE on CORPUS + the toy tasks' vocabulary, wrapped as a HF fast tokenizer (Granite special
    tokens, distinct pad)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS + toy_vocabulary(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|end_of_text|>",
        bos_token="<|end_of_text|>",
        unk_token="<|end_of_text|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|start_of_role|>", "<|end_of_role|>", "<|audio|>"],
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(tokenizer, **overrides):
    """A GraniteSpeechConfig with the tiny sizes; unknown override keys raise ValueError naming the key."""
    from transformers import GraniteSpeechConfig

    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown make_tiny option(s): {unknown}; known: {sorted(DEFAULTS)}")
    o = {**DEFAULTS, **overrides}
    h = int(o["hidden"])
    vocab = len(tokenizer)
    text = dict(
        model_type="granite", vocab_size=vocab, hidden_size=h, intermediate_size=int(o["text_ffn"]),
        num_hidden_layers=int(o["text_layers"]), num_attention_heads=int(o["text_heads"]),
        num_key_value_heads=int(o["text_kv_heads"]), max_position_embeddings=2048, rope_theta=10000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True, logits_scaling=float(o["logits_scaling"]),
        attention_multiplier=float(o["attention_multiplier"]),
        embedding_multiplier=float(o["embedding_multiplier"]),
        residual_multiplier=float(o["residual_multiplier"]),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    encoder = dict(
        input_dim=160, num_layers=int(o["encoder_layers"]), hidden_dim=h, feedforward_mult=4,
        num_heads=int(o["encoder_heads"]), output_dim=int(o["encoder_ctc_dim"]),
        context_size=int(o["encoder_context"]), max_pos_emb=int(o["encoder_context"]), dropout=0.0,
        conv_kernel_size=15, conv_expansion_factor=2,
    )
    projector = dict(
        model_type="blip_2_qformer", hidden_size=h, num_hidden_layers=int(o["qformer_layers"]),
        num_attention_heads=int(o["qformer_heads"]), intermediate_size=2 * h, encoder_hidden_size=h,
        cross_attention_frequency=1, max_position_embeddings=2048, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return GraniteSpeechConfig(
        text_config=text, encoder_config=encoder, projector_config=projector,
        audio_token_index=tokenizer.convert_tokens_to_ids("<|audio|>"),
        has_lora_adapter=bool(o["has_lora_adapter"]), window_size=15, downsample_rate=5, tie_word_embeddings=True,
    ), o


def _write_lora_adapter(model, out_dir: str, rank: int, alpha: int, seed: int) -> None:
    """Save a q/v LoRA adapter in PEFT's on-disk format, as the real checkpoints ship it."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from nemo_grpo.policy.presets import attach_random_lora

    cfg = attach_random_lora(model, rank, alpha, ["q_proj", "v_proj"], seed)
    cfg.base_model_name_or_path = out_dir
    state = {k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
    state = {k if k.startswith("base_model.model.") else "base_model.model." + k: v for k, v in state.items()}
    save_file(state, os.path.join(out_dir, "adapter_model.safetensors"))
    cfg.save_pretrained(out_dir)


def make_tiny(out_dir: str, seed: int = 0, **overrides: Any) -> str:
    """Write the tiny checkpoint + tokenizer into ``out_dir`` (created); returns ``out_dir``. Deterministic in seed."""
    from transformers import GraniteSpeechForConditionalGeneration

    os.makedirs(out_dir, exist_ok=True)
    tokenizer = train_tokenizer(int(overrides.get("vocab_size", DEFAULTS["vocab_size"])))
    config, opts = tiny_config(tokenizer, **overrides)
    torch.manual_seed(seed)
    model = GraniteSpeechForConditionalGeneration(config).eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if opts["has_lora_adapter"]:
        _write_lora_adapter(model, out_dir, int(opts["lora_rank"]), int(opts["lora_alpha"]), seed)
    with open(os.path.join(out_dir, "tiny_info.json"), "w") as f:
        n_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
        json.dump({"seed": seed, "options": opts, "parameters": n_params}, f, indent=1)
    log.info("wrote tiny Granite Speech (%d params) to %s", n_params, out_dir)
    return out_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from nemo_grpo.policy.presets import PRESETS

    parser.add_argument("out_dir", help="output directory (HF format)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", choices=PRESETS, default=None,
                        help="the released checkpoint's shapes, tokenizer layout, dropouts and audio LoRA, with random "
                             "bf16 weights (nemo_grpo.policy.presets); the size options below then do not apply")
    parser.add_argument("--llm-layers", type=int, default=None,
                        help="--preset: LLM depth (released: 40); --encoder-layers sets the encoder's (released: 16)")
    for key, val in DEFAULTS.items():
        if isinstance(val, bool):
            parser.add_argument(f"--{key.replace('_', '-')}", action="store_true", default=None)
        else:
            parser.add_argument(f"--{key.replace('_', '-')}", type=type(val), default=None,
                                help=f"default {val}")


def run(args: argparse.Namespace) -> int:
    overrides = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None}
    if args.preset is not None:
        from nemo_grpo.policy.presets import make_preset

        encoder_layers = overrides.pop("encoder_layers", None)
        if overrides:
            raise ValueError(f"--preset fixes the sizes; drop {sorted('--' + k.replace('_', '-') for k in overrides)}")
        out = make_preset(args.out_dir, args.preset, args.llm_layers, encoder_layers, seed=args.seed)
    elif args.llm_layers is not None:
        raise ValueError("--llm-layers needs --preset (the tiny model's LLM depth is --text-layers)")
    else:
        out = make_tiny(args.out_dir, seed=args.seed, **overrides)
    with open(os.path.join(out, "tiny_info.json")) as f:
        info = json.load(f)
    print(f"wrote {out} ({info['parameters']} parameters)")
    return 0
