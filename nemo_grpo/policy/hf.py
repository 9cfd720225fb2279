"""The HF backend: ``base.Policy`` over ``transformers.GraniteSpeechForConditionalGeneration`` (5.23).

Why not ``model.forward``/``model.generate``:
  * 5.x's Granite Speech forward omits ``logits / text_config.logits_scaling`` (4.57 and ``GraniteForCausalLM``
    apply it). Here the LM head's raw output goes through ``sampling.scale_logits`` exactly once, for sampling and
    scoring alike.
  * ``generate`` with G samples re-encodes the same audio G times. Here ``encode`` runs the encoder once per prompt;
    every forward runs the projector once per prompt and expands the merged prompt embeddings to the G samples.
  * position ids come from the attention mask (cumsum - 1), so a LEFT-padded row is computed exactly like the
    unpadded prompt, in prefill, in every KV-cache step and in scoring.
  * KV-cache decode steps skip ``GraniteModel.forward`` (``_LeanDecoder``): per token, HF rebuilds the mask, grows a
    ``DynamicCache`` by concatenation, recomputes RoPE and wraps outputs, which dominated a small model's rollout.
    The lean step calls the same Granite submodules (norms, q/k/v/o projections, LoRA-wrapped or not, MLP) with
    Granite's multipliers, over a per-layer KV cache written in place, with the mask and RoPE built once per rollout.
    ``policy.lean_decode = False`` restores the HF-model step (the reference the tests compare against).
Audio LoRA (the real checkpoints' q/v adapter, ``adapter_config.json`` in the dir): loaded by ``from_pretrained``
and enabled whenever audio is present (every PromptBatch has audio), as ``GraniteSpeechForConditionalGeneration.
generate`` does; ``forward`` alone never toggles it. Optional LoRA training via ``lora={...}``.

Shape legend: B prompts, G samples/prompt, N = B*G, P prompt tokens, T completion tokens, V vocab, H hidden,
F feature frames, F' encoder frames, A audio tokens.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any, Iterable

import torch

from nemo_grpo.policy.base import Completions, PromptBatch, PromptContext
from nemo_grpo.policy.sampling import sample_tokens, scale_logits, token_logprobs
from nemo_grpo.policy.tokens import disable_dropout, resolve_pad, save_tokenizer

log = logging.getLogger(__name__)

_LORA_KEYS = ("r", "lora_alpha", "target_modules", "lora_dropout")


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """[.., L] 0/1 mask -> position ids [.., L]: index among real tokens (pad positions get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _adapter_name(model) -> str | None:
    return next(iter(model.peft_config)) if getattr(model, "_hf_peft_config_loaded", False) else None


def _file_key(model, key: str) -> tuple[str, str]:
    """Module state-dict key -> (file, key) in the HF dir: base weights unwrapped from PEFT's ``base_layer``, LoRA
    weights under PEFT's on-disk names (``base_model.model.<path>.lora_A.weight``), as the real checkpoints ship."""
    name = _adapter_name(model)
    if "lora_" in key:
        return "adapter_model.safetensors", "base_model.model." + key.replace(f".{name}.", ".")
    return "model.safetensors", key.replace(".base_layer.", ".")


def save_hf_dir(model, tokenizer, out_dir: str) -> None:
    """Write config, base weights, tokenizer and (when present) the adapter. ``model.save_pretrained`` is not used:
    with a transformers-native adapter attached, 5.23 writes PEFT-wrapped names into the base file."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    files: dict[str, dict[str, torch.Tensor]] = {"model.safetensors": {}, "adapter_model.safetensors": {}}
    tied = model.config.tie_word_embeddings
    for key, value in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue  # shares storage with the input embedding; from_pretrained re-ties it
        fname, fkey = _file_key(model, key)
        files[fname][fkey] = value.detach().contiguous().cpu()
    save_file(files["model.safetensors"], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    save_tokenizer(tokenizer, out_dir)
    name = _adapter_name(model)
    if name is not None:
        save_file(files["adapter_model.safetensors"], os.path.join(out_dir, "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        cfg = model.peft_config[name]
        cfg.base_model_name_or_path = out_dir
        cfg.save_pretrained(out_dir)


def load_hf_weights(model, ckpt_dir: str) -> None:
    """Inverse of ``save_hf_dir`` into an existing model of the same architecture (adapter included)."""
    from safetensors.torch import load_file

    cache: dict[str, dict[str, torch.Tensor]] = {}
    tied = model.config.tie_word_embeddings
    with torch.no_grad():
        for key, tensor in model.state_dict(keep_vars=True).items():
            if tied and key == "lm_head.weight":
                continue
            fname, fkey = _file_key(model, key)
            if fname not in cache:
                path = os.path.join(ckpt_dir, fname)
                if not os.path.exists(path):
                    raise ValueError(f"{path} missing: cannot load {key}")
                cache[fname] = load_file(path)
            if fkey not in cache[fname]:
                raise ValueError(f"{ckpt_dir}/{fname} has no tensor {fkey!r}")
            tensor.copy_(cache[fname][fkey])


def _fast_call(module):
    """``module`` as a callable; a hook-free plain ``nn.Linear`` / ``nn.Embedding`` becomes ``F.linear`` /
    ``F.embedding`` on its weights (what its forward runs, minus nn.Module's call machinery). LoRA-wrapped or hooked
    modules keep their own call."""
    if _plain_linear(module):
        return functools.partial(torch.nn.functional.linear, weight=module.weight, bias=module.bias)
    if type(module) is torch.nn.Embedding and not (module._forward_hooks or module._forward_pre_hooks):
        return functools.partial(torch.nn.functional.embedding, weight=module.weight, padding_idx=module.padding_idx,
                                 max_norm=module.max_norm, norm_type=module.norm_type,
                                 scale_grad_by_freq=module.scale_grad_by_freq, sparse=module.sparse)
    return module


def _plain_linear(module) -> bool:
    return type(module) is torch.nn.Linear and not (module._forward_hooks or module._forward_pre_hooks)


def _fused_call(modules):
    """One ``F.linear`` over the row-concatenated weights of plain bias-free ``nn.Linear`` modules that read the same
    input (q/k/v; gate/up), or None when any of them is wrapped (LoRA) or hooked. Concatenating output rows changes
    no output element's dot product (same inputs, same reduction), so the result equals the separate calls."""
    if not all(_plain_linear(m) and m.bias is None for m in modules):
        return None
    weight = torch.cat([m.weight.detach() for m in modules])  # [sum out, in]: a copy, rebuilt every rollout
    return functools.partial(torch.nn.functional.linear, weight=weight)


class _Layer:
    """What a decode step reads of one ``GraniteDecoderLayer``, as plain attributes (no nn.Module ``__getattr__``
    per token): norm weights/eps, projections (fused when plain), multipliers, head layout."""

    def __init__(self, layer):
        attn, mlp = layer.self_attn, layer.mlp
        self.ln1 = (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        self.ln2 = (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
        self.residual = layer.residual_multiplier
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.dropout = attn.attention_dropout if attn.training else 0.0
        self.q_size = attn.q_proj.out_features
        self.kv_size = attn.k_proj.out_features
        self.qkv = _fused_call([attn.q_proj, attn.k_proj, attn.v_proj])
        self.q, self.k, self.v = (_fast_call(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
        self.o = _fast_call(attn.o_proj)
        self.gate_up = _fused_call([mlp.gate_proj, mlp.up_proj])
        self.gate, self.up = _fast_call(mlp.gate_proj), _fast_call(mlp.up_proj)
        self.down = _fast_call(mlp.down_proj)
        from transformers.activations import SiLUActivation

        silu = type(mlp.act_fn) in (SiLUActivation, torch.nn.SiLU) and not mlp.act_fn._forward_hooks
        self.act = torch.nn.functional.silu if silu else mlp.act_fn  # Granite's "silu", minus the module call


def _rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """``GraniteRMSNorm.forward`` for ``norm`` = (weight, eps): in fp32 one ``torch.rms_norm`` op (measured
    bit-identical on CPU to HF's x * rsqrt(mean(x^2) + eps) * weight, H = 64 .. 4096)."""
    weight, eps = norm
    if x.dtype == torch.float32:
        return torch.rms_norm(x, weight.shape, weight, eps)
    x32 = x.to(torch.float32)  # half precision: HF normalises in fp32 and casts back before the weight
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class _LeanDecoder:
    """One-token decode steps over Granite's decoder layers, for ``HFGraniteSpeechPolicy.generate``.

    Built once per rollout from the B-row prefill ``DynamicCache``: per-layer keys/values [N, Hkv, P+T, D] (the prompt
    repeated G times, decode columns written in place), the bool attention mask [N, 1, 1, P+T] (True = attend; None
    when no prompt is padded) and RoPE cos/sin [N, T, 1, D] at the mask-derived positions (real prompt tokens + t).
    The math is ``GraniteModel.forward`` + ``GraniteDecoderLayer``'s, op for op, with sdpa's single-query GQA packing
    (fp32, tests: the same tokens as ``lean_decode = False``, log-probs within 1e-6, i.e. float rounding). Plain
    ``nn.Linear`` projections run as ``F.linear`` (q/k/v and gate/up as one call over concatenated weights);
    LoRA-wrapped (peft) ones through their own module call, so the audio adapter applies exactly. Per token this is
    ~25 tensor ops per layer: on small models the op count, not the FLOPs, sets the rollout speed.
    """

    @staticmethod
    def supports(lm) -> bool:
        """Plain Granite layers with a position-independent RoPE; anything else keeps the HF-model step."""
        from transformers.models.granite import modeling_granite as mg

        return (lm.rotary_emb.rope_type == "default" and not lm.config.attention_bias
                and type(lm.norm) is mg.GraniteRMSNorm
                and all(type(layer) is mg.GraniteDecoderLayer and type(layer.self_attn) is mg.GraniteAttention
                        and type(layer.mlp) is mg.GraniteMLP and type(layer.input_layernorm) is mg.GraniteRMSNorm
                        and type(layer.post_attention_layernorm) is mg.GraniteRMSNorm for layer in lm.layers))

    @torch.inference_mode()
    def __init__(self, lm, prompt_cache, prompt_mask: torch.Tensor, num_samples: int, max_new_tokens: int):
        """prompt_cache: prefill DynamicCache over B rows; prompt_mask [B, P] 0/1."""
        bsz, plen = prompt_mask.shape
        n, total = bsz * num_samples, plen + max_new_tokens
        self.plen = plen
        self.keys, self.values = [], []
        for layer in prompt_cache.layers:
            for src, out in ((layer.keys, self.keys), (layer.values, self.values)):
                buf = src.new_empty(n, src.shape[1], total, src.shape[3])  # [N, Hkv, P+T, D]
                buf.view(bsz, num_samples, *buf.shape[1:])[:, :, :, :plen] = src[:, None]
                out.append(buf)
        mask = prompt_mask.bool().repeat_interleave(num_samples, 0)  # [N, P]
        self.mask = None if bool(mask.all()) else torch.cat(
            [mask, mask.new_ones(n, max_new_tokens)], 1)[:, None, None, :]  # [N, 1, 1, P+T]
        pos = _positions(prompt_mask).repeat_interleave(num_samples, 0)[:, -1:] + 1  # [N, 1] first decode position
        pos = pos + torch.arange(max_new_tokens, device=pos.device)  # [N, T]
        first = self.keys[0] if self.keys else prompt_mask.float()
        cos, sin = lm.rotary_emb(first, position_ids=pos)  # [N, T, D]
        # HF's rotate_half(x) * sin == swap_halves(x) * [-sin_1, sin_2] bit for bit (negation is exact)
        half = sin.shape[-1] // 2
        self.cos = cos.unsqueeze(2)  # [N, T, 1, D]: broadcast over heads
        self.sin = torch.cat([-sin[..., :half], sin[..., half:]], -1).unsqueeze(2)
        self.layers = [_Layer(layer) for layer in lm.layers]
        self.embedding_multiplier = lm.embedding_multiplier
        self.final_norm = (lm.norm.weight, lm.norm.variance_epsilon)

    @torch.inference_mode()  # less per-op bookkeeping than no_grad; the buffers never meet autograd
    def step(self, embeds: torch.Tensor, t: int) -> torch.Tensor:
        """embeds [N, H] of the tokens fed at decode step t -> final-norm hidden states [N, H]."""
        col = self.plen + t
        cos, sin = self.cos[:, t], self.sin[:, t]  # [N, 1, D]
        mask = None if self.mask is None else self.mask[..., :col + 1]
        h = embeds.unsqueeze(1) * self.embedding_multiplier  # [N, 1, H]
        for i, layer in enumerate(self.layers):
            attn = self._attention(layer, _rms_norm(layer.ln1, h), cos, sin, mask, i, col)
            h = h + attn * layer.residual
            x = _rms_norm(layer.ln2, h)
            if layer.gate_up is not None:
                gate, up = layer.gate_up(x).chunk(2, -1)
            else:
                gate, up = layer.gate(x), layer.up(x)
            h = h + layer.down(layer.act(gate) * up) * layer.residual  # GraniteMLP.forward
        return _rms_norm(self.final_norm, h)[:, 0]

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """HF's apply_rotary_pos_emb for x [N, heads, D] (sin with the rotate_half sign folded in)."""
        n, heads, d = x.shape
        return x * cos + x.view(n, heads, 2, d // 2).flip(2).view(n, heads, d) * sin

    def _attention(self, layer: _Layer, x, cos, sin, mask, i: int, col: int) -> torch.Tensor:
        """GraniteAttention for one query [N, 1, H]; writes this token's key/value into column ``col``. With one
        query position, [N, 1, heads, D] and [N, heads, 1, D] are the same memory: no transposes."""
        n, d, nq = x.shape[0], layer.head_dim, layer.q_size
        if layer.qkv is not None:  # q and k rotated in one go: RoPE is per head, q and k heads share cos/sin
            qkv = layer.qkv(x)[:, 0]  # [N, (Hq + 2 Hkv) D]
            qk = self._rope(qkv[:, :nq + layer.kv_size].view(n, -1, d), cos, sin)  # [N, Hq + Hkv, D]
            q, k, v = qk[:, :nq // d], qk[:, nq // d:], qkv[:, nq + layer.kv_size:].view(n, -1, d)
        else:
            q = self._rope(layer.q(x).view(n, -1, d), cos, sin)  # [N, Hq, D]
            k = self._rope(layer.k(x).view(n, -1, d), cos, sin)  # [N, Hkv, D]
            v = layer.v(x).view(n, -1, d)
        self.keys[i][:, :, col] = k
        self.values[i][:, :, col] = v
        keys, values = self.keys[i][:, :, :col + 1], self.values[i][:, :, :col + 1]  # [N, Hkv, L, D]
        q = q.reshape(n, keys.shape[1], -1, d)  # [N, Hkv, Hq/Hkv, D]: sdpa's single-query GQA packing
        out = torch.nn.functional.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, dropout_p=layer.dropout, scale=layer.scaling)
        return layer.o(out.reshape(n, 1, -1))


class HFGraniteSpeechPolicy:
    """See the module docstring. Build with ``HFGraniteSpeechPolicy.from_pretrained``."""

    def __init__(self, model, tokenizer, *, freeze_encoder: bool = True, train_projector: bool = True,
                 train_llm: bool = True, lora: dict | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.eos_token_id = int(tokenizer.eos_token_id)
        self.pad_token_id = int(tokenizer.pad_token_id)
        if self.pad_token_id == self.eos_token_id:
            raise ValueError("tokenizer pad_token_id == eos_token_id: the model could never learn to stop; "
                             "resolve it with nemo_grpo.policy.tokens.resolve_pad")
        self.logits_scaling = float(self.config.text_config.logits_scaling)
        self.lean_decode = True  # False: decode steps through GraniteModel.forward (the reference path)
        self.freeze_encoder = freeze_encoder
        self._has_adapter = bool(getattr(model, "_hf_peft_config_loaded", False))
        if lora is not None:
            self._attach_lora(lora)
        self._set_trainable(freeze_encoder, train_projector, train_llm, lora is not None)
        self._optimizer: torch.optim.Optimizer | None = None
        self._opt_params: list[torch.nn.Parameter] = []
        self._opt_args: dict | None = None
        self._pending_opt_state: dict | None = None
        self.eval()

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, path: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        freeze_encoder: bool = True, train_projector: bool = True, train_llm: bool = True,
                        lora: dict | None = None) -> "HFGraniteSpeechPolicy":
        """Load a local HF Granite Speech dir (model, tokenizer, optional audio LoRA adapter).

        freeze_encoder: encoder without grad and always in eval (BatchNorm statistics stay fixed, so pi_old equals
                        pi_theta before the first update). train_projector / train_llm: grads for the Q-Former
                        projector / the LLM (embeddings, layers, tied head). lora: ``{"r", "lora_alpha",
                        "target_modules", "lora_dropout"}`` trains LoRA weights: the checkpoint's audio adapter when
                        it has one, else a new adapter with these settings (base LLM trainable only if train_llm).
        """
        from transformers import AutoTokenizer, GraniteSpeechForConditionalGeneration

        if not os.path.isdir(path):
            raise ValueError(f"model path {path!r} is not a directory (hub names are not supported offline)")
        model = GraniteSpeechForConditionalGeneration.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
        resolve_pad(tokenizer, model.get_input_embeddings().num_embeddings,
                    reserved=(model.config.audio_token_index,))
        model.to(device)
        disable_dropout(model)  # dropout would make pi_old != pi_theta for the same weights (the RL ratio)
        return cls(model, tokenizer, freeze_encoder=freeze_encoder, train_projector=train_projector,
                   train_llm=train_llm, lora=lora)

    def _attach_lora(self, lora: dict) -> None:
        unknown = sorted(set(lora) - set(_LORA_KEYS))
        if unknown:
            raise ValueError(f"unknown lora key(s) {unknown}; known: {list(_LORA_KEYS)}")
        if self._has_adapter:
            log.info("training the checkpoint's existing audio LoRA adapter; lora settings %s ignored", lora)
            return
        from peft import LoraConfig

        self.model.add_adapter(LoraConfig(r=int(lora.get("r", 8)), lora_alpha=int(lora.get("lora_alpha", 16)),
                                          target_modules=list(lora.get("target_modules", ["q_proj", "v_proj"])),
                                          lora_dropout=float(lora.get("lora_dropout", 0.0)), bias="none",
                                          task_type="CAUSAL_LM"))
        self.config.has_lora_adapter = True
        self._has_adapter = True

    def _set_trainable(self, freeze_encoder: bool, train_projector: bool, train_llm: bool, train_lora: bool) -> None:
        inner = self.model.model
        for name, p in self.model.named_parameters():
            if "lora_" in name:
                p.requires_grad_(train_lora)
            elif name.startswith("model.encoder."):
                p.requires_grad_(not freeze_encoder)
            elif name.startswith("model.projector."):
                p.requires_grad_(train_projector)
            else:  # language model + (tied) lm_head
                p.requires_grad_(train_llm)
        self._encoder, self._projector = inner.encoder, inner.projector
        self._lm, self._lm_head = inner.language_model, self.model.lm_head

    @property
    def device(self) -> torch.device:
        return self._lm_head.weight.device

    # ---------------------------------------------------------------- the forward pieces
    def _adapters(self) -> None:
        # Every PromptBatch carries audio: the checkpoint's audio adapter is on (HF generate()'s rule).
        if self._has_adapter:
            self.model.enable_adapters()

    def encode(self, batch: PromptBatch) -> PromptContext:
        """Encoder once per prompt: ctx.audio = encoder output [B, F', H_enc] (no grad when frozen)."""
        batch = batch.to(self.device)
        feats = batch.input_features.to(self._lm_head.weight.dtype)  # [B, F, 160]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            enc = self._encoder(feats).last_hidden_state
        return PromptContext(batch=batch, audio=enc)

    def _prompt_embeds(self, ctx: PromptContext) -> torch.Tensor:
        """Projector once per prompt, merged into the prompt's token embeddings: [B, P, H] (before Granite's
        embedding_multiplier, which the LM applies to all input embeddings, audio included)."""
        enc = ctx.audio
        if not self.freeze_encoder and torch.is_grad_enabled():
            enc = self._encoder(ctx.batch.input_features.to(enc.dtype)).last_hidden_state  # graph per backward
        audio = self._projector(enc)  # [B, A', H]
        return self.model.model.get_merged_audio_embeddings(
            ctx.batch.input_ids, audio, ctx.batch.input_features_mask)

    def _hidden(self, embeds: torch.Tensor, attention_mask: torch.Tensor, cache=None) -> tuple[torch.Tensor, Any]:
        out = self._lm(inputs_embeds=embeds, attention_mask=attention_mask,
                       position_ids=_positions(attention_mask)[:, -embeds.shape[1]:],
                       past_key_values=cache, use_cache=cache is not None)
        return out.last_hidden_state, out.past_key_values

    # ---------------------------------------------------------------- Policy API
    def generate(self, ctx: PromptContext, num_samples: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, generator: torch.Generator | None = None) -> Completions:
        """All N = B*G samples in one KV-cache batch; prompt prefilled once per prompt, then repeated G times."""
        from transformers import DynamicCache

        self._adapters()
        bsz = len(ctx.batch)
        group = torch.arange(bsz, device=self.device).repeat_interleave(num_samples)  # [N]
        state: dict[str, Any] = {}

        lean = self.lean_decode and _LeanDecoder.supports(self._lm)
        lm_head = _fast_call(self._lm_head)
        embed = _fast_call(self._lm.embed_tokens)

        def prefill():
            with torch.no_grad():
                embeds = self._prompt_embeds(ctx)  # [B, P, H]
                mask = ctx.batch.attention_mask.long()
                hidden, cache = self._hidden(embeds, mask, DynamicCache(config=self._lm.config))
            last = self._lm_head(hidden[:, -1]).repeat_interleave(num_samples, 0)  # [N, V]
            if lean:
                return last, _LeanDecoder(self._lm, cache, mask, num_samples, max_new_tokens)
            cache.batch_repeat_interleave(num_samples)
            state["mask"] = mask.repeat_interleave(num_samples, 0)  # [N, P]
            return last, cache

        def step(tokens, cache, t):
            if lean:
                return lm_head(cache.step(embed(tokens), t)), cache
            state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(len(tokens), 1)], 1)
            embeds = self._lm.embed_tokens(tokens).unsqueeze(1)  # [N, 1, H]
            hidden, cache = self._hidden(embeds, state["mask"], cache)
            return self._lm_head(hidden[:, -1]), cache

        out = sample_tokens(prefill, step, max_new_tokens=max_new_tokens, eos_token_id=self.eos_token_id,
                            pad_token_id=self.pad_token_id, logits_scaling=self.logits_scaling,
                            temperature=temperature, top_p=top_p, generator=generator)
        texts = [self.tokenizer.decode(ids[m].tolist(), skip_special_tokens=True)
                 for ids, m in zip(out.token_ids, out.mask)]
        return Completions(token_ids=out.token_ids, mask=out.mask, logprobs=out.logprobs, truncated=out.truncated,
                           group=group, texts=texts, off_policy=torch.zeros_like(out.truncated))

    def score(self, ctx: PromptContext, token_ids: torch.Tensor, group: torch.Tensor, temperature: float = 1.0,
              return_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """log pi(token_ids[n, t] | prompt group[n], token_ids[n, :t]) [N, T] (+ entropy [N, T]); differentiable
        when grad is enabled. Values past each completion's eos are computed but meaningless (mask them)."""
        if not torch.is_grad_enabled():  # e.g. the reference pass: inference mode skips autograd's per-op
            with torch.inference_mode():  # bookkeeping; the clones are ordinary tensors for later autograd use
                logp, entropy = self._score(ctx, token_ids, group, temperature, return_entropy)
            return logp.clone(), None if entropy is None else entropy.clone()
        return self._score(ctx, token_ids, group, temperature, return_entropy)

    def _score(self, ctx, token_ids, group, temperature, return_entropy):
        self._adapters()
        token_ids, group = token_ids.to(self.device), group.to(self.device)
        prompt = self._prompt_embeds(ctx)[group]  # [N, P, H]
        p, t = prompt.shape[1], token_ids.shape[1]
        embeds = torch.cat([prompt, self._lm.embed_tokens(token_ids)], 1)  # [N, P+T, H]
        mask = torch.cat([ctx.batch.attention_mask.long()[group], token_ids.new_ones(token_ids.shape)], 1)
        hidden, _ = self._hidden(embeds, mask)
        logits = self._lm_head(hidden[:, p - 1: p + t - 1])  # [N, T, V]: position p-1+t predicts token t
        return token_logprobs(scale_logits(logits, self.logits_scaling, temperature), token_ids, return_entropy)

    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def data_parallel(self) -> tuple[int, int]:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def configure_optimizer(self, lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
                            max_grad_norm: float) -> None:
        params = self.trainable_parameters()
        if not params:
            raise ValueError("no trainable parameters (check freeze_encoder/train_projector/train_llm/lora)")
        kwargs = dict(lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)
        try:  # one fused kernel over all tensors (as HF Trainer's default "adamw_torch_fused"): ~4x less CPU
            self._optimizer = torch.optim.AdamW(params, fused=True, **kwargs)  # than the per-tensor loop
        except (RuntimeError, ValueError) as e:  # a device/dtype without the fused kernel
            log.info("fused AdamW unavailable (%s): using the default implementation", e)
            self._optimizer = torch.optim.AdamW(params, **kwargs)
        self._opt_params = [p for group in self._optimizer.param_groups for p in group["params"]]
        self._opt_args = {"max_grad_norm": float(max_grad_norm)}
        if self._pending_opt_state is not None:
            self._optimizer.load_state_dict(self._pending_opt_state)
            self._pending_opt_state = None

    def optimizer_step(self, lr: float) -> float:
        """All-reduce (mean) grads over the DP world when distributed, clip, AdamW step at ``lr``, zero grads."""
        if self._optimizer is None:
            raise ValueError("optimizer_step before configure_optimizer")
        params = self._opt_params  # what the optimizer steps (walking the modules per step cost ~0.3 ms)
        _, world = self.data_parallel()
        if world > 1:
            import torch.distributed as dist

            for p in params:  # every rank reduces the same list, even where a param got no grad
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(world)
        max_norm = self._opt_args["max_grad_norm"]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        for g in self._optimizer.param_groups:
            g["lr"] = lr
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def save_pretrained(self, out_dir: str) -> None:
        """HF dir (config, base weights, tokenizer, PEFT adapter files when an adapter exists)."""
        save_hf_dir(self.model, self.tokenizer, out_dir)

    def save_checkpoint(self, ckpt_dir: str) -> None:
        """HF-loadable model dir + ``optimizer.pt``; rank 0 writes, all ranks meet at a barrier."""
        rank, world = self.data_parallel()
        if rank == 0:
            self.save_pretrained(ckpt_dir)
            opt = self._optimizer.state_dict() if self._optimizer is not None else None
            torch.save({"optimizer": opt, "opt_args": self._opt_args}, os.path.join(ckpt_dir, "optimizer.pt"))
        if world > 1:
            import torch.distributed as dist

            dist.barrier()

    def load_checkpoint(self, ckpt_dir: str) -> None:
        load_hf_weights(self.model, ckpt_dir)
        path = os.path.join(ckpt_dir, "optimizer.pt")
        if not os.path.exists(path):
            raise ValueError(f"{path} missing: not a checkpoint written by save_checkpoint")
        state = torch.load(path, map_location=self.device, weights_only=False)
        if state["optimizer"] is not None:
            if self._optimizer is None:
                self._pending_opt_state = state["optimizer"]  # applied by configure_optimizer
            else:
                self._optimizer.load_state_dict(state["optimizer"])

    def train(self, mode: bool = True) -> "HFGraniteSpeechPolicy":
        self.model.train(mode)
        if self.freeze_encoder:
            self._encoder.eval()
        return self

    def eval(self) -> "HFGraniteSpeechPolicy":
        return self.train(False)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> Any:
        return self.model.load_state_dict(state)
