"""Granite 3.x LLM as a megatron-core ``GPTModel`` (tensor + sequence parallel), Granite-exact.

Mapping (HF ``GraniteForCausalLM`` -> megatron-core), each one checked against HF with a negative control in
``tests/megatron``:

* ``attention_multiplier`` (replaces 1/sqrt(d))      -> ``TransformerConfig.softmax_scale``
* ``embedding_multiplier`` (on the MERGED text+audio  -> applied by :func:`merged_decoder_input`, which builds the
  embeddings)                                           ``decoder_input`` GPTModel receives
* ``residual_multiplier`` (both residual branches)    -> :class:`GraniteResidualBDA` replaces self_attn_bda/mlp_bda:
                                                          ``residual + m * branch`` (folding m into weights would
                                                          change Adam's effective step)
* ``logits_scaling`` (logits / s)                     -> ``sampling.scale_logits`` on :func:`lm_logits`' raw
                                                          output, before every sampler draw and vocab-parallel log-prob
* RMSNorm, SwiGLU, GQA, RoPE theta, tied embeddings   -> native (``linear_fc1 = cat[gate, up]`` per TP shard,
                                                          ``linear_qkv`` grouped per query group)

Layer spec: megatron's local spec when Transformer Engine is not importable, the TE spec when
``megatron.core.extensions.transformer_engine.HAVE_TE``; FP8 (``model.backend_options.fp8``, :func:`validate_fp8`) requires
TE and covers the TE linears' GEMMs (QKV, attention projection, MLP); core attention, GPTModel's own LM head, norms
and embeddings stay bf16/fp32; row counts are padded to FP8_ROW_MULTIPLE by the policy.
Tensors inside megatron are sequence-first: [S, B, H]; the helpers here take/return batch-first [B, S, ...].
"""
from __future__ import annotations

import copy
import functools
import logging
from dataclasses import replace

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

VOCAB_PAD_MULTIPLE = 128  # padded vocab is TP-size independent (TP in {1,2,4,...,128}) so checkpoints reshard


def have_te() -> bool:
    """True when Transformer Engine is importable (megatron-core's own probe)."""
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE
    except Exception:  # a broken TE install raises RuntimeError at import (see the stack facts)
        return False
    return bool(HAVE_TE)


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int) -> int:
    """Vocab rounded up to VOCAB_PAD_MULTIPLE; the pad columns are masked to -inf in :func:`lm_logits`."""
    if VOCAB_PAD_MULTIPLE % tensor_parallel_size:
        raise ValueError(f"model.tensor_parallel_size={tensor_parallel_size} must divide {VOCAB_PAD_MULTIPLE}")
    return -(-vocab_size // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE


class GraniteRMSNorm(torch.nn.Module):
    """HF ``GraniteRMSNorm`` bit-for-bit (fp32 variance, weight applied in the input dtype), SP-aware.

    Under sequence parallelism each TP rank normalises its own sequence slice, so the weight gradient is partial:
    the weight is tagged ``sequence_parallel`` and megatron's ``finalize_model_grads`` sums it over TP.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class GraniteResidualBDA:
    """Bias-dropout-add with Granite's residual multiplier: ``residual + m * dropout(x + bias)``.

    Built by megatron's ``build_module`` from ``ModuleSpec(GraniteResidualBDA, params={"multiplier": m})``; the
    layer calls ``bda(training, fused)(x_with_bias, residual, prob)`` like megatron's own get_bias_dropout_add.
    """

    def __init__(self, multiplier: float):
        self.multiplier = float(multiplier)

    def __call__(self, training: bool, fused: bool):
        m = self.multiplier

        def bda(x_with_bias, residual, prob):
            x, bias = x_with_bias
            if bias is not None:
                x = x + bias
            x = F.dropout(x, p=prob, training=training)
            return residual + x * m  # dtype promotion keeps an fp32 residual stream under bf16 autocast (as HF)

        return bda


FUSIONS = ("rope", "swiglu", "grad_accum")  # keys of model.backend_options.fusions (a mapping form)


def grad_accum_kernel_available() -> bool:
    """megatron's ColumnParallelLinear (GPTModel's output layer even under the TE spec) refuses
    ``gradient_accumulation_fusion`` without apex's ``fused_weight_gradient_mlp_cuda`` extension."""
    import importlib.util

    return importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


