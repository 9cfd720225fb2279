"""Reward registry and the weighted mix GRPO uses: ``build_reward(spec) -> RewardFunction``.

A reward is a plain function ``fn(hyps: list[str], refs: list[str], **options) -> list[float]`` (values in [0, 1]),
chosen in YAML by registered name or by dotted path ``"pkg.mod:fn"``. Spec forms (all equivalent for one reward)::

    reward: bleu
    reward: {bleu: 1.0}
    reward: {bleu: {weight: 1.0, tokenize: intl}}
    reward:
      - {name: bleu, weight: 0.5, tokenize: intl}
      - {name: rougeL, weight: 0.5, lang: de}
      - {name: bleu, label: bleu_13a, weight: 0.0}   # label: a second copy under another component name

total = sum_i weight_i * reward_i (weights are not renormalised). Unknown names or options raise ValueError naming
the key. Expensive rewards (``EXPENSIVE``: meteor, bertscore) are what :meth:`RewardFunction.submit` exists for: it
computes the whole mix on a background worker thread and returns a Future, so the caller can keep the accelerator
busy (e.g. compute old/ref log-probs) meanwhile; bert-score's model runs batched on its device, releasing the GIL.
"""
from __future__ import annotations

import importlib
import inspect
import math
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nemo_grpo.rewards import neural as _bertscore
from nemo_grpo.rewards import lexical as _lexical
from nemo_grpo.rewards import meteor_offline as _meteor
from nemo_grpo.rewards.lexical import check_pairs

if TYPE_CHECKING:
    import torch

RewardFn = Callable[..., list[float]]

REWARDS: dict[str, RewardFn] = {
    "bleu": _lexical.bleu,
    "chrf": _lexical.chrf,
    "rouge1": _lexical.rouge1,
    "rouge2": _lexical.rouge2,
    "rougeL": _lexical.rougeL,
    "meteor": _meteor.meteor,
    "bertscore": _bertscore.bertscore,
}
# Rewards slow enough (>~0.3 ms/pair on CPU, or a neural model) to be worth computing off the critical path.
EXPENSIVE = frozenset({"meteor", "bertscore"})
_SPEC_KEYS = ("name", "weight", "label")


def register_reward(name: str, fn: RewardFn, *, expensive: bool = False) -> None:
    """Register ``fn`` under ``name`` (e.g. from a plugin module). Re-registering a name raises ValueError."""
    if name in REWARDS and REWARDS[name] is not fn:
        raise ValueError(f"reward {name!r} is already registered")
    REWARDS[name] = fn
    global EXPENSIVE
    if expensive:
        EXPENSIVE = EXPENSIVE | {name}


