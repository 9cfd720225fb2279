"""HF Granite <-> megatron-core GPTModel weights: convert, shard by TP rank at load, gather + unshard at export.

Layouts (H hidden, d head dim, n_q heads, g kv groups, q_g = n_q / g heads per group, f ffn, V_pad padded vocab):

* ``linear_qkv.weight`` [(n_q + 2g) d, H]: group-major ``[q heads of group 0, k_0, v_0, q heads of group 1, ...]``,
  so a contiguous TP split hands each rank whole groups.
* ``linear_fc1.weight`` [2f, H] = ``cat[gate, up]`` LOCALLY on every rank: rank r holds ``cat[gate_r, up_r]``
  (not a contiguous slice of the TP=1 tensor).
* column-parallel (split dim 0): embedding / output layer (V_pad rows, pad rows zero), qkv, fc1;
  row-parallel (split dim 1): ``linear_proj``, ``linear_fc2``; norms replicated.
* TE spec fuses the pre-attention / pre-MLP norms into ``linear_qkv.layer_norm_weight`` /
  ``linear_fc1.layer_norm_weight``; the local spec keeps ``input_layernorm`` / ``pre_mlp_layernorm``.
"""
from __future__ import annotations

import json
import os
import re

import torch

HF_LLM = "model.language_model."


def _norm_names(te: bool) -> tuple[str, str]:
    if te:
        return "self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"
    return "input_layernorm.weight", "pre_mlp_layernorm.weight"


def _dims(cfg) -> tuple[int, int, int, int]:
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_attention_heads, cfg.num_key_value_heads, d, cfg.hidden_size


def hf_to_megatron_full(hf: dict[str, torch.Tensor], cfg, padded_vocab: int, te: bool = False
                        ) -> dict[str, torch.Tensor]:
    """HF Granite LLM tensors (keys under ``model.language_model.`` + ``lm_head.weight``) -> TP=1 megatron names."""
    n_q, g, d, h = _dims(cfg)
    pre_attn, pre_mlp = _norm_names(te)
    out: dict[str, torch.Tensor] = {}
    emb = hf[HF_LLM + "embed_tokens.weight"]
    out["embedding.word_embeddings.weight"] = _pad_rows(emb, padded_vocab)
    if not cfg.tie_word_embeddings:
        out["output_layer.weight"] = _pad_rows(hf["lm_head.weight"], padded_vocab)
    for i in range(cfg.num_hidden_layers):
        src, dst = f"{HF_LLM}layers.{i}.", f"decoder.layers.{i}."
        q = hf[src + "self_attn.q_proj.weight"].reshape(g, (n_q // g) * d, h)
        k = hf[src + "self_attn.k_proj.weight"].reshape(g, d, h)
        v = hf[src + "self_attn.v_proj.weight"].reshape(g, d, h)
        out[dst + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, h)
        out[dst + "self_attention.linear_proj.weight"] = hf[src + "self_attn.o_proj.weight"]
        out[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]], dim=0)
        out[dst + "mlp.linear_fc2.weight"] = hf[src + "mlp.down_proj.weight"]
        out[dst + pre_attn] = hf[src + "input_layernorm.weight"]
        out[dst + pre_mlp] = hf[src + "post_attention_layernorm.weight"]
    out["decoder.final_layernorm.weight"] = hf[HF_LLM + "norm.weight"]
    return out


