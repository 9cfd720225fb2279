"""``TrainSession``: the setup / bookkeeping half of a recipe, shared by GRPO and SFT.

A recipe does ``s = TrainSession(cfg)``, then per step ``batch = s.next_batch()`` ... ``s.optimizer_step()`` ...
``s.end_step(metrics)``, and finally ``s.finish()``. The session owns: seeding, the policy (via the one factory),
the resumable train stream, the sampling generator, the lr schedule, checkpoints (save every N steps, ``resume``),
validation every N steps with evaluation decoding + corpus BLEU and the best model, and the end-of-run test
evaluation (outputs JSONL + the paper-style table).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import time
from typing import Any

import numpy as np
import torch

from nemo_grpo.train import runtime
from nemo_grpo.train.checkpointing import Checkpointer, atomic_write_text
from nemo_grpo.train.config import TrainConfig
from nemo_grpo.train.evaluate import decode, make_loader_factory, score_test
from nemo_grpo.train.metrics_logging import MetricsLogger

log = logging.getLogger(__name__)


class TrainSession:
    """See the module docstring. ``opt_steps_per_step``: optimizer steps per recipe step (GRPO: mu)."""

    def __init__(self, cfg: TrainConfig, opt_steps_per_step: int = 1):
        self.cfg = cfg
        self.t_start = time.perf_counter()
        self.cpu_start = time.process_time()  # this process's CPU seconds: a compute measure robust to other load
        runtime.init_distributed_from_env(cfg.trainer.dist_timeout_minutes)
        self.rank, world_size = runtime.world()
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.policy = runtime.build_policy(cfg.model, trainable=True, seed=cfg.seed,
                                           dist_timeout_minutes=cfg.trainer.dist_timeout_minutes)
        self.dp_rank, self.dp_size = self.policy.data_parallel()
        if self.rank == 0:
            log.info("%s", runtime.layout_summary(cfg.model, world_size, self.dp_size))
        o = cfg.optim
        self.policy.configure_optimizer(lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps,
                                        max_grad_norm=o.max_grad_norm)
        self.device = runtime.pick_device(cfg.model.device)
        self.bf16 = runtime.use_bf16(cfg.model.precision, self.device)
        self.make_loader = make_loader_factory(cfg, self.policy.tokenizer, self.dp_rank, self.dp_size)
        self.train_data = runtime.DataStream(lambda epoch: self.make_loader("train", epoch), cfg.seed, "train")
        # One sampling stream per DP rank (different prompts anyway; different seeds keep ranks decorrelated).
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(runtime.derive_seed(cfg.seed, "sampling", self.dp_rank))
        self.total_opt_steps = cfg.trainer.max_steps * opt_steps_per_step
        self.step = 0
        self.opt_step = 0
        self.best: dict[str, Any] | None = None  # {"step", "metric", "value"}
        self.ckpt = Checkpointer(cfg.output_dir, keep_last=cfg.trainer.keep_last)
        self._last_saved = -1
        self._resume()
        if self.rank == 0:
            os.makedirs(cfg.output_dir, exist_ok=True)
            atomic_write_text(os.path.join(cfg.output_dir, "config.json"), json.dumps(cfg.to_dict(), indent=2))
        self.logger = MetricsLogger(cfg.output_dir, cfg.logging, rank=self.rank, total_steps=cfg.trainer.max_steps,
                                    start_step=self.step, run_config=cfg.to_dict())
        self.timers: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------ resume --------
    def _resume(self) -> None:
        path = None
        if self.cfg.resume == "auto":
            path = self.ckpt.latest()
        elif self.cfg.resume != "never":
            path = self.cfg.resume
        if path is None:
            return
        state = self.ckpt.load(path, self.policy, self.generator)
        self.step, self.opt_step, self.best = state["step"], state["opt_step"], state["best"]
        self.train_data.load_state_dict(state["data"])
        self._last_saved = self.step

    # ------------------------------------------------------------------------------------------ per step ------
    def next_batch(self) -> Any:
        return next(self.train_data).to(self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        return runtime.autocast(self.bf16, self.device)

    @contextlib.contextmanager
    def timer(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timers[name] = self.timers.get(name, 0.0) + time.perf_counter() - t0

    def optimizer_step(self) -> dict[str, float]:
        """One AdamW step at the scheduled lr (the policy reduces grads over DP and clips). Returns metrics."""
        lr = runtime.lr_at(self.opt_step, self.total_opt_steps, self.cfg.optim)
        grad_norm = self.policy.optimizer_step(lr)
        self.opt_step += 1
        return {"train/lr": lr, "train/grad_norm": float(grad_norm)}

    def dp_mean(self, metrics: dict[str, float]) -> dict[str, float]:
        """Average rank-local scalars over DP ranks (one all-reduce for all of them)."""
        if self.dp_size == 1 or not metrics:
            return metrics
        keys = sorted(metrics)
        vec = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
        vec = runtime.dp_sum(vec, self.dp_size) / self.dp_size
        return dict(zip(keys, vec.tolist()))

    def end_step(self, metrics: dict[str, float], samples: list[tuple[str, str]] | None = None) -> None:
        """Count the step, log, maybe validate, maybe checkpoint."""
        self.step += 1
        t = self.cfg.trainer
        for name, sec in self.timers.items():
            metrics[f"perf/{name}_s"] = sec
        self.timers = {}
        if self.step % t.log_every == 0 or self.step == t.max_steps:
            self.logger.log(self.step, metrics)
            if samples:
                text = "\n\n".join(f"hyp: {h}\nref: {r}" for h, r in samples[: self.cfg.logging.num_sample_completions])
                self.logger.log_text(self.step, "samples", text)
        if t.val_every and (self.step % t.val_every == 0 or self.step == t.max_steps):
            self.validate()
        if (t.save_every and self.step % t.save_every == 0) or self.step == t.max_steps:
            self.save()
        reward = metrics.get("reward/mean", metrics.get("train/loss"))
        self.logger.progress(self.step, "" if reward is None else f"{'reward' if 'reward/mean' in metrics else 'loss'}"
                                                                   f" {reward:.3f}")

    # ------------------------------------------------------------------------------------------ checkpoints ---
    def save(self) -> None:
        if self._last_saved == self.step:
            return
        state = {"step": self.step, "opt_step": self.opt_step, "best": self.best,
                 "data": self.train_data.state_dict(), "config": self.cfg.to_dict()}
        # every rank's own data position: ranks may draw different numbers of batches (dynamic sampling refills)
        self.ckpt.save(self.step, self.policy, state, self.generator, rank_state={"data": state["data"]})
        self._last_saved = self.step

    @property
    def best_dir(self) -> str:
        return os.path.join(self.cfg.output_dir, "best")

    def _save_best(self) -> None:
        """Export the current policy as an HF Granite Speech dir at ``<output_dir>/best`` (atomic rename)."""
        tmp = os.path.join(self.cfg.output_dir, ".tmp_best")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        runtime.barrier()
        self.policy.save_pretrained(tmp)  # collective for sharded backends; rank 0 writes
        runtime.barrier()
        if self.rank == 0:
            with open(os.path.join(tmp, "best.json"), "w") as f:
                json.dump(self.best, f)
            old = self.best_dir + ".old"
            shutil.rmtree(old, ignore_errors=True)
            if os.path.isdir(self.best_dir):
                os.rename(self.best_dir, old)
            os.rename(tmp, self.best_dir)
            shutil.rmtree(old, ignore_errors=True)
        runtime.barrier()  # nobody reads best/ before it is complete

    # ------------------------------------------------------------------------------------------ validation ----
    def validate(self) -> float:
        """Evaluation decoding (top-p/temperature from ``eval``) on the validation split -> corpus BLEU (x100).

        Runs under an isolated RNG with a fixed generator seed, so validations never change the training stream."""
        from nemo_grpo.evaluation import corpus_bleu

        t0 = time.perf_counter()
        records = decode(self, "valid", max_batches=self.cfg.trainer.val_max_batches)
        value = None
        if self.rank == 0:
            value, _ = corpus_bleu([r["hypothesis"] for r in records], [r["reference"] for r in records],
                                   self.cfg.eval.bleu_tokenize)
        value = runtime.broadcast_object(value)
        improved = self.best is None or value > self.best["value"]
        if improved:
            self.best = {"step": self.step, "metric": "val/bleu", "value": value}
            self._save_best()
        self.logger.log(self.step, {"val/bleu": value, "val/best_bleu": self.best["value"],
                                    "perf/val_s": time.perf_counter() - t0})
        log.info("step %d validation BLEU %.2f (best %.2f at step %d)", self.step, value, self.best["value"],
                 self.best["step"])
        return value

    # ------------------------------------------------------------------------------------------ finish --------
    def finish(self) -> dict[str, Any]:
        """Final checkpoint, the test evaluation with the best model (or the final one), the curves PNG."""
        self.save()
        summary: dict[str, Any] = {"step": self.step, "best": self.best, "output_dir": self.cfg.output_dir}
        skips = self.train_data.skip_summary()
        if skips is not None:
            summary["train_data_skips"] = skips
            log.info("%s (this process; details in summary.json)", skips["summary"])
        if not os.path.isdir(self.best_dir):
            # No validation ran: the final policy is the model this run produced.
            self.best = {"step": self.step, "metric": None, "value": None}
            self._save_best()
        if self.cfg.trainer.test_at_end:
            summary["test"] = score_test(self, model_dir=self.best_dir)
        summary["curves_png"] = self.logger.close(plot=self.cfg.logging.plot)
        summary["wall_s"] = time.perf_counter() - self.t_start
        summary["cpu_s"] = time.process_time() - self.cpu_start
        if self.rank == 0:
            atomic_write_text(os.path.join(self.cfg.output_dir, "summary.json"), json.dumps(summary, indent=2))
        return summary
