"""What the GRPO and SFT recipes share: the policy factory, device/precision, the learning-rate schedule, a
resumable data stream, RNG isolation and data-parallel reductions.

Data parallelism without handles to the DP group: the policy reports ``data_parallel() -> (dp_rank, dp_size)``;
ranks of one DP replica (tensor-parallel peers) see identical data, so a SUM over the whole world equals
``world / dp_size`` times the sum over DP ranks. ``dp_sum`` divides that factor out (exact for counts).
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import math
import os
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from nemo_grpo.policy.base import Policy

log = logging.getLogger(__name__)

# backend name -> "module:callable(model_cfg, *, device, trainable, seed) -> Policy". The only place that knows
# backends by name: recipes call build_policy and never branch on model.backend.
BACKENDS: dict[str, str] = {
    "hf": "nemo_grpo.train.runtime:_build_hf",
    "megatron": "nemo_grpo.policy.megatron:build_policy",
}


# ------------------------------------------------------------------------------------------- distributed -------


def init_distributed_from_env(timeout_minutes: float = 120.0) -> None:
    """Create the default process group when launched by torchrun with WORLD_SIZE > 1 (idempotent).

    ``timeout_minutes`` (``trainer.dist_timeout_minutes``): how long a collective may wait, e.g. for rank 0
    writing a checkpoint; torch's default would abort a multi-node 8B run at its first checkpoint."""
    import torch.distributed as dist

    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def layout_summary(model_cfg: Any, world_size: int, dp_size: int) -> str:
    """One line for the start of a run: how the world is split and which numerics it trains with."""
    opts = dict(getattr(model_cfg, "backend_options", None) or {})
    tp = world_size // max(dp_size, 1)
    sp = bool(getattr(model_cfg, "sequence_parallel", False)) and tp > 1
    fp8 = opts.get("fp8")
    fp8_text = f"{fp8} ({opts.get('fp8_recipe') or 'delayed'} recipe)" if fp8 else "off"
    return (f"layout: backend {model_cfg.backend}, world {world_size} = TP {tp} x DP {dp_size}, "
            f"sequence parallel {'on' if sp else 'off'}, FP8 {fp8_text}, precision {model_cfg.precision}")


def world() -> tuple[int, int]:
    """(global rank, world size); (0, 1) without torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def barrier() -> None:
    if world()[1] > 1:
        torch.distributed.barrier()


def dp_sum(x: torch.Tensor, dp_size: int) -> torch.Tensor:
    """Sum of ``x`` over data-parallel ranks (a new tensor; see the module docstring)."""
    _, w = world()
    if w == 1:
        return x.clone()
    y = x.detach().clone()
    torch.distributed.all_reduce(y)
    return y / (w // dp_size)


def dp_max(x: torch.Tensor) -> torch.Tensor:
    """Element-wise max of ``x`` over all ranks (tensor-parallel copies hold equal values, so this is the max over
    data-parallel ranks; a new tensor)."""
    _, w = world()
    if w == 1:
        return x.clone()
    y = x.detach().clone()
    torch.distributed.all_reduce(y, op=torch.distributed.ReduceOp.MAX)
    return y


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (a list with one entry per global rank)."""
    _, w = world()
    if w == 1:
        return [obj]
    out: list[Any] = [None] * w
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    _, w = world()
    if w == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------------------------------- policy -------------


def pick_device(spec: str) -> torch.device:
    if spec != "auto":
        return torch.device(spec)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def use_bf16(precision: str, device: torch.device) -> bool:
    """The effective precision: bf16 autocast for "bf16" on any device, for "auto" on GPU only (on CPU bf16 is
    slow and changes sampling at rounding level, so "auto" stays fp32 there; "bf16" on CPU is what makes the bf16
    numerics, e.g. the sampler/trainer log-prob mismatch, testable without a GPU); "fp32" never."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def bf16_numerics(model_cfg: Any, device: torch.device) -> bool:
    """True when the policy computes in bf16: bf16 autocast (``use_bf16``) or bf16 parameters
    (``model.backend_options.params_dtype: bf16``, the 8B megatron recipes). What ``grpo.old_logprobs: auto``
    keys on: in bf16 the sampler's log-probs differ from the training pass's."""
    params_bf16 = (getattr(model_cfg, "backend_options", None) or {}).get("params_dtype") == "bf16"
    return use_bf16(model_cfg.precision, device) or params_bf16


def autocast(enabled: bool, device: torch.device | str = "cuda") -> contextlib.AbstractContextManager:
    """bfloat16 autocast on ``device``'s type (weights stay fp32 masters) when ``enabled``, else a no-op."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def _build_hf(model_cfg: Any, *, device: torch.device, trainable: bool, seed: int, **_groups) -> Policy:
    from nemo_grpo.policy.hf import HFGraniteSpeechPolicy

    policy = HFGraniteSpeechPolicy.from_pretrained(
        model_cfg.path, device=device, dtype=torch.float32,
        freeze_encoder=model_cfg.freeze_encoder or not trainable,
        train_projector=model_cfg.train_projector and trainable,
        train_llm=model_cfg.train_llm and trainable,
        lora=model_cfg.lora if trainable else None)
    policy.activation_checkpointing = bool(model_cfg.activation_checkpointing) and trainable
    return policy


