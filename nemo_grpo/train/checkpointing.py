"""Atomic, resumable training checkpoints.

Layout under ``<output_dir>/checkpoints``::

    step_000010/policy/           Policy.save_checkpoint (model + optimizer; backend-defined files)
    step_000010/trainer_state.pt  step, schedule position, data position, best metric, metric history (rank 0)
    step_000010/rng_rank<r>.pt    python / numpy / torch (+cuda) global RNG, the sampling generator and this rank's
                                  data position (ranks draw different numbers of batches under dynamic sampling)
    latest                        text file naming the newest COMPLETE checkpoint dir

Atomicity: everything is written into ``.tmp_step_000010``, files are fsynced, the dir is renamed to its final name
and the parent fsynced, and only then is ``latest`` replaced (write temp + fsync + ``os.replace``). A process killed
at any point leaves either the previous ``latest`` or the new one, never a half-written checkpoint it would load.
Under torch.distributed every rank takes part (``Policy.save_checkpoint`` is collective); rank 0 renames.
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

_STEP_RE = re.compile(r"^step_(\d{6,})$")


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _dist()[1] > 1:
        torch.distributed.barrier()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(dirpath)


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


RNG_KEYS = ("python", "numpy", "torch", "generator", "cuda")


def capture_rng(generator: torch.Generator | None) -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "generator": generator.get_state() if generator is not None else None}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator | None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and state.get("generator") is not None:
        generator.set_state(state["generator"])


class Checkpointer:
    """Save / find / load step checkpoints in ``<output_dir>/checkpoints`` (see the module docstring)."""

    def __init__(self, output_dir: str, keep_last: int = 2):
        self.root = os.path.join(output_dir, "checkpoints")
        self.keep_last = keep_last
        os.makedirs(self.root, exist_ok=True)

    def latest(self) -> str | None:
        """The newest complete checkpoint dir, or None."""
        pointer = os.path.join(self.root, "latest")
        if not os.path.isfile(pointer):
            return None
        with open(pointer) as f:
            name = f.read().strip()
        path = os.path.join(self.root, name)
        if not os.path.isfile(os.path.join(path, "trainer_state.pt")):
            raise ValueError(f"checkpoint pointer {pointer} names {name}, which is incomplete or missing")
        return path

    def save(self, step: int, policy: Any, trainer_state: dict[str, Any], generator: torch.Generator | None,
             rank_state: dict[str, Any] | None = None) -> str:
        """Atomically write step ``step``: the policy (collective), ``trainer_state`` (rank 0) and, per rank, its RNG
        states plus ``rank_state`` (e.g. its data position)."""
        rank, world = _dist()
        name = f"step_{step:06d}"
        final = os.path.join(self.root, name)
        tmp = os.path.join(self.root, f".tmp_{name}")
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # debris of a run killed while saving this very step
            os.makedirs(os.path.join(tmp, "policy"))
        _barrier()
        policy.save_checkpoint(os.path.join(tmp, "policy"))
        torch.save({**capture_rng(generator), **(rank_state or {})}, os.path.join(tmp, f"rng_rank{rank}.pt"))
        if rank == 0:
            torch.save(dict(trainer_state, world_size=world), os.path.join(tmp, "trainer_state.pt"))
        _barrier()
        if rank == 0:
            _fsync_tree(tmp)
            if os.path.exists(final):  # re-saving a step after a resume that did not get further
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            atomic_write_text(os.path.join(self.root, "latest"), name)
            self._prune(keep=name)
        _barrier()
        log.info("saved checkpoint %s", final)
        return final

    def load(self, path: str, policy: Any, generator: torch.Generator | None) -> dict[str, Any]:
        """Load model + optimizer, this rank's RNG states; return the trainer state, with this rank's own entries
        of ``rank_state`` (e.g. "data") in place of rank 0's."""
        rank, world = _dist()
        state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
        if state.get("world_size", 1) != world:
            raise ValueError(f"checkpoint {path} was written by {state.get('world_size')} ranks, now {world}: "
                             "data positions and RNG streams would not continue exactly")
        policy.load_checkpoint(os.path.join(path, "policy"))
        own = torch.load(os.path.join(path, f"rng_rank{rank}.pt"), weights_only=False)
        restore_rng(own, generator)
        state.update({k: v for k, v in own.items() if k not in RNG_KEYS})
        log.info("resumed from %s (step %d)", path, state["step"])
        return state

    def _prune(self, keep: str) -> None:
        steps = sorted(d for d in os.listdir(self.root) if _STEP_RE.match(d))
        for d in steps[: max(0, len(steps) - self.keep_last)]:
            if d != keep:
                shutil.rmtree(os.path.join(self.root, d), ignore_errors=True)
