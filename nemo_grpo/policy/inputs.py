"""Turn (waveform, user message) pairs into a ``PromptBatch`` the way ``GraniteSpeechProcessor`` does.

Granite chat template with ``add_generation_prompt=True``; the single ``<|audio|>`` placeholder is expanded to
``num_audio_tokens(len(wave))`` copies; LEFT padding with ``pad_token_id`` (generation appends on the right);
features from ``features.log_mel_features`` on the zero-padded batch; ``input_features_mask`` [B, A] True for the
first A_b projected tokens of row b (the processor's definition).

Shape legend: B prompts, P prompt tokens, S audio samples, F feature frames, A audio tokens, N texts, T tokens.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from nemo_grpo.policy.base import PromptBatch
from nemo_grpo.policy.features import log_mel_features, num_audio_tokens

AUDIO_TOKEN = "<|audio|>"


def render_prompt(tokenizer: Any, user_message: str, system_prompt: str | None = None) -> str:
    """The chat-templated prompt text (generation prompt appended), placeholder NOT yet expanded."""
    messages = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": user_message})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _audio_token_id(tokenizer: Any) -> int:
    tid = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    if tid is None or tid == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no {AUDIO_TOKEN} token")
    return int(tid)


def _prompt_ids(tokenizer: Any, wave_len: int, message: str, item_id: str, config: Any,
                system_prompt: str | None) -> tuple[list[int], str]:
    if message.count(AUDIO_TOKEN) != 1:
        raise ValueError(f"{item_id}: user message must contain exactly one {AUDIO_TOKEN}, got {message!r}")
    rendered = render_prompt(tokenizer, message, system_prompt)
    n_audio = num_audio_tokens(wave_len, config)
    expanded = rendered.replace(AUDIO_TOKEN, AUDIO_TOKEN * n_audio)
    ids = tokenizer(expanded, add_special_tokens=False)["input_ids"]
    got = sum(1 for t in ids if t == _audio_token_id(tokenizer))
    if got != n_audio:  # e.g. a system prompt that itself mentions the placeholder
        raise ValueError(f"{item_id}: expected {n_audio} audio tokens after expansion, tokenized {got}")
    return ids, rendered


def build_prompt_batch(
    tokenizer: Any,
    waveforms: Sequence[torch.Tensor],
    user_messages: Sequence[str],
    references: Sequence[str],
    ids: Sequence[str],
    config: Any,
    max_prompt_tokens: int = 256,
    system_prompt: str | None = None,
) -> PromptBatch:
    """B prompts -> PromptBatch.

    waveforms:     B tensors [S_b] float, 16 kHz mono.
    user_messages: B strings, each with exactly one ``<|audio|>``.
    config:        GraniteSpeechConfig (window_size, downsample_rate).
    Raises ValueError naming the id when a prompt (audio tokens included) exceeds ``max_prompt_tokens`` or is
    malformed; the data layer turns that into a counted skip.
    """
    n = len(waveforms)
    if not (n == len(user_messages) == len(references) == len(ids)) or n == 0:
        raise ValueError(f"need equally many (>0) waveforms/messages/references/ids, got "
                         f"{n}/{len(user_messages)}/{len(references)}/{len(ids)}")
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token")
    rows, rendered = [], []
    for wave, msg, item_id in zip(waveforms, user_messages, ids):
        if wave.dim() != 1 or wave.numel() < 400:
            raise ValueError(f"{item_id}: waveform must be 1-D with >= 400 samples, got shape {tuple(wave.shape)}")
        row, text = _prompt_ids(tokenizer, wave.numel(), msg, item_id, config, system_prompt)
        if len(row) > max_prompt_tokens:
            raise ValueError(f"{item_id}: prompt has {len(row)} tokens > max_prompt_tokens={max_prompt_tokens}")
        rows.append(row)
        rendered.append(text)
    p = max(len(r) for r in rows)
    input_ids = torch.full((n, p), int(tokenizer.pad_token_id), dtype=torch.long)  # [B, P]
    attention_mask = torch.zeros((n, p), dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, p - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[b, p - len(row):] = 1
    lengths = torch.tensor([w.numel() for w in waveforms], dtype=torch.long)
    audio = torch.zeros((n, int(lengths.max())), dtype=torch.float32)  # [B, S]
    for b, wave in enumerate(waveforms):
        audio[b, : wave.numel()] = wave.float()
    features, _ = log_mel_features(audio, lengths)  # [B, F, 160]
    sizes = torch.tensor([num_audio_tokens(int(s), config) for s in lengths])
    features_mask = torch.arange(int(sizes.max())).unsqueeze(0) < sizes.unsqueeze(1)  # [B, A]
    return PromptBatch(input_ids, attention_mask, features, features_mask, list(references), list(ids), rendered)


def encode_completions(tokenizer: Any, texts: Sequence[str], max_tokens: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokenize reference completions as the policy would emit them: text tokens + eos, then pad.

    Returns (token_ids [N, T] long, mask [N, T] bool True on text tokens and the eos, truncated [N] bool). A text
    whose tokens + eos do not fit in ``max_tokens`` is cut to ``max_tokens`` tokens WITHOUT eos, exactly like a
    sampled completion that hit the length limit: teaching eos after a cut would teach stopping mid-answer.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos is None or pad is None:
        raise ValueError("tokenizer needs eos_token_id and pad_token_id")
    rows, truncated = [], []
    for text in texts:
        row = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
        cut = max_tokens is not None and len(row) > max_tokens
        rows.append(row[:max_tokens] if cut else row)
        truncated.append(cut)
    t = max(len(r) for r in rows) if rows else 1
    token_ids = torch.full((len(rows), t), int(pad), dtype=torch.long)  # [N, T]
    mask = torch.zeros((len(rows), t), dtype=torch.bool)
    for i, row in enumerate(rows):
        token_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = True
    return token_ids, mask, torch.tensor(truncated, dtype=torch.bool)