def resolve_reward(name: str) -> RewardFn:
    """A registered name, or ``"pkg.mod:fn"`` imported on demand. Unknown -> ValueError naming it."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        mod_name, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"reward {name!r}: cannot import {attr!r} from {mod_name!r} ({e})") from e
        if not callable(fn):
            raise ValueError(f"reward {name!r} is not callable")
        return fn
    raise ValueError(f"unknown reward {name!r}; known: {sorted(REWARDS)} or a dotted path 'pkg.mod:fn'")


def _check_options(name: str, fn: RewardFn, options: Mapping[str, Any]) -> None:
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = {k for k, p in list(params.items())[2:]
               if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)}
    for key in options:
        if key not in allowed:
            raise ValueError(f"reward {name!r}: unknown option {key!r}; allowed: {sorted(allowed)}")


@dataclass(frozen=True)
class RewardComponent:
    """One named, weighted reward with its options (already validated)."""

    label: str
    name: str
    fn: RewardFn
    weight: float
    options: dict[str, Any] = field(default_factory=dict)

    def __call__(self, hyps: list[str], refs: list[str]) -> list[float]:
        return self.fn(hyps, refs, **self.options)


@dataclass
class RewardResult:
    """total [N] float32 = sum_i w_i * components[i] [N] float32 (unweighted values, for logging)."""

    total: torch.Tensor
    components: dict[str, torch.Tensor]

    def means(self, prefix: str = "reward/") -> dict[str, float]:
        """Batch means for logging: {prefix+'total': .., prefix+label: ..} (Python floats, one sync per call)."""
        out = {f"{prefix}total": float(self.total.mean())}
        out.update({f"{prefix}{k}": float(v.mean()) for k, v in self.components.items()})
        return out


class RewardFunction:
    """A weighted mix of rewards: ``rf(hyps, refs) -> RewardResult``; ``rf.submit(hyps, refs) -> Future``.

    hyps, refs: N = B*G strings each (a group of G hypotheses shares its reference; every reward scores each distinct
    reference once). Thread-safe; call :meth:`close` (or use as a context manager) to stop the worker thread.
    """

    def __init__(self, components: list[RewardComponent], max_workers: int = 1):
        if not components:
            raise ValueError("reward: at least one reward is required")
        self.components = list(components)
        self.max_workers = int(max_workers)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    @property
    def expensive(self) -> bool:
        """True when some component is in EXPENSIVE (the caller should prefer :meth:`submit`)."""
        return any(c.name in EXPENSIVE for c in self.components)

    @property
    def weights(self) -> dict[str, float]:
        return {c.label: c.weight for c in self.components}

    def describe(self) -> list[dict[str, Any]]:
        """JSON-able record of what is computed (names, weights, every option incl. defaults, e.g. use_stemmer)."""
        out = []
        for c in self.components:
            params = inspect.signature(c.fn).parameters
            defaults = {k: p.default for k, p in list(params.items())[2:]
                        if p.default is not inspect.Parameter.empty}
            out.append({"label": c.label, "name": c.name, "weight": c.weight, "options": {**defaults, **c.options}})
        return out

    def __call__(self, hyps: list[str], refs: list[str]) -> RewardResult:
        import torch  # lazy: scoring-only processes (pool workers, `evaluate`) need not pay torch's import

        check_pairs(hyps, refs)
        comps = {c.label: torch.tensor(c(list(hyps), list(refs)), dtype=torch.float32).reshape(len(hyps))
                 for c in self.components}
        total = torch.zeros(len(hyps), dtype=torch.float32)
        for c in self.components:
            total = total + c.weight * comps[c.label]
        return RewardResult(total=total, components=comps)

    def submit(self, hyps: list[str], refs: list[str]) -> Future:
        """Compute ``self(hyps, refs)`` on the worker thread; returns ``Future[RewardResult]``."""
        check_pairs(hyps, refs)
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="reward")
            return self._pool.submit(self, list(hyps), list(refs))

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def __enter__(self) -> RewardFunction:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _component(entry: Mapping[str, Any], where: str) -> RewardComponent:
    if "name" not in entry:
        raise ValueError(f"{where}: missing key 'name'")
    name = entry["name"]
    if not isinstance(name, str):
        raise ValueError(f"{where}.name: expected a string, got {name!r}")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"{where}.weight: expected a finite number >= 0, got {weight!r}")
    label = entry.get("label", name)
    if not isinstance(label, str) or not label:
        raise ValueError(f"{where}.label: expected a non-empty string, got {label!r}")
    fn = resolve_reward(name)
    options = {k: v for k, v in entry.items() if k not in _SPEC_KEYS}
    try:
        _check_options(name, fn, options)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return RewardComponent(label=label, name=name, fn=fn, weight=float(weight), options=options)


def _probe(comp: RewardComponent, where: str) -> None:
    """Catch bad option VALUES at build time: cheap rewards score one pair; bertscore checks its model path."""
    try:
        if comp.name == "bertscore":
            _bertscore._resolve_model(comp.options.get("model"))
        elif comp.name not in EXPENSIVE:
            comp(["a b c"], ["a b c"])
    except Exception as e:  # noqa: BLE001 - any failure here is a config error in this entry
        raise ValueError(f"{where}: {e}") from e


def _entries(spec: Any) -> list[tuple[dict[str, Any], str]]:
    if isinstance(spec, str):
        return [({"name": spec}, "reward")]
    if isinstance(spec, Mapping):
        if "name" in spec:
            return [(dict(spec), "reward")]
        out = []
        for name, val in spec.items():
            where = f"reward.{name}"
            if isinstance(val, Mapping):
                if "name" in val:
                    raise ValueError(f"{where}: key 'name' is implied by the mapping key")
                out.append(({"name": name, **val}, where))
            else:
                out.append(({"name": name, "weight": val}, where))
        return out
    if isinstance(spec, (list, tuple)):
        out = []
        for i, item in enumerate(spec):
            where = f"reward[{i}]"
            if isinstance(item, str):
                out.append(({"name": item}, where))
            elif isinstance(item, Mapping):
                out.append((dict(item), where))
            else:
                raise ValueError(f"{where}: expected a name or a mapping, got {item!r}")
        return out
    raise ValueError(f"reward: expected a name, a mapping or a list, got {type(spec).__name__}")


def build_reward(spec: Any, max_workers: int = 1) -> RewardFunction:
    """Build the weighted reward mix from a YAML spec (see module docstring). Errors name the offending key."""
    if type(spec).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        spec = OmegaConf.to_container(spec, resolve=True)
    components, seen = [], set()
    for entry, where in _entries(spec):
        comp = _component(entry, where)
        if comp.label in seen:
            raise ValueError(f"{where}: duplicate component {comp.label!r}; give one a distinct 'label'")
        seen.add(comp.label)
        _probe(comp, where)
        components.append(comp)
    return RewardFunction(components, max_workers=max_workers)
