"""torch.distributed + megatron ``parallel_state`` setup for the megatron backend.

Launch under ``torchrun`` (env ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``...) or as one plain process (a world of 1 is
created on a free local port). Backend: NCCL with CUDA, gloo without. World = TP x DP (no pipeline parallelism).
"""
from __future__ import annotations

import datetime
import logging
import os
import socket

import torch

from nemo_grpo.policy.megatron import cpu_shims

logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEFAULT_TIMEOUT_MINUTES = 120.0  # = trainer.dist_timeout_minutes' default (rank 0 writing an 8B checkpoint)


def init_distributed(timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> None:
    """Create the default process group once (idempotent)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def init_model_parallel(tensor_parallel_size: int, seed: int = 0,
                        timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> None:
    """Initialise TP x DP groups (megatron ``parallel_state``) and the model-parallel RNG states.

    ``timeout_minutes`` (``trainer.dist_timeout_minutes``) for the default group when it is created here and for
    megatron's TP/DP groups (NCCL and the gloo groups megatron adds), which otherwise time out after 30 min.

    Raises ValueError (naming ``model.tensor_parallel_size``) when the world size is not a multiple of it.
    Re-initialising with the same TP size is a no-op; a different size re-creates the groups.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    cpu_shims.apply()
    init_distributed(timeout_minutes)
    world = dist.get_world_size()
    if tensor_parallel_size < 1 or world % tensor_parallel_size:
        raise ValueError(
            f"model.tensor_parallel_size={tensor_parallel_size} must divide the world size {world}"
        )
    if parallel_state.model_parallel_is_initialized():
        if parallel_state.get_tensor_model_parallel_world_size() == tensor_parallel_size:
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel_size,
                                             distributed_timeout_minutes=max(1, round(timeout_minutes)))
    cpu_shims.seed_model_parallel(seed)
    logger.info(
        "megatron parallel state: world %d = TP %d x DP %d", world, tensor_parallel_size,
        parallel_state.get_data_parallel_world_size(),
    )


def tp_rank_size() -> tuple[int, int]:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


def dp_rank_size() -> tuple[int, int]:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


def destroy() -> None:
    """Tear down megatron groups and the default process group (end of a script or test worker)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
