"""Per-GPU memory plan of a training recipe, before anything is built (``nemo-grpo train ... --dry-run``).

What a GRPO step holds on one GPU (``nemo_grpo.train.grpo``), and how this module sizes it (all sizes in BYTES;
``GiB`` = 2**30 bytes, the 80 GB H100 budget is 80e9 bytes):

static (the whole run)
  * weights: every parameter of the policy in the master dtype (fp32 for both backends unless
    ``model.backend_options.params_dtype: bf16`` on megatron); the LLM is split over tensor-parallel ranks, the
    encoder and projector are replicated. The HF backend also holds the checkpoint's audio LoRA adapter.
  * optimizer: AdamW's two fp32 moments per trainable parameter, plus an fp32 main copy when the parameters are
    bf16; sharded over data-parallel ranks with megatron's distributed optimizer.
  * reference: the frozen KL reference policy (a second full set of weights) when ``grpo.beta > 0``.
phase "train" (policy update, per micro-batch of ``trainer.micro_batch_size`` sequences)
  * gradients: one per trainable parameter (fp32: torch AdamW / megatron's fp32 grad buffer). From the second
    micro-batch on they coexist with the next micro-batch's activations (gradient accumulation), so they count in full.
  * autocast weight copies: under bf16 autocast torch caches a bf16 copy of every trainable fp32 weight a matmul
    reads, and backward keeps it alive (2 bytes per trainable parameter).
  * activations: the tensors autograd saves for backward over a sequence of ``data.max_prompt_tokens`` (audio
    tokens included) + ``grpo.max_new_tokens`` tokens per row (see :func:`layer_activation_bytes_per_token`); with
    ``model.activation_checkpointing`` only each layer's input plus one layer's recompute.
  * logits: the [micro-batch, T, V] buffers of the log-prob head (fp32; vocab 49160 makes them large).
phase "rollout" (sampling, no grad)
  * KV cache: B*G rows x layers x 2 (K and V) x kv_heads/TP x head_dim x (prompt + new tokens), compute dtype.
Total = static + the larger phase + a fixed runtime overhead (CUDA context, NCCL and allocator slack).

Shapes come from ``config.json`` in ``model.path`` when it exists, else from the released Granite Speech 3.3 presets
when the last component of ``model.path`` names one (``granite-speech-3.3-2b`` / ``-8b``). The planner itself
(:func:`plan_memory`) is a pure function of a :class:`ModelShapes` and the validated ``TrainConfig``.

Accuracy: the HF backend's training-phase terms are checked against measured CPU memory in fp32
(``tests/train/test_memory_plan.py``); the megatron activation terms follow the Transformer Engine layer's saved
tensors and are not measured here (no GPU in the test suite).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

GiB = 2**30
H100_BYTES = 80e9  # "80 GB" H100: 80e9 bytes (74.5 GiB)
CUDA_OVERHEAD_BYTES = 2 * GiB  # CUDA context (~0.5 GiB), NCCL buffers, caching-allocator fragmentation margin

# [mb, T, V] buffers alive at the end of the HF log-prob head's forward: raw logits, logits / scaling, log_softmax
# (saved for backward), and the entropy metric's exp() and product (nemo_grpo.policy.sampling.token_logprobs).
HF_LOGIT_BUFFERS = 5
# megatron's vocab-parallel log-prob (model.vocab_parallel_logprobs): scaled, shifted, exp, the entropy's where()
# and product, and its zeros_like; plus the full-sequence [mb, L, V/TP] raw logits in the compute dtype (x2: the
# transpose copy and the pad-column masked_fill).
MEGATRON_LOGIT_BUFFERS = 6
MEGATRON_FULL_LOGIT_BUFFERS = 2


@dataclass(frozen=True)
class ModelShapes:
    """What the plan needs of a Granite Speech checkpoint. Parameter counts are element counts (not bytes).

    hidden / ffn / vocab / heads / kv_heads / head_dim / layers: the Granite LLM's; tied: tied input/output
    embeddings; encoder_params / projector_params / llm_params: per component; lora_params: the checkpoint's audio
    LoRA adapter (0 without one); source: where the shapes came from (for the printed table).
    """

    hidden: int
    ffn: int
    vocab: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    encoder_params: int
    projector_params: int
    llm_params: int
    lora_params: int = 0
    source: str = ""

    @property
    def total_params(self) -> int:
        return self.encoder_params + self.projector_params + self.llm_params + self.lora_params


@dataclass(frozen=True)
class PlanItem:
    """One line of the plan: ``nbytes`` per GPU, the ``phase`` it belongs to ("static", "train", "rollout",
    "overhead") and how it was sized."""

    name: str
    nbytes: float
    phase: str
    note: str = ""


@dataclass
class MemoryPlan:
    """The per-GPU plan. ``total_bytes`` = static + max(train, rollout) + overhead; ``budget_bytes`` the GPU's."""

    items: list[PlanItem]
    world_size: int
    tensor_parallel: int
    data_parallel: int
    micro_batch: int
    sequence_tokens: int
    rollout_rows: int
    compute_dtype: str
    budget_bytes: float = H100_BYTES
    notes: list[str] = field(default_factory=list)

    def phase_bytes(self, phase: str) -> float:
        return float(sum(i.nbytes for i in self.items if i.phase == phase))

    @property
    def peak_phase(self) -> str:
        return "train" if self.phase_bytes("train") >= self.phase_bytes("rollout") else "rollout"

    @property
    def total_bytes(self) -> float:
        return (self.phase_bytes("static") + max(self.phase_bytes("train"), self.phase_bytes("rollout"))
                + self.phase_bytes("overhead"))

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes

    def item(self, name: str) -> PlanItem:
        return next(i for i in self.items if i.name == name)