def megatron_tensor_to_hf(name: str, full: torch.Tensor, cfg, te: bool = False) -> list[tuple[str, torch.Tensor]]:
    """ONE TP=1 megatron tensor -> its HF (transformers-5 named) tensor(s), as views where possible:
    ``linear_qkv`` -> q/k/v, ``linear_fc1`` -> gate/up, embedding / output layer without the vocab padding;
    ``output_layer`` of a tied model -> [] (the embedding is the LM head). Works on meta tensors (export plans)."""
    n_q, g, d, h = _dims(cfg)
    pre_attn, pre_mlp = _norm_names(te)
    if name == "embedding.word_embeddings.weight":
        return [(HF_LLM + "embed_tokens.weight", full[: cfg.vocab_size])]
    if name == "output_layer.weight":
        return [] if cfg.tie_word_embeddings else [("lm_head.weight", full[: cfg.vocab_size])]
    if name == "decoder.final_layernorm.weight":
        return [(HF_LLM + "norm.weight", full)]
    m = _LAYER.fullmatch(name)
    if m is None:
        raise ValueError(f"{name}: megatron tensor with no HF Granite counterpart")
    dst, rest = f"{HF_LLM}layers.{m[1]}.", m[2]
    if rest == "self_attention.linear_qkv.weight":
        q, k, v = full.reshape(g, (n_q // g + 2) * d, h).split([(n_q // g) * d, d, d], dim=1)
        return [(dst + "self_attn.q_proj.weight", q.reshape(-1, h)), (dst + "self_attn.k_proj.weight",
                k.reshape(-1, h)), (dst + "self_attn.v_proj.weight", v.reshape(-1, h))]
    if rest == "mlp.linear_fc1.weight":
        gate, up = full.chunk(2, dim=0)
        return [(dst + "mlp.gate_proj.weight", gate), (dst + "mlp.up_proj.weight", up)]
    simple = {"self_attention.linear_proj.weight": "self_attn.o_proj.weight",
              "mlp.linear_fc2.weight": "mlp.down_proj.weight", pre_attn: "input_layernorm.weight",
              pre_mlp: "post_attention_layernorm.weight"}
    if rest not in simple:
        raise ValueError(f"{name}: megatron tensor with no HF Granite counterpart")
    return [(dst + simple[rest], full)]


_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


def megatron_full_to_hf(meg: dict[str, torch.Tensor], cfg, te: bool = False) -> dict[str, torch.Tensor]:
    """Inverse of :func:`hf_to_megatron_full` (drops the vocab padding; ``lm_head`` only when untied)."""
    out = {}
    for name, t in meg.items():
        out.update(megatron_tensor_to_hf(name, t, cfg, te))
    return {k: v.contiguous() for k, v in out.items()}


def full_shape(name: str, local: torch.Size, size: int) -> tuple[int, ...]:
    """TP=1 shape of a megatron tensor from this rank's shard shape (column-parallel: dim 0 x TP, row: dim 1)."""
    shape = list(local)
    if _COLUMN.search(name):
        shape[0] *= size
    elif _ROW.search(name):
        shape[1] *= size
    return tuple(shape)


def megatron_shard_from_hf(name: str, read, cfg, padded_vocab: int, te: bool, rank: int, size: int
                           ) -> torch.Tensor:
    """This TP rank's shard of megatron tensor ``name``, built from HF tensor SLICES only (lazy loading).

    ``read(hf_name, rows=(a, b) | None, cols=(a, b) | None)`` returns ``hf[a:b]`` / ``hf[:, a:b]`` of one HF tensor
    (see ``hf_io.CheckpointReader.read``). Equal to ``shard(name, hf_to_megatron_full(hf)[name], rank, size)``:
    qkv = this rank's whole query groups [q_g, k_g, v_g]; fc1 = [gate_r; up_r]; embedding / output layer = this
    rank's rows of the padded vocab (rows past the true vocab zero); linear_proj / linear_fc2 = column slices."""
    n_q, g, d, h = _dims(cfg)
    pre_attn, pre_mlp = _norm_names(te)
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        src = HF_LLM + "embed_tokens.weight" if name.startswith("embedding") else "lm_head.weight"
        if padded_vocab % size:
            raise ValueError(f"padded vocab {padded_vocab} not divisible by tensor_parallel_size {size}")
        per = padded_vocab // size
        lo, hi = rank * per, min((rank + 1) * per, cfg.vocab_size)
        if lo >= hi:  # this rank holds only padding rows
            w = read(src, rows=(0, 0))
            return w.new_zeros(per, *w.shape[1:])
        return _pad_rows(read(src, rows=(lo, hi)), per)
    if name == "decoder.final_layernorm.weight":
        return read(HF_LLM + "norm.weight")
    m = _LAYER.fullmatch(name)
    if m is None:
        raise ValueError(f"{name}: megatron tensor with no HF Granite counterpart")
    src, rest = f"{HF_LLM}layers.{m[1]}.", m[2]
    if rest == "self_attention.linear_qkv.weight":
        if g % size:
            raise ValueError(f"num_key_value_heads {g} not divisible by tensor_parallel_size {size}")
        gs, qd = g // size, (n_q // g) * d
        g0 = rank * gs
        q = read(src + "self_attn.q_proj.weight", rows=(g0 * qd, (g0 + gs) * qd)).reshape(gs, qd, h)
        k = read(src + "self_attn.k_proj.weight", rows=(g0 * d, (g0 + gs) * d)).reshape(gs, d, h)
        v = read(src + "self_attn.v_proj.weight", rows=(g0 * d, (g0 + gs) * d)).reshape(gs, d, h)
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)  # q/v may carry merged LoRA
        return torch.cat([q.to(dtype), k.to(dtype), v.to(dtype)], dim=1).reshape(-1, h)
    if rest == "mlp.linear_fc1.weight":
        f = cfg.intermediate_size // size
        rows = (rank * f, (rank + 1) * f)
        return torch.cat([read(src + "mlp.gate_proj.weight", rows=rows), read(src + "mlp.up_proj.weight", rows=rows)])
    if rest == "self_attention.linear_proj.weight":
        c = n_q * d // size
        return read(src + "self_attn.o_proj.weight", cols=(rank * c, (rank + 1) * c))
    if rest == "mlp.linear_fc2.weight":
        c = cfg.intermediate_size // size
        return read(src + "mlp.down_proj.weight", cols=(rank * c, (rank + 1) * c))
    if rest == pre_attn:
        return read(src + "input_layernorm.weight")
    if rest == pre_mlp:
        return read(src + "post_attention_layernorm.weight")
    raise ValueError(f"{name}: megatron tensor with no HF Granite counterpart")


def _pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    if w.shape[0] > rows:
        raise ValueError(f"vocab {w.shape[0]} exceeds padded vocab {rows}")
    return torch.cat([w, w.new_zeros(rows - w.shape[0], *w.shape[1:])]) if w.shape[0] < rows else w


_COLUMN = re.compile(r"(word_embeddings|output_layer|linear_qkv|linear_fc1)\.weight$")
_ROW = re.compile(r"(linear_proj|linear_fc2)\.weight$")


def is_tp_sharded(name: str) -> bool:
    """True for megatron tensors split over TP ranks (column- or row-parallel weights)."""
    return bool(_COLUMN.search(name) or _ROW.search(name))


def shard(name: str, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This TP rank's slice of a TP=1 megatron tensor (GLU-aware for ``linear_fc1``)."""
    if size == 1:
        return full
    if name.endswith("linear_fc1.weight"):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, 0)[rank], up.chunk(size, 0)[rank]], dim=0).contiguous()
    if _COLUMN.search(name):
        return full.chunk(size, dim=0)[rank].contiguous()
    if _ROW.search(name):
        return full.chunk(size, dim=1)[rank].contiguous()
    return full


