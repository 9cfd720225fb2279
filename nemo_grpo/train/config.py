"""The typed training schema: every recipe in ``conf/`` is composed by hydra, then validated into these dataclasses.

Defaults live here and only here (the YAML recipes state what differs from them, plus the paper's settings for
readability). Unknown keys, wrong types and out-of-range values raise ``ValueError`` naming the dotted key.

Loading: ``load_config(path, overrides)`` composes ``path`` with hydra (its ``defaults:`` list may pull groups such
as ``model: granite_speech_2b`` or ``data: librisqa`` from the config's own directory), applies hydra-style
``key=value`` overrides (``data=covost2_en_de`` picks a group option; ``trainer.max_steps=5`` sets a value, also when
the recipe does not mention the key), then validates.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

ALGORITHMS = ("grpo", "mp_grpo", "sft")


@dataclass
class ModelConfig:
    """Which policy to train. ``path`` is a local HF Granite Speech checkpoint dir (the only required key)."""

    path: str = ""
    backend: Literal["hf", "megatron"] = "hf"
    # "auto": bfloat16 autocast on GPU, float32 on CPU (bf16 on CPU is slow and changes sampling at rounding level);
    # "bf16": bfloat16 autocast on any device, CPU included (runtime.use_bf16).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: str = "auto"  # "auto" -> cuda:<local rank> when available, else cpu
    freeze_encoder: bool = True
    train_projector: bool = True
    train_llm: bool = True
    lora: dict[str, Any] | None = None  # None = full fine-tuning of the trainable parts; else passed to the backend
    tensor_parallel_size: int = 1  # megatron backend: TP degree (world = TP x DP); hf requires 1
    sequence_parallel: bool = False  # megatron backend
    # Recompute each LLM decoder layer in backward instead of keeping its activations (HF: gradient checkpointing
    # of the Granite layers; megatron: full uniform recompute). Same results, ~1/3 more compute; see
    # ``nemo-grpo train ... --dry-run`` for the memory it saves.
    activation_checkpointing: bool = False
    # backend-specific options passed through untouched (megatron: tensor_model_parallel_size, sequence_parallel...)
    backend_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class GRPOConfig:
    """Section 3 of the paper. Defaults are the paper's (G=8, beta=0.02, eps=0.2, temperature 1, <=200 new tokens)."""

    num_generations: int = 8  # G (mp_grpo: G-1 sampled + 1 reference)
    beta: float = 0.02  # KL weight; 0 skips the reference policy entirely
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None -> epsilon (symmetric clipping, as in the paper)
    loss_type: Literal["dapo", "grpo"] = "dapo"  # paper: dapo (token-level, Eq. 3); grpo = sequence mean
    num_iterations: int = 1  # mu: policy updates per rollout batch
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 200
    scale_rewards: bool = True  # divide by the group std (Eq. 1); False = Dr.GRPO
    dynamic_sampling: bool = False  # DAPO: drop zero-variance groups, refill the batch from fresh prompts
    dynamic_sampling_max_rounds: int = 4  # rollouts per step at most while refilling (then train on what there is)
    mask_truncated_completions: bool = False  # overlong masking: truncated completions get no loss
    off_policy_in_group_stats: bool = True  # mp_grpo: the reference's reward enters the group mean/std
    policy_shaping_gamma: float | None = None  # mp_grpo: f(p) = p / (p + gamma) on off-policy tokens (LUFFY)
    # log pi_old of the PPO ratio: "sampled" = the sampler's log-probs (Completions.logprobs); "recompute" = one
    # no-grad scoring pass of the policy before the updates (verl, NeMo-RL), so the first ratio is exactly 1 even
    # when sampling and training numerics differ (bf16); "auto" = recompute unless the precision is fp32
    # (``resolve_old_logprobs``).
    old_logprobs: Literal["auto", "sampled", "recompute"] = "auto"
    # Truncated importance sampling for the sampler/trainer mismatch (TRL's token_truncate, verl's TIS): each
    # on-policy token's policy-gradient term times min(exp(recomputed - sampled log-prob), tis_cap), detached.
    # null = off; needs old_logprobs resolved to recompute.
    tis_cap: float | None = None


