"""Schedule, RNG isolation, resumable data stream, atomic checkpoints."""
import math
import os
import random

import numpy as np
import pytest
import torch

from nemo_grpo.train.checkpointing import Checkpointer
from nemo_grpo.train.config import OptimConfig
from nemo_grpo.train.runtime import DataStream, isolated_rng, lr_at


def test_lr_schedule_hand_computed():
    cfg = OptimConfig(lr=1.0, warmup_ratio=0.2, schedule="cosine", min_lr_ratio=0.1)
    # 10 steps: warmup steps 0,1 -> 0.5, 1.0; then cosine over the 8 remaining steps from 1.0 to 0.1
    assert lr_at(0, 10, cfg) == pytest.approx(0.5)
    assert lr_at(1, 10, cfg) == pytest.approx(1.0)
    assert lr_at(2, 10, cfg) == pytest.approx(1.0)
    assert lr_at(6, 10, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    lin = OptimConfig(lr=2.0, schedule="linear")
    assert [lr_at(s, 4, lin) for s in range(4)] == pytest.approx([2.0, 1.5, 1.0, 0.5])
    assert lr_at(3, 4, OptimConfig(lr=2.0, schedule="constant")) == 2.0


def test_isolated_rng_restores_caller_state():
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    expected = (torch.rand(1).item(), random.random(), np.random.rand())
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    with isolated_rng(123):
        inner = torch.rand(1).item()
        torch.rand(100), random.random(), np.random.rand(7)
    assert (torch.rand(1).item(), random.random(), np.random.rand()) == expected
    with isolated_rng(123):
        assert torch.rand(1).item() == inner


def _loader(epoch):
    # a loader that draws from the GLOBAL RNGs while iterating (as shuffling datasets may)
    for i in range(3):
        yield (epoch, i, torch.randint(0, 1000, (1,)).item(), random.random())


def test_data_stream_resume_replays_exactly():
    a = DataStream(_loader, seed=0)
    full = [next(a) for _ in range(8)]
    assert [b[:2] for b in full] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1)]
    b = DataStream(_loader, seed=0)
    first = [next(b) for _ in range(4)]
    state = b.state_dict()
    torch.rand(10)  # training randomness in between must not matter
    c = DataStream(_loader, seed=0)
    c.load_state_dict(state)
    assert first + [next(c) for _ in range(4)] == full
    with pytest.raises(ValueError, match="'empty'"):
        next(DataStream(lambda e: iter(()), seed=0, name="empty"))


class _StatePolicy:
    """A minimal object with the Policy checkpoint methods (what Checkpointer calls) to test the file protocol."""

    def __init__(self, value):
        self.value = value

    def save_checkpoint(self, d):
        torch.save({"v": self.value}, os.path.join(d, "w.pt"))

    def load_checkpoint(self, d):
        self.value = torch.load(os.path.join(d, "w.pt"))["v"]


def test_checkpointer_atomic_latest_and_pruning(tmp_path):
    ck = Checkpointer(str(tmp_path), keep_last=2)
    assert ck.latest() is None
    gen = torch.Generator().manual_seed(0)
    for step in (1, 2, 3):
        ck.save(step, _StatePolicy(step), {"step": step}, gen)
    assert os.path.basename(ck.latest()) == "step_000003"
    assert sorted(d for d in os.listdir(ck.root) if d.startswith("step_")) == ["step_000002", "step_000003"]
    # a crash while writing step 4 leaves a tmp dir and the old pointer: latest is still the complete step 3
    os.makedirs(os.path.join(ck.root, ".tmp_step_000004", "policy"))
    pol = _StatePolicy(None)
    gen.manual_seed(99)
    state = ck.load(ck.latest(), pol, gen)
    assert state["step"] == 3 and pol.value == 3
    g0 = torch.Generator().manual_seed(0)
    assert torch.equal(torch.rand(3, generator=gen), torch.rand(3, generator=g0))  # generator state restored
    ck.save(4, _StatePolicy(4), {"step": 4}, gen)  # the debris is replaced
    assert os.path.basename(ck.latest()) == "step_000004"
    with open(os.path.join(ck.root, "latest"), "w") as f:
        f.write("step_000009")
    with pytest.raises(ValueError, match="step_000009"):
        ck.latest()


def test_metrics_logger_tensorboard_png_and_resume_truncation(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from nemo_grpo.train.config import LoggingConfig
    from nemo_grpo.train.metrics_logging import MetricsLogger

    cfg = LoggingConfig(progress_bar=True)
    lg = MetricsLogger(str(tmp_path), cfg, total_steps=4)
    for step in range(1, 5):
        lg.log(step, {"reward/mean": 0.1 * step, "reward/std": 0.05, "perf/rollout_s": 1.0})
        lg.progress(step)
    lg.log(4, {"val/bleu": 12.5})
    lg.log_text(4, "samples", "hyp: a\nref: b")
    png = lg.close()
    assert png and os.path.getsize(png) > 1000
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("reward/mean")] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert acc.Scalars("val/bleu")[0].step == 4
    # a resume from step 2 drops what the killed run logged after its checkpoint
    MetricsLogger(str(tmp_path), LoggingConfig(tensorboard=False, progress_bar=False), start_step=2).close(plot=False)
    assert [r["step"] for r in lg.history()] == [1, 2]


def test_bf16_precision_autocasts_on_cpu_and_auto_stays_fp32():
    """model.precision bf16 autocasts on CPU too (what makes bf16 numerics testable without a GPU); auto is bf16 on
    GPU only; fp32 never."""
    from nemo_grpo.train.runtime import autocast, use_bf16

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert use_bf16("bf16", cpu) and use_bf16("bf16", gpu) and use_bf16("auto", gpu)
    assert not use_bf16("auto", cpu) and not use_bf16("fp32", cpu) and not use_bf16("fp32", gpu)
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    with autocast(use_bf16("bf16", cpu), cpu):
        assert lin(x).dtype == torch.bfloat16
    with autocast(use_bf16("auto", cpu), cpu):
        assert lin(x).dtype == torch.float32
    assert lin.weight.dtype == torch.float32  # fp32 master weights either way


def test_bf16_params_count_as_bf16_numerics_for_old_logprobs():
    """The 8B megatron recipes keep bf16 parameters with model.precision auto: on CPU no autocast runs, yet the
    sampler and trainer compute in bf16, so grpo.old_logprobs auto must recompute there."""
    from types import SimpleNamespace

    from nemo_grpo.train.config import GRPOConfig, resolve_old_logprobs
    from nemo_grpo.train.runtime import bf16_numerics

    cpu = torch.device("cpu")
    bf16_params = SimpleNamespace(precision="auto", backend_options={"params_dtype": "bf16"})
    fp32 = SimpleNamespace(precision="auto", backend_options={})
    assert bf16_numerics(bf16_params, cpu) and not bf16_numerics(fp32, cpu)
    assert bf16_numerics(SimpleNamespace(precision="bf16", backend_options=None), cpu)
    assert resolve_old_logprobs(GRPOConfig(), bf16_numerics(bf16_params, cpu)) == "recompute"
    assert resolve_old_logprobs(GRPOConfig(), bf16_numerics(fp32, cpu)) == "sampled"