def resolve_fusions(setting=None, *, cuda: bool, te: bool, grad_accum_kernel: bool) -> dict[str, bool]:
    """``model.backend_options.fusions`` -> {"rope", "swiglu", "grad_accum": bool} for this machine.

    ``"auto"`` (default, also None): every fusion megatron-core 0.16 supports here when CUDA is present, none on
    CPU (there they only add torch.compile warm-ups of 5-37 s, or need CUDA extensions). ``"off"``: none. A
    mapping overrides single keys (true / false / "auto"); true for a fusion whose requirement is missing is a
    ValueError rather than megatron's error at model build:
      rope        apply_rope_fusion: TE's fused RoPE kernel
      swiglu      bias_activation_fusion: megatron's jit-fused (bias-free) SwiGLU, any device
      grad_accum  gradient_accumulation_fusion: CUDA + apex's fused_weight_gradient_mlp_cuda (TE linears fuse the
                  weight-gradient accumulation themselves, but GPTModel's output layer is megatron's own)
    Not here, on purpose: masked_softmax_fusion (the TE spec runs attention in TE; the local spec's fused softmax
    needs megatron's own CUDA kernels, absent from the NGC images); persist_layer_norm (apex's persistent
    LayerNorm kernel, while Granite uses RMSNorm, which the TE spec already fuses into
    TELayerNormColumnParallelLinear); bias_dropout_fusion (GraniteResidualBDA replaces megatron's bda).
    """
    supported = {"rope": te, "swiglu": True, "grad_accum": cuda and grad_accum_kernel}
    needs = {"rope": "Transformer Engine", "swiglu": "", "grad_accum": "CUDA and apex's fused_weight_gradient_mlp_cuda"}
    auto = {k: cuda and ok for k, ok in supported.items()}
    if setting is None or setting == "auto":
        return auto
    if setting == "off":
        return dict.fromkeys(FUSIONS, False)
    if not isinstance(setting, dict):
        raise ValueError(f"model.backend_options.fusions={setting!r}: use 'auto', 'off' or a mapping of {list(FUSIONS)}"
                         " to true/false/'auto'")
    unknown = sorted(set(setting) - set(FUSIONS))
    if unknown:
        raise ValueError(f"model.backend_options.fusions: unknown key(s) {unknown}; known {list(FUSIONS)}")
    out = dict(auto)
    for key, value in setting.items():
        if value == "auto":
            continue
        if not isinstance(value, bool):
            raise ValueError(f"model.backend_options.fusions.{key}={value!r}: use true, false or 'auto'")
        if value and not supported[key]:
            raise ValueError(f"model.backend_options.fusions.{key}=true needs {needs[key]}, which is not available here")
        out[key] = value
    return out


FP8_FORMATS = ("hybrid", "e4m3")  # megatron-core 0.16 TransformerConfig.fp8
# megatron-core 0.16 Fp8Recipe, less "custom" (needs a user quantization factory); mxfp8 needs Blackwell GPUs
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
FP8_ROW_MULTIPLE = 16  # TE FP8 GEMMs need the flattened row count (tokens) to be a multiple of 8/16


def validate_fp8(fp8, fp8_recipe, use_te: bool) -> None:
    """``model.backend_options.fp8`` / ``fp8_recipe``: a known format and recipe, and Transformer Engine present."""
    if fp8 is None:
        if fp8_recipe is not None:
            raise ValueError(f"model.backend_options.fp8_recipe={fp8_recipe!r} without model.backend_options.fp8; "
                             f"set fp8 to one of {list(FP8_FORMATS)}")
        return
    if fp8 not in FP8_FORMATS:
        raise ValueError(f"model.backend_options.fp8={fp8!r}: choose from {list(FP8_FORMATS)} (or null for bf16)")
    if fp8_recipe is not None and fp8_recipe not in FP8_RECIPES:
        raise ValueError(f"model.backend_options.fp8_recipe={fp8_recipe!r}: choose from {list(FP8_RECIPES)}")
    if not use_te:
        raise ValueError(
            f"config key 'model.backend_options.fp8'={fp8!r} needs Transformer Engine (megatron-core's TE layer "
            "spec); it is not importable here. Use an NGC PyTorch container or set model.backend_options.fp8: null"
        )


def rope_theta(text_cfg) -> float:
    """RoPE base: ``rope_parameters["rope_theta"]`` (transformers 5) or ``rope_theta`` (4.x configs)."""
    params = getattr(text_cfg, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(text_cfg, "rope_theta", 10000.0)))