def unshard(name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`shard` given every TP rank's slice in rank order."""
    if len(parts) == 1:
        return parts[0]
    if name.endswith("linear_fc1.weight"):
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    if _COLUMN.search(name):
        return torch.cat(parts, dim=0)
    if _ROW.search(name):
        return torch.cat(parts, dim=1)
    return parts[0]


def gather_full_state(gpt) -> dict[str, torch.Tensor]:
    """TP=1 tensors of a (possibly TP-sharded) GPTModel, on every TP rank (collective over the TP group)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    size = parallel_state.get_tensor_model_parallel_world_size()
    out = {}
    for name, p in gpt.state_dict().items():
        if "_extra_state" in name or not torch.is_tensor(p):
            continue
        t = p.detach().contiguous()
        if size > 1 and is_tp_sharded(name):
            parts = [torch.empty_like(t) for _ in range(size)]
            dist.all_gather(parts, t, group=group)
            t = unshard(name, parts)
        out[name] = t.clone()
    return out


def load_into_gpt(gpt, full: dict[str, torch.Tensor]) -> None:
    """Copy TP=1 tensors into this rank's GPTModel shard; every parameter must be covered, shapes must match."""
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    size = parallel_state.get_tensor_model_parallel_world_size()
    own = {k: v for k, v in gpt.state_dict().items() if "_extra_state" not in k}
    missing = sorted(set(own) - set(full))
    extra = sorted(set(full) - set(own))
    if missing or extra:
        raise ValueError(f"megatron/HF mapping mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for name, dst in own.items():
            src = shard(name, full[name], rank, size)
            if src.shape != dst.shape:
                raise ValueError(f"{name}: converted shard {tuple(src.shape)} != model {tuple(dst.shape)}")
            dst.copy_(src.to(dst.dtype))


def load_into_gpt_lazy(gpt, read, cfg, padded_vocab: int, te: bool = False) -> None:
    """Fill this rank's GPTModel shard tensor by tensor from HF slices (:func:`megatron_shard_from_hf`): peak extra
    memory is one shard-sized tensor, never the checkpoint. Shapes must match."""
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    size = parallel_state.get_tensor_model_parallel_world_size()
    with torch.no_grad():
        for name, dst in gpt.state_dict().items():
            if "_extra_state" in name or not torch.is_tensor(dst):
                continue
            if name == "output_layer.weight" and cfg.tie_word_embeddings:
                continue
            src = megatron_shard_from_hf(name, read, cfg, padded_vocab, te, rank, size)
            if src.shape != dst.shape:
                raise ValueError(f"{name}: converted shard {tuple(src.shape)} != model {tuple(dst.shape)}")
            dst.copy_(src.to(dst.dtype))


# on-disk (legacy, what save_pretrained writes and the released checkpoints use) -> module names (transformers 5)
_LEGACY = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
           ("encoder.", "model.encoder."), ("projector.", "model.projector."))


def normalize_key(key: str) -> str:
    """Granite Speech tensor name in either on-disk layout -> the transformers-5 module name."""
    for old, new in _LEGACY:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def to_legacy_key(key: str) -> str:
    """Inverse of :func:`normalize_key` (the layout ``save_pretrained`` writes)."""
    for old, new in _LEGACY:
        if key.startswith(new):
            return old + key[len(new):]
    return key


def read_hf_state_file(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file."""
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} missing")
    return {normalize_key(k): v for k, v in load_file(path).items()}


def read_hf_state(model_dir: str, prefixes: tuple[str, ...] = ("",)) -> dict[str, torch.Tensor]:
    """Tensors of a HF checkpoint dir (single or sharded safetensors), keys normalised (:func:`normalize_key`) and
    kept when they start with one of ``prefixes``."""
    from safetensors import safe_open

    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(model_dir, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{model_dir}: no model.safetensors(.index.json)")
    out = {}
    for fname in files:
        with safe_open(os.path.join(model_dir, fname), framework="pt") as f:
            for key in f.keys():
                name = normalize_key(key)
                if name.startswith(prefixes):
                    out[name] = f.get_tensor(key)
    return out