# ----------------------------------------------------------------------------------------------- shapes ---------


def _lora_params(text_cfg: Any, r: int, targets: list[str]) -> int:
    """Elements of a LoRA adapter of rank ``r`` on the LLM's ``targets`` (q_proj / k_proj / v_proj / o_proj)."""
    h, hd = text_cfg.hidden_size, getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // \
        text_cfg.num_attention_heads
    out = {"q_proj": text_cfg.num_attention_heads * hd, "k_proj": text_cfg.num_key_value_heads * hd,
           "v_proj": text_cfg.num_key_value_heads * hd, "o_proj": h}
    ins = {"o_proj": text_cfg.num_attention_heads * hd}
    return text_cfg.num_hidden_layers * sum(r * (ins.get(t, h) + out[t]) for t in targets if t in out)


def shapes_from_config(config: Any, lora: dict | None = None, source: str = "") -> ModelShapes:
    """A ``GraniteSpeechConfig`` (+ the audio adapter's ``{"r", "target_modules"}``, None = no adapter) ->
    ``ModelShapes``. Parameter counts come from a meta-device model (exact, allocates nothing)."""
    import torch
    from transformers import GraniteSpeechForConditionalGeneration

    with torch.device("meta"):
        model = GraniteSpeechForConditionalGeneration(config)
    inner = model.model
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    llm = count(inner.language_model) + (0 if config.text_config.tie_word_embeddings else count(model.lm_head))
    t = config.text_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    return ModelShapes(
        hidden=t.hidden_size, ffn=t.intermediate_size, vocab=t.vocab_size, layers=t.num_hidden_layers,
        heads=t.num_attention_heads, kv_heads=t.num_key_value_heads, head_dim=head_dim,
        tied=bool(t.tie_word_embeddings), encoder_params=count(inner.encoder), projector_params=count(inner.projector),
        llm_params=llm, lora_params=_lora_params(t, int(lora["r"]), list(lora["target_modules"])) if lora else 0,
        source=source)