def resolve_old_logprobs(g: GRPOConfig, bf16: bool) -> Literal["sampled", "recompute"]:
    """Where log pi_old comes from, ``grpo.old_logprobs`` with "auto" resolved: recompute under bf16 (the sampler's
    log-probs differ from the training pass's at rounding level), sampled in fp32 (they agree; no extra pass).
    ``bf16`` is the effective precision (``runtime.use_bf16``). Raises ValueError for ``grpo.tis_cap`` without a
    recompute pass (the weight needs the trainer's log-prob of the rollout before any update)."""
    mode = g.old_logprobs if g.old_logprobs != "auto" else ("recompute" if bf16 else "sampled")
    if g.tis_cap is not None and mode == "sampled":
        raise ValueError(f"config key 'grpo.tis_cap' needs grpo.old_logprobs resolved to recompute, got sampled "
                         f"(grpo.old_logprobs={g.old_logprobs!r}, effective precision "
                         f"{'bf16' if bf16 else 'fp32'}): set grpo.old_logprobs=recompute or grpo.tis_cap=null")
    return mode


@dataclass
class OptimConfig:
    """AdamW through ``Policy.configure_optimizer`` with warmup then a decay schedule over ``trainer.max_steps``."""

    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    warmup_ratio: float = 0.0  # fraction of optimizer steps spent in linear warmup
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.0  # final lr = lr * min_lr_ratio


@dataclass
class TrainerConfig:
    max_steps: int = 1000  # rollout batches (GRPO) / batches (SFT)
    micro_batch_size: int = 16  # sequences per forward/backward (gradient accumulation beyond that)
    log_every: int = 1
    val_every: int = 100  # 0 = never validate during training
    val_max_batches: int | None = None  # None = the whole validation split
    save_every: int = 100  # 0 = only the final checkpoint
    keep_last: int = 2  # step checkpoints kept (the best model is kept separately)
    test_at_end: bool = True  # decode the test split with the best model and write outputs + the table
    # torch.distributed / megatron process-group timeout: long enough for rank 0 to write a ~130 GB (8B + optimizer)
    # checkpoint or HF export while the other ranks wait in a collective (torch's default is 10-30 min)
    dist_timeout_minutes: float = 120.0


@dataclass
class EvalConfig:
    """Evaluation decoding (paper: top-p 0.9, temperature 0.9 for all models) and the metric that picks the best."""

    temperature: float = 0.9
    top_p: float = 0.9
    max_new_tokens: int = 200
    metric: Literal["bleu"] = "bleu"  # validation metric that selects the best checkpoint (corpus BLEU)
    # test-table options, passed to nemo_grpo.evaluation.corpus_metrics
    lang: str = "en"  # target language: "de" for CoVoST2 en-de (Unicode ROUGE tokenizer)
    bleu_tokenize: str = "13a"
    bertscore_model: str = "none"  # a local model dir, "minilm" (test model, not comparable to the paper), "none"
    seed: int = 1234  # evaluation sampling seed (fixed, so every validation of a run decodes comparably)


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "nemo_grpo"
    name: str | None = None
    mode: Literal["online", "offline", "disabled"] = "offline"


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress_bar: bool = True
    num_sample_completions: int = 2  # completions (with references) written to the log per logged step
    plot: bool = True  # PNG of reward / validation curves at the end