def transformer_config(
    text_cfg,
    tensor_parallel_size: int = 1,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
    fp8: str | None = None,
    fp8_recipe: str | None = None,
    use_te: bool | None = None,
    fusions=None,
    activation_checkpointing: bool = False,
):
    """megatron ``TransformerConfig`` for a HF ``GraniteConfig`` (``text_config`` of Granite Speech).

    ``fusions``: ``model.backend_options.fusions`` (see :func:`resolve_fusions`; default auto).
    ``activation_checkpointing`` (``model.activation_checkpointing``): full recompute of every layer in backward
    (granularity "full", method "uniform", one layer per unit), keeping only each layer's input.

    Raises ValueError naming ``model.backend_options.fp8`` when FP8 is asked for without Transformer Engine, and naming the HF
    config field for Granite features this mapping does not cover.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    use_te = have_te() if use_te is None else use_te
    validate_fp8(fp8, fp8_recipe, use_te)
    rope = getattr(text_cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"text_config.rope_parameters.rope_type={rope.get('rope_type')!r} is not supported")
    if bool(text_cfg.attention_bias) != bool(text_cfg.mlp_bias):
        raise ValueError("text_config.attention_bias and text_config.mlp_bias must agree for megatron")
    if text_cfg.hidden_act != "silu":
        raise ValueError(f"text_config.hidden_act={text_cfg.hidden_act!r} (megatron mapping assumes silu)")
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
    bf16 = params_dtype == torch.bfloat16
    fused = resolve_fusions(fusions, cuda=torch.cuda.is_available(), te=use_te,
                            grad_accum_kernel=grad_accum_kernel_available())
    return TransformerConfig(
        num_layers=text_cfg.num_hidden_layers,
        hidden_size=text_cfg.hidden_size,
        ffn_hidden_size=text_cfg.intermediate_size,
        num_attention_heads=text_cfg.num_attention_heads,
        num_query_groups=text_cfg.num_key_value_heads,
        kv_channels=head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=text_cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=bool(text_cfg.attention_bias),
        softmax_scale=text_cfg.attention_multiplier,
        hidden_dropout=0.0,
        attention_dropout=float(text_cfg.attention_dropout),
        tensor_model_parallel_size=tensor_parallel_size,
        sequence_parallel=sequence_parallel and tensor_parallel_size > 1,
        params_dtype=params_dtype,
        bf16=bf16,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=not torch.cuda.is_available(),
        # perform_initialization stays on although every weight is then loaded from the HF checkpoint: in
        # megatron-core 0.16 it is also what tags TP-sharded weights (``tensor_model_parallel``), without which
        # the gradient norm counts each shard as a TP duplicate (wrong norm, wrong clipping)
        # fusions: see resolve_fusions (on with CUDA where megatron-core supports them, off on CPU)
        masked_softmax_fusion=False,
        bias_activation_fusion=fused["swiglu"],
        bias_dropout_fusion=False,
        apply_rope_fusion=fused["rope"],
        gradient_accumulation_fusion=fused["grad_accum"],
        persist_layer_norm=False,
        fp8=fp8 or None,
        fp8_recipe=fp8_recipe or "delayed",
        recompute_granularity="full" if activation_checkpointing else None,
        recompute_method="uniform" if activation_checkpointing else None,
        recompute_num_layers=1 if activation_checkpointing else None,
    )


@functools.cache
def granite_self_attention_class():
    """megatron ``SelfAttention`` that keeps honouring an explicit attention mask on KV-cache decode steps.

    megatron-core 0.16's ``_adjust_key_value_for_inference`` switches the mask type to ``no_mask`` on every decode
    step (static batching, ``sequence_len_offset > 0``, not training). Transformer Engine then ignores the mask it is
    given, so with left-padded prompts the new token attends to the pad positions of shorter prompts and the
    log-probs recorded while sampling (pi_old) disagree with ``score``. megatron's local attention applies the mask
    whatever the type says, so CPU runs never showed it. Here a decode step that was passed a mask keeps
    ``arbitrary`` (our masks are explicit [B, 1, Sq, Sk] tensors: causal | pad key). Built lazily: importing this
    module does not import megatron-core.
    """
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.enums import AttnMaskType

    class GraniteSelfAttention(SelfAttention):
        def forward(self, hidden_states, attention_mask, *args, **kwargs):
            self._granite_mask_given = attention_mask is not None
            return super().forward(hidden_states, attention_mask, *args, **kwargs)

        def _adjust_key_value_for_inference(self, *args, **kwargs):
            query, key, value, rotary_pos_emb, mask_type, block_table = super()._adjust_key_value_for_inference(
                *args, **kwargs)
            if mask_type == AttnMaskType.no_mask and getattr(self, "_granite_mask_given", False):
                mask_type = AttnMaskType.arbitrary
            return query, key, value, rotary_pos_emb, mask_type, block_table

    return GraniteSelfAttention


def _masked_self_attention(layer) -> None:
    """Both specs (TE and local): :func:`granite_self_attention_class` with ``attn_mask_type=arbitrary``.

    Left-padded prompts need the explicit [B, 1, Sq, Sk] mask (causal | pad key) on every step: TE's implicit
    ``causal`` ignores a mask, and so does megatron's fused upper-triangular softmax (local spec with
    ``masked_softmax_fusion`` on a GPU), so neither spec may run with ``causal``."""
    from megatron.core.transformer.enums import AttnMaskType

    attn = layer.submodules.self_attention
    attn.module = granite_self_attention_class()
    attn.params = {**(attn.params or {}), "attn_mask_type": AttnMaskType.arbitrary}


def block_spec(config, residual_multiplier: float, use_te: bool | None = None):
    """TransformerBlockSubmodules: megatron's GPT layer spec with Granite's residual-multiplier bda and norms."""
    from megatron.core.models.gpt import gpt_layer_specs as specs
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    use_te = have_te() if use_te is None else use_te
    bda = ModuleSpec(module=GraniteResidualBDA, params={"multiplier": residual_multiplier})
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        layer = copy.deepcopy(specs.get_gpt_layer_with_transformer_engine_spec())
        final_norm = TENorm
    else:
        layer = copy.deepcopy(specs.get_gpt_layer_local_spec(normalization="RMSNorm"))
        layer.submodules = replace(
            layer.submodules, input_layernorm=GraniteRMSNorm, pre_mlp_layernorm=GraniteRMSNorm
        )
        final_norm = GraniteRMSNorm
    layer.submodules = replace(layer.submodules, self_attn_bda=bda, mlp_bda=bda)
    _masked_self_attention(layer)
    return TransformerBlockSubmodules(layer_specs=[layer] * config.num_layers, layer_norm=final_norm)


def build_gpt(text_cfg, tensor_parallel_size: int = 1, sequence_parallel: bool = False,
              params_dtype: torch.dtype = torch.float32, fp8: str | None = None, fp8_recipe: str | None = None,
              use_te: bool | None = None, fusions=None, activation_checkpointing: bool = False):
    """A Granite GPTModel shard for this TP rank (needs ``parallel.init_model_parallel`` first).

    The embedding returns FULL-sequence [S, B, H] (``scatter_embedding_sequence_parallel=False``): audio is spliced
    into it and the multiplier applied before :func:`merged_decoder_input` scatters the sequence for SP.
    """
    from megatron.core.models.gpt.gpt_model import GPTModel

    use_te = have_te() if use_te is None else use_te
    config = transformer_config(text_cfg, tensor_parallel_size, sequence_parallel, params_dtype, fp8,
                                fp8_recipe, use_te, fusions, activation_checkpointing)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=block_spec(config, text_cfg.residual_multiplier, use_te),
        vocab_size=padded_vocab_size(text_cfg.vocab_size, tensor_parallel_size),
        max_sequence_length=text_cfg.max_position_embeddings,
        pre_process=True,
        post_process=True,
        parallel_output=True,
        share_embeddings_and_output_weights=bool(text_cfg.tie_word_embeddings),
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(rope_theta(text_cfg)),
        scatter_embedding_sequence_parallel=False,
    )
    gpt.granite_vocab_size = text_cfg.vocab_size
    gpt.granite_padding_idx = getattr(text_cfg, "pad_token_id", None)
    return gpt.to(params_dtype)


def text_embeddings(gpt, input_ids: torch.Tensor) -> torch.Tensor:
    """Token embeddings [B, S, H] (full vocab, all-reduced over TP) of ``input_ids`` [B, S].

    As HF's ``nn.Embedding(..., padding_idx=text_config.pad_token_id)``: lookups of the padding id pass no
    gradient to its row (the tied LM head still does)."""
    emb = gpt.embedding.word_embeddings(input_ids)
    pad = getattr(gpt, "granite_padding_idx", None)
    if pad is None or not emb.requires_grad:
        return emb
    return torch.where((input_ids == pad).unsqueeze(-1), emb.detach(), emb)


def merged_decoder_input(gpt, embeds: torch.Tensor, embedding_multiplier: float) -> torch.Tensor:
    """[B, S, H] merged text+audio embeddings -> GPTModel ``decoder_input`` [S(/TP under SP), B, H].

    Granite multiplies ALL input embeddings (audio included) by ``embedding_multiplier``; under sequence
    parallelism the sequence is then split over TP ranks (S must be a multiple of TP: see :func:`pad_to_tp`).
    """
    from megatron.core import tensor_parallel

    x = (embeds * embedding_multiplier).transpose(0, 1).contiguous()
    if gpt.config.sequence_parallel:
        x = tensor_parallel.scatter_to_sequence_parallel_region(x)
    return x


def pad_to_tp(length: int, tensor_parallel_size: int, sequence_parallel: bool, row_multiple: int = 1) -> int:
    """Sequence length rounded up so SP can split it evenly and, with ``row_multiple`` (FP8:
    FP8_ROW_MULTIPLE), so every GEMM's row count (this rank's sequence slice x batch) is a multiple of it.
    Extra positions go on the right, as masked keys after every real one: causal-safe, results unchanged."""
    split = tensor_parallel_size if sequence_parallel and tensor_parallel_size > 1 else 1
    multiple = split * row_multiple
    return -(-length // multiple) * multiple


def attention_mask_4d(attention_mask: torch.Tensor, query_len: int | None = None) -> torch.Tensor:
    """megatron mask [B, 1, Sq, Sk] (True = masked) = causal OR key padding, from ``attention_mask`` [B, Sk].

    For incremental decoding (``query_len`` < Sk) the queries are the LAST ``query_len`` positions.
    """
    keep = attention_mask.bool()  # [B, Sk]
    sk = keep.shape[1]
    sq = sk if query_len is None else query_len
    q_pos = torch.arange(sk - sq, sk, device=keep.device)[:, None]
    causal = torch.arange(sk, device=keep.device)[None, :] > q_pos  # [Sq, Sk]
    return causal[None, None] | ~keep[:, None, None, :]


def lm_logits(gpt, decoder_input: torch.Tensor, mask4d: torch.Tensor, inference_context=None) -> torch.Tensor:
    """RAW Granite LM-head logits (before ``logits_scaling``; ``sampling.scale_logits`` is the one place that
    divides), vocab-parallel [B, S, V_pad/TP], or gathered [B, 1, V_pad] with an ``inference_context``.

    Pad-vocab columns (>= the true vocab size) are set to the dtype's minimum so they carry no probability mass.
    """
    from megatron.core import parallel_state

    gather = inference_context is not None
    logits = gpt(input_ids=None, position_ids=None, attention_mask=mask4d, decoder_input=decoder_input,
                 inference_context=inference_context, runtime_gather_output=gather or None)
    width = logits.shape[-1]
    start = 0 if gather else parallel_state.get_tensor_model_parallel_rank() * width
    if start + width > gpt.granite_vocab_size:
        col = torch.arange(start, start + width, device=logits.device)
        logits = logits.masked_fill(col >= gpt.granite_vocab_size, torch.finfo(logits.dtype).min)
    return logits


def vocab_parallel_logprobs(logits: torch.Tensor, targets: torch.Tensor, return_entropy: bool = False):
    """log softmax(logits)[target] over a vocab split across TP ranks, differentiable; optional entropy.

    logits: [..., V/TP] this rank's vocab slice (already / logits_scaling / temperature); targets: [...] global ids.
    Returns (logprobs [...], entropy [...] or None). Uses megatron's ``reduce_from_tensor_model_parallel_region``
    (all-reduce forward, identity backward): the result is replicated on every TP rank and each rank back-props
    into its own slice, megatron's convention for a TP-replicated loss.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region as tp_sum

    tp = parallel_state.get_tensor_model_parallel_world_size()
    width = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * width
    lmax = logits.detach().max(-1, keepdim=True).values
    if tp > 1:
        dist.all_reduce(lmax, op=dist.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group())
    shifted = logits - lmax
    exp = shifted.exp()
    sum_exp = exp.sum(-1)
    local = targets - start
    inside = (local >= 0) & (local < width)
    picked = shifted.gather(-1, local.clamp(0, width - 1).unsqueeze(-1)).squeeze(-1) * inside
    if tp > 1:
        sum_exp, picked = tp_sum(sum_exp), tp_sum(picked)
    lse = sum_exp.log()
    logprobs = picked - lse
    if not return_entropy:
        return logprobs, None
    # pad-vocab columns hold -inf after the shift: zero them BEFORE the product (0 * -inf and its grad are nan)
    p_shift = (exp * torch.where(exp > 0, shifted, torch.zeros_like(shifted))).sum(-1)
    if tp > 1:
        p_shift = tp_sum(p_shift)
    return logprobs, lse - p_shift / sum_exp