def load_shapes(model_path: str) -> ModelShapes:
    """Shapes of ``model.path``: its ``config.json`` (+ ``adapter_config.json``) when the dir has one, else the
    released preset its last path component names. Raises ValueError naming ``model.path`` otherwise."""
    from nemo_grpo.policy import presets

    cfg_file = os.path.join(model_path, "config.json")
    if os.path.isfile(cfg_file):
        from transformers import GraniteSpeechConfig

        config = GraniteSpeechConfig.from_pretrained(model_path)
        lora = None
        adapter = os.path.join(model_path, "adapter_config.json")
        if getattr(config, "has_lora_adapter", False) and os.path.isfile(adapter):
            with open(adapter) as f:
                lora = json.load(f)
        return shapes_from_config(config, lora, source=cfg_file)
    name = os.path.basename(os.path.normpath(model_path))
    if name in presets.PRESETS:
        return shapes_from_config(presets.preset_config(name), presets.LORA, source=f"preset {name}")
    raise ValueError(f"config key 'model.path': {model_path!r} has no config.json and does not name a known preset "
                     f"({', '.join(presets.PRESETS)}): cannot plan memory")


# ----------------------------------------------------------------------------------------------- activations ----


def layer_activation_bytes_per_token(s: ModelShapes, backend: str, compute: int, residual: int, tp: int = 1,
                                     sequence_parallel: bool = False) -> float:
    """Bytes autograd saves per token in ONE Granite decoder layer for backward, on one GPU.

    compute: bytes per element of matmul inputs/outputs (2 under bf16 autocast or bf16 params, 4 in fp32);
    residual: bytes of the residual stream (the master dtype: Granite keeps an fp32 residual under autocast).

    hf (transformers' GraniteDecoderLayer, sdpa): each RMSNorm saves its fp32 input and normalised output (2 x
    residual x H, twice); under autocast each of q/k/v/gate/up casts its input separately (5 x compute x H); sdpa
    with a padding mask repeats K/V to all heads and saves q, k, v, out (4 x compute x heads*head_dim), o_proj its
    contiguous input (1 x); SwiGLU saves gate, silu(gate), up and the product (4 x compute x ffn).
    megatron (Transformer Engine layer spec): LayerNormLinear saves its input (residual) and normalised output
    (compute) per norm; fused attention saves q, k, v (kv heads only) and out; fc1's [2 x ffn] output and the
    SwiGLU product. Head- and ffn-sized tensors are split over TP; H-sized ones too under sequence parallelism.
    """
    h, f, qd, kvd = s.hidden, s.ffn, s.heads * s.head_dim, s.kv_heads * s.head_dim
    if backend == "hf":
        cast = 5 * compute * h if compute != residual else 0
        return 4 * residual * h + cast + 5 * compute * qd + 4 * compute * f
    split_h = tp if sequence_parallel else 1
    return (2 * (residual + compute) * h / split_h
            + compute * (2 * qd + 2 * kvd) / tp + 3 * compute * f / tp)


def activation_bytes(s: ModelShapes, backend: str, micro_batch: int, seq: int, new_tokens: int, compute: int,
                     residual: int, checkpointing: bool, tp: int = 1, sequence_parallel: bool = False,
                     entropy: bool = True) -> tuple[float, float]:
    """(decoder-stack activations, log-prob-head logits) in bytes for one micro-batch of ``micro_batch`` rows of
    ``seq`` tokens, ``new_tokens`` of them scored (the completion).

    Without checkpointing every layer keeps :func:`layer_activation_bytes_per_token`; with it each layer keeps only
    its input ([mb, seq, H] in the residual dtype) and one layer is recomputed at a time during backward. Outside
    the layers: the merged embeddings (x3: gathered prompt, concatenated, multiplied) and the final norm (x2).
    """
    tokens = micro_batch * seq
    per_layer = layer_activation_bytes_per_token(s, backend, compute, residual, tp, sequence_parallel) * tokens
    h_bytes = residual * s.hidden * tokens
    if checkpointing:
        stack = s.layers * h_bytes / (tp if (backend == "megatron" and sequence_parallel) else 1) + per_layer
    else:
        stack = s.layers * per_layer
    stack += 5 * h_bytes  # embeddings in, final norm out
    vocab = s.vocab / tp if backend == "megatron" else s.vocab
    if backend == "hf":
        logits = (HF_LOGIT_BUFFERS if entropy else HF_LOGIT_BUFFERS - 2) * micro_batch * new_tokens * vocab * 4
    else:
        logits = (MEGATRON_LOGIT_BUFFERS * micro_batch * new_tokens * vocab * 4
                  + MEGATRON_FULL_LOGIT_BUFFERS * micro_batch * seq * vocab * compute)
    return float(stack), float(logits)


