"""CPU-only shims for megatron-core 0.16 (the ONE place they live). Applied only when CUDA is unavailable.

megatron-core hard-codes CUDA in a few places that our CPU (gloo) correctness harness reaches. Each shim below
restores the CPU meaning of a CUDA-only call without changing what megatron computes:

| megatron-core                                    | shim                                                     |
|--------------------------------------------------|----------------------------------------------------------|
| ``torch.cuda.current_device()`` (RoPE, buffers)  | returns the CPU device                                   |
| ``torch.cuda.synchronize()`` (dist ckpt, DDP)    | no-op (CPU ops are synchronous)                          |
| ``CudaRNGStatesTracker`` (attention/embedding    | a tracker that forks the CPU generator's state           |
|   dropout always forks it)                       |                                                          |
| ``get_default_causal_mask`` builds on "cuda"     | the same mask on CPU                                     |
| optimizer / grad clipping / dist ckpt build      | ``cuda_to_cpu()``: a TorchFunctionMode mapping           |
|   tensors with ``device='cuda'`` and assert      |   device='cuda' -> cpu and ``Tensor.type()`` ->          |
|   ``param.type() == 'torch.cuda.FloatTensor'``   |   'torch.cuda.*' names, used only around those calls     |

Nothing here runs when ``torch.cuda.is_available()``: on a GPU megatron runs unmodified.
"""
from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_APPLIED = False


def needed() -> bool:
    """True when megatron must be shimmed (no CUDA device)."""
    return not torch.cuda.is_available()


class _CPURNGStatesTracker:
    """Mirror of megatron's CudaRNGStatesTracker over the CPU default generator (named, seeded states)."""

    def __init__(self, *args, **kwargs):
        self.use_cudagraphable_rng = False
        self.is_inference_rng_tracker = False
        self.reset()

    def reset(self):
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def is_initialized(self):
        return self._is_initialized

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        gen = torch.Generator()
        gen.manual_seed(seed)
        self.states_[name] = gen.get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def _causal_mask_cpu(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq), diagonal=1).bool()


def apply() -> None:
    """Install the process-wide shims once (no-op when CUDA is available)."""
    global _APPLIED
    if _APPLIED or not needed():
        return
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer import utils as tf_utils

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    mp_random.CudaRNGStatesTracker = _CPURNGStatesTracker
    mp_random._CUDA_RNG_STATE_TRACKER = _CPURNGStatesTracker()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # the tracker restores the CPU state itself; megatron's own helpers would touch CUDA generators
    mp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    tf_utils.get_default_causal_mask = _causal_mask_cpu
    fused_softmax.get_default_causal_mask = _causal_mask_cpu
    _APPLIED = True
    logger.info("megatron-core CPU shims applied (no CUDA device)")


def seed_model_parallel(seed: int) -> None:
    """CPU counterpart of ``model_parallel_cuda_manual_seed``: same named states and seed offsets."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mp_random

    if not needed():
        mp_random.model_parallel_cuda_manual_seed(seed)
        return
    tracker = mp_random.get_cuda_rng_tracker()
    tracker.reset()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tracker.add(mp_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mp_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)


def _cpu_device(dev):
    if dev is None:
        return None
    if isinstance(dev, int) or (isinstance(dev, str) and dev.startswith("cuda")):
        return torch.device("cpu")
    if isinstance(dev, torch.device) and dev.type == "cuda":
        return torch.device("cpu")
    return dev


class _CudaToCpu(TorchFunctionMode):
    """Maps ``device='cuda'`` to CPU and reports CPU tensors' ``type()`` under CUDA names."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and isinstance(args[1], (str, torch.device)):
            args = (args[0], _cpu_device(args[1])) + tuple(args[2:])
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_to_cpu():
    """Scope for megatron calls that build tensors on 'cuda' (optimizer, clipping, dist ckpt); no-op on GPU."""
    if not needed():
        yield
        return
    with _CudaToCpu():
        yield