def build_policy(model_cfg: Any, *, trainable: bool = True, seed: int = 0,
                 dist_timeout_minutes: float | None = None) -> Policy:
    """The one policy factory: ``model_cfg.backend`` -> a ``Policy``. ``trainable=False`` builds a frozen copy
    (the KL reference, evaluation). Weights are fp32 masters; bf16 is autocast by the recipe (``use_bf16``).
    ``dist_timeout_minutes`` (``trainer.dist_timeout_minutes``) reaches backends that create process groups."""
    import importlib

    if model_cfg.backend not in BACKENDS:
        raise ValueError(f"config key 'model.backend': unknown backend {model_cfg.backend!r}; known {list(BACKENDS)}")
    if not os.path.isdir(model_cfg.path):
        raise ValueError(f"config key 'model.path': {model_cfg.path!r} is not a directory")
    mod, _, fn = BACKENDS[model_cfg.backend].partition(":")
    builder = getattr(importlib.import_module(mod), fn)
    extra = {} if dist_timeout_minutes is None else {"dist_timeout_minutes": dist_timeout_minutes}
    policy = builder(model_cfg, device=pick_device(model_cfg.device), trainable=trainable, seed=seed, **extra)
    if not trainable:
        for p in policy.trainable_parameters():
            p.requires_grad_(False)
        policy.eval()
    return policy


# ------------------------------------------------------------------------------------------- schedule / rng -----


def lr_at(step: int, total_steps: int, cfg: Any) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``: linear warmup over
    ``warmup_ratio * total_steps`` steps, then cosine / linear decay to ``lr * min_lr_ratio`` (or constant)."""
    warmup = int(round(cfg.warmup_ratio * total_steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    frac = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * frac)) if cfg.schedule == "cosine" else 1.0 - frac
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay)


def derive_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


@contextlib.contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Run a block with python/numpy/torch global RNGs seeded from ``seed``, restoring the caller's states after.

    Data loading and validation draw randomness here, so training randomness (sampling, dropout) does not depend on
    how many batches were loaded or validations run — what makes resume (fast-forwarding the data) exact."""
    py, npy, pt = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(pt)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class DataStream:
    """Endless batches over epochs of a finite loader, with a resumable position ``(epoch, index)``.

    make_loader(epoch) -> a fresh iterable for that epoch (the loader reshuffles with its own seed per epoch).
    Resuming fast-forwards ``index`` batches of the current epoch (replay, not random access: lhotse/NeMo loaders
    have no cheap seek), each batch drawn under the same isolated RNG seed as the first time.
    """

    def __init__(self, make_loader: Callable[[int], Iterable], seed: int, name: str = "train"):
        self.make_loader, self.seed, self.name = make_loader, seed, name
        self.epoch, self.index = 0, 0
        self._it: Iterator | None = None
        self.loaders: list[Any] = []  # every loader opened by this process (their ``skips`` reports, if any)

    def _open(self) -> None:
        with isolated_rng(derive_seed(self.seed, self.name, self.epoch)):
            loader = self.make_loader(self.epoch)
            self.loaders.append(loader)
            self._it = iter(loader)

    def skip_summary(self) -> dict[str, Any] | None:
        """Merged ``skips`` (nemo_grpo.data SkipReport) of the loaders this process opened, or None."""
        reports = [ld.skips for ld in self.loaders if hasattr(ld, "skips")]
        if not reports:
            return None
        total = reports[0].__class__(f"{self.name} data")
        for r in reports:
            total.merge(r)
        return total.to_dict() | {"summary": total.summary()}

    def _draw(self) -> Any:
        if self._it is None:
            self._open()
        with isolated_rng(derive_seed(self.seed, self.name, self.epoch, self.index)):
            return next(self._it)

    def __iter__(self) -> "DataStream":
        return self

    def __next__(self) -> Any:
        try:
            batch = self._draw()
        except StopIteration:
            if self.index == 0:
                raise ValueError(f"data split {self.name!r} yields no batches (empty or everything skipped)")
            self.epoch, self.index, self._it = self.epoch + 1, 0, None
            batch = self._draw()
        self.index += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index, self._it = int(state["epoch"]), 0, None
        for _ in range(int(state["index"])):
            self._draw()
            self.index += 1
