"""One pad-token policy and one dropout policy for both backends (HF and megatron).

Pad. Granite's released tokenizer pads with ``<|end_of_text|>`` (pad == eos == id 0) and fills every embedding row
(49160 entries = vocab_size). Completions are padded after their eos; with pad == eos the two cannot be told apart
in a token matrix, and masking "pad" would hide the eos the model must learn to emit. The policy keeps the
vocabulary size, the eos semantics and the exported tokenizer unchanged:

1. a tokenizer whose pad already differs from eos is used as it is;
2. else an EXISTING special token that a chat model never emits becomes the in-memory pad (``<|pad|>``, then
   Granite's ``<fim_pad>``, ``<pad>``); no row is added, so the embedding matrix and its TP split are untouched;
3. else, when the embedding matrix has a spare row beyond the tokenizer, ``<|pad|>`` is added in that row;
4. else a ValueError says what to change.

Masks never come from the pad id (they come from lengths: ``Completions.mask``), so even a sampled pad token would
be scored as the ordinary token it is. ``save_tokenizer`` writes the checkpoint's own pad back, so an exported dir
has the tokenizer files the checkpoint came with.

Dropout. The released projector (Q-Former) has attention_probs_dropout_prob = hidden_dropout_prob = 0.1, and
transformers applies the attention one inside the attention function from a module attribute, not through an
``nn.Dropout``. Active in training mode it makes pi_theta / pi_old != 1 at the first update and the two backends
disagree. ``disable_dropout`` zeroes both kinds in a module tree; the checkpoint's config keeps its values (exported
as loaded).
"""
from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

PAD_CANDIDATES = ("<|pad|>", "<fim_pad>", "<pad>")
_EXPORT_PAD = "_nemo_grpo_export_pad"  # tokenizer attribute: the pad token the checkpoint's files name
# module attributes that hold a dropout probability read at forward time (BLIP-2 / Granite attention, sdpa wrappers)
_DROPOUT_ATTRS = ("attention_dropout", "dropout_prob", "attn_dropout", "dropout_p")


def resolve_pad(tokenizer: Any, num_embeddings: int, reserved: tuple[int, ...] = ()) -> int:
    """Give ``tokenizer`` a pad token distinct from eos by the module's policy; returns the pad id.

    num_embeddings: rows of the model's input embedding (the LM's ``vocab_size``); reserved: ids that must never
    pad (e.g. the audio token). Raises ValueError when no policy step applies."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the checkpoint's tokenizer has no eos token")
    setattr(tokenizer, _EXPORT_PAD, tokenizer.pad_token)
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return int(tokenizer.pad_token_id)
    vocab = tokenizer.get_vocab()
    taken = {eos, tokenizer.bos_token_id, *reserved}
    for cand in PAD_CANDIDATES:
        idx = vocab.get(cand)
        if idx is not None and idx < num_embeddings and idx not in taken:
            tokenizer.pad_token = cand
            log.info("tokenizer pad == eos: padding with the existing special token %r (id %d); vocabulary, "
                     "eos and the exported tokenizer unchanged", cand, idx)
            return int(idx)
    if len(tokenizer) < num_embeddings:
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
        log.warning("tokenizer pad == eos: added <|pad|> in the spare embedding row %d", tokenizer.pad_token_id)
        return int(tokenizer.pad_token_id)
    raise ValueError(
        f"the tokenizer pads with eos ({tokenizer.eos_token!r}), has none of {list(PAD_CANDIDATES)} and its "
        f"{len(tokenizer)} entries fill all {num_embeddings} embedding rows: set a never-generated special token as "
        "pad_token in the checkpoint's tokenizer_config.json")


def save_tokenizer(tokenizer: Any, out_dir: str) -> None:
    """``tokenizer.save_pretrained(out_dir)`` with the pad token the checkpoint's own files named."""
    export_pad = getattr(tokenizer, _EXPORT_PAD, tokenizer.pad_token)
    in_memory = tokenizer.pad_token
    tokenizer.pad_token = export_pad
    try:
        tokenizer.save_pretrained(out_dir)
    finally:
        tokenizer.pad_token = in_memory


def disable_dropout(module: torch.nn.Module) -> int:
    """Zero every dropout in ``module``'s tree: ``nn.Dropout`` modules and float dropout attributes read inside
    attention functions. Returns how many were non-zero."""
    changed = 0
    for m in module.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            changed += m.p != 0
            m.p = 0.0
        for attr in _DROPOUT_ATTRS:
            value = getattr(m, attr, None)
            if isinstance(value, float) and not isinstance(value, bool):
                changed += value != 0
                setattr(m, attr, 0.0)
    return changed
