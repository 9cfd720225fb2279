"""Launch a test worker under torchrun (gloo on CPU) from the pytest process."""
from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def torchrun(script: str, args: list[str], nproc: int = 2, timeout: int = 600) -> None:
    """Run ``tests/megatron/<script>`` on ``nproc`` local ranks; raise with its log tail on failure."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(HERE, script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