@dataclass
class TrainConfig:
    algorithm: Literal["grpo", "mp_grpo", "sft"] = "grpo"
    seed: int = 0
    output_dir: str = "runs/default"
    resume: str = "auto"  # "auto" (latest checkpoint in output_dir if any), "never", or a checkpoint dir
    model: ModelConfig = field(default_factory=ModelConfig)
    data: dict[str, Any] = field(default_factory=dict)  # validated by nemo_grpo.data (conf/data/*.yaml)
    reward: Any = "bleu"  # a nemo_grpo.rewards.build_reward spec: "bleu", {bleu: 1.0}, [{name: bleu, weight: 1}, ...]
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# validation


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` coerced to ``tp`` (ints accepted for floats, lists for tuples) or raise naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"config key '{key}': {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ValueError(f"config key '{key}' must not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0])
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, key)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key '{key}' must be a mapping, got {type(value).__name__}")
        return dict(value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key '{key}' must be a list, got {type(value).__name__}")
        args = typing.get_args(tp)
        if origin is tuple:
            if len(value) != len(args):
                raise ValueError(f"config key '{key}' must have {len(args)} items, got {len(value)}")
            return tuple(_check_type(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        return [_check_type(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config key '{key}' must be true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"config key '{key}' must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported schema type {tp!r} for '{key}'")  # a bug in this file, not a user error


def _from_dict(cls: type, raw: Any, prefix: str = "") -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"config key '{prefix or '<root>'}' must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else str(k)
            raise ValueError(f"unknown config key '{where}' (known: {', '.join(sorted(names))})")
    kwargs = {k: _check_type(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in raw.items()}
    return cls(**kwargs)


def _validate_ranges(cfg: TrainConfig) -> None:
    def positive(key: str, v: float, allow_zero: bool = False) -> None:
        if v < 0 or (v == 0 and not allow_zero):
            raise ValueError(f"config key '{key}' must be {'>= 0' if allow_zero else '> 0'}, got {v}")

    g, o, t = cfg.grpo, cfg.optim, cfg.trainer
    if not cfg.model.path:
        raise ValueError("config key 'model.path' is required (a local Granite Speech checkpoint dir)")
    min_g = 3 if cfg.algorithm == "mp_grpo" else 2
    if g.num_generations < min_g:
        raise ValueError(f"config key 'grpo.num_generations' must be >= {min_g} for {cfg.algorithm}")
    positive("grpo.beta", g.beta, allow_zero=True)
    positive("grpo.epsilon", g.epsilon)
    positive("grpo.num_iterations", g.num_iterations)
    positive("grpo.temperature", g.temperature)
    positive("grpo.max_new_tokens", g.max_new_tokens)
    positive("grpo.dynamic_sampling_max_rounds", g.dynamic_sampling_max_rounds)
    if g.tis_cap is not None and not g.tis_cap > 0:
        raise ValueError(f"config key 'grpo.tis_cap' must be > 0 or null, got {g.tis_cap}")
    if g.old_logprobs == "sampled":  # auto resolves with the device (runtime.use_bf16), at the start of training
        resolve_old_logprobs(g, bf16=False)
    if not 0 < g.top_p <= 1:
        raise ValueError(f"config key 'grpo.top_p' must be in (0, 1], got {g.top_p}")
    if not 0 < cfg.eval.top_p <= 1:
        raise ValueError(f"config key 'eval.top_p' must be in (0, 1], got {cfg.eval.top_p}")
    positive("eval.temperature", cfg.eval.temperature)
    positive("optim.lr", o.lr)
    positive("optim.max_grad_norm", o.max_grad_norm, allow_zero=True)
    if not 0 <= o.warmup_ratio < 1:
        raise ValueError(f"config key 'optim.warmup_ratio' must be in [0, 1), got {o.warmup_ratio}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ValueError(f"config key 'optim.min_lr_ratio' must be in [0, 1], got {o.min_lr_ratio}")
    positive("trainer.max_steps", t.max_steps)
    positive("trainer.micro_batch_size", t.micro_batch_size)
    positive("trainer.log_every", t.log_every)
    positive("trainer.val_every", t.val_every, allow_zero=True)
    positive("trainer.save_every", t.save_every, allow_zero=True)
    positive("trainer.keep_last", t.keep_last)
    positive("trainer.dist_timeout_minutes", t.dist_timeout_minutes)
    if cfg.resume not in ("auto", "never") and not os.path.isdir(cfg.resume):
        raise ValueError(f"config key 'resume' must be auto, never or an existing checkpoint dir, got {cfg.resume!r}")


def validate(raw: dict[str, Any]) -> TrainConfig:
    """A plain dict (e.g. a composed hydra config as a container) -> a validated ``TrainConfig``."""
    cfg = _from_dict(TrainConfig, raw)
    _validate_ranges(cfg)
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# hydra composition


def _hydra_overrides(config_dir: str, overrides: list[str]) -> list[str]:
    """Value overrides become ``++key=value`` (set even when the recipe omits the key: the schema knows it and
    rejects typos); ``group=option`` for a config group directory next to the recipe is kept as a group choice."""
    out = []
    for ov in overrides:
        if "=" not in ov:
            raise ValueError(f"override {ov!r} is not key=value")
        key = ov.split("=", 1)[0]
        if key.startswith(("+", "~")) or ("." not in key and os.path.isdir(os.path.join(config_dir, key))):
            out.append(ov)
        else:
            out.append("++" + ov)
    return out


def compose(config_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Compose ``config_path`` (a recipe YAML) with hydra and return a plain resolved dict (not yet validated)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    path = os.path.abspath(config_path)
    if not os.path.isfile(path):
        raise ValueError(f"config file not found: {config_path}")
    config_dir, name = os.path.split(path)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base=None):
            composed = hydra_compose(config_name=os.path.splitext(name)[0],
                                     overrides=_hydra_overrides(config_dir, list(overrides or [])))
    except ValueError:
        raise
    except Exception as e:  # hydra's own errors (missing group option, bad override grammar) -> the user's error
        raise ValueError(f"cannot compose {config_path}: {e}") from e
    finally:
        GlobalHydra.instance().clear()
    raw = OmegaConf.to_container(composed, resolve=True)
    raw.pop("hydra", None)
    return raw


def load_config(config_path: str, overrides: list[str] | None = None) -> TrainConfig:
    """Compose + validate. Raises ValueError naming the offending key."""
    return validate(compose(config_path, overrides))