def kv_cache_bytes(s: ModelShapes, rows: int, length: int, dtype_bytes: int, tp: int = 1) -> float:
    """Rollout KV cache: rows (B*G) x layers x 2 (K, V) x kv_heads/TP x head_dim x length x dtype_bytes."""
    return float(rows * s.layers * 2 * (s.kv_heads / tp) * s.head_dim * length * dtype_bytes)


# ----------------------------------------------------------------------------------------------- the plan -------


def _prompts_per_batch(cfg: Any) -> int:
    train = (cfg.data or {}).get("train") or {}
    return int(train.get("batch_size") or 1)


def plan_memory(shapes: ModelShapes, cfg: Any, world_size: int = 1, device: str = "cuda",
                budget_bytes: float = H100_BYTES) -> MemoryPlan:
    """The per-GPU memory plan of the validated ``TrainConfig`` ``cfg`` on ``world_size`` GPUs (TP from the
    recipe, DP = world / TP). ``device="cpu"`` plans what the same config holds on CPU (fp32, no autocast, no
    CUDA overhead), which is what the tests measure. Pure: reads only its arguments. Sizes in bytes."""
    m, g, t = cfg.model, cfg.grpo, cfg.trainer
    backend = m.backend
    tp = int(m.tensor_parallel_size) if backend == "megatron" else 1
    if world_size < 1 or world_size % tp:
        raise ValueError(f"world size {world_size} is not a multiple of model.tensor_parallel_size={tp}")
    dp = world_size // tp
    opts = m.backend_options or {}
    master = 2 if backend == "megatron" and opts.get("params_dtype") == "bf16" else 4
    gpu = device.startswith("cuda")
    autocast = gpu and m.precision in ("auto", "bf16")
    compute = 2 if (autocast or master == 2) else 4
    sp = bool(m.sequence_parallel) and tp > 1 and backend == "megatron"
    dist_opt = backend == "megatron" and bool(opts.get("use_distributed_optimizer", True))
    lora_trainable = backend == "hf" and m.lora is not None

    # parameters on this GPU (elements): the LLM split over TP, encoder/projector replicated
    llm = shapes.llm_params / tp
    lora = shapes.lora_params if backend == "hf" else 0  # megatron merges the audio adapter into q/v at load
    params = shapes.encoder_params + shapes.projector_params + llm + lora
    trainable = ((0 if m.freeze_encoder else shapes.encoder_params)
                 + (shapes.projector_params if m.train_projector else 0) + (llm if m.train_llm else 0)
                 + (lora if lora_trainable else 0))

    seq = int((cfg.data or {}).get("max_prompt_tokens", 256)) + int(g.max_new_tokens)
    rl = cfg.algorithm in ("grpo", "mp_grpo")
    prompts = _prompts_per_batch(cfg)
    rows = prompts * (g.num_generations - 1 if cfg.algorithm == "mp_grpo" else g.num_generations)
    sequences = prompts * g.num_generations if rl else prompts  # rows scored per step (mp_grpo: + the reference)
    mb = min(int(t.micro_batch_size), sequences)
    dt = {2: "bf16", 4: "fp32"}

    items = [PlanItem("weights", params * master, "static",
                      f"{params / 1e9:.3f} B params x {master} B ({dt[master]}); LLM / TP={tp}")]
    opt_per = 8 + (4 if master == 2 else 0)
    items.append(PlanItem("optimizer (Adam)", trainable * opt_per / (dp if dist_opt else 1), "static",
                          f"{trainable / 1e9:.3f} B trainable x {opt_per} B (m, v" + (", fp32 main" if master == 2
                                                                                    else "") + ")"
                          + (f" / DP={dp} (distributed optimizer)" if dist_opt else "")))
    if rl and g.beta > 0:
        items.append(PlanItem("reference policy", params * master, "static",
                              f"frozen copy (grpo.beta={g.beta})"))
    items.append(PlanItem("gradients", trainable * 4, "train", "fp32, full during gradient accumulation"))
    if autocast and master == 4:
        items.append(PlanItem("autocast bf16 weight copies", trainable * 2, "train",
                              "cached by autocast, kept for backward"))
    stack, logits = activation_bytes(shapes, backend, mb, seq, int(g.max_new_tokens), compute, master,
                                     bool(m.activation_checkpointing), tp, sp, entropy=rl)
    items.append(PlanItem("activations", stack, "train",
                          f"mb={mb} x {seq} tokens, {dt[compute]}, checkpointing "
                          f"{'on' if m.activation_checkpointing else 'off'}"))
    items.append(PlanItem("logits", logits, "train", f"[{mb}, {g.max_new_tokens}, {shapes.vocab}"
                          + (f"/{tp}" if backend == "megatron" and tp > 1 else "") + "] fp32 buffers"))
    if rl:
        items.append(PlanItem("rollout KV cache", kv_cache_bytes(shapes, rows, seq, compute, tp), "rollout",
                              f"{rows} rows (B={prompts} x G) x {seq} tokens, {dt[compute]}"))
    if gpu:
        items.append(PlanItem("CUDA context + allocator slack", CUDA_OVERHEAD_BYTES, "overhead", "fixed estimate"))
    notes = []
    if backend == "hf" and world_size > 1:
        notes.append(f"HF backend: {world_size} data-parallel replicas, each holding the full model")
    return MemoryPlan(items=items, world_size=world_size, tensor_parallel=tp, data_parallel=dp, micro_batch=mb,
                      sequence_tokens=seq, rollout_rows=rows if rl else 0, compute_dtype=dt[compute],
                      budget_bytes=budget_bytes, notes=notes)


def format_plan(plan: MemoryPlan, shapes: ModelShapes | None = None) -> str:
    """The plan as a fixed-width table in GiB, with the total against the budget."""
    lines = []
    if shapes is not None:
        lines.append(f"memory plan per GPU (shapes: {shapes.source}; {shapes.total_params / 1e9:.2f} B params)")
    lines.append(f"world {plan.world_size} = TP {plan.tensor_parallel} x DP {plan.data_parallel}; micro-batch "
                 f"{plan.micro_batch}; sequence {plan.sequence_tokens} tokens; compute {plan.compute_dtype}")
    lines.append(f"{'component':<32}{'phase':<10}{'GiB':>9}  note")
    for i in plan.items:
        lines.append(f"{i.name:<32}{i.phase:<10}{i.nbytes / GiB:>9.2f}  {i.note}")
    total = plan.total_bytes
    lines.append(f"{'total (static + ' + plan.peak_phase + ' + overhead)':<42}{total / GiB:>9.2f}  "
                 f"= {total / 1e9:.1f} GB of {plan.budget_bytes / 1e9:.0f} GB (H100): "
                 + ("fits" if plan.fits else "DOES NOT FIT"))
    lines.extend(f"note: {n}" for n in plan.notes)
    return "\n".join(lines)
