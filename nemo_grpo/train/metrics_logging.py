"""Rank-0 run logging: TensorBoard, optional Weights & Biases, ``metrics.jsonl``, a progress bar with ETA, and an
end-of-run PNG of the reward and validation curves.

Every scalar goes to ``<output_dir>/metrics.jsonl`` (one JSON object per logged step, ``{"step": k, ...}``), which
is also what the PNG is drawn from and what the resume test compares. Wall-clock quantities are named ``perf/*``:
they are the only values that legitimately differ between two runs with the same seed. On resume, lines past the
resumed step are dropped so the file reads as one uninterrupted run.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any

log = logging.getLogger(__name__)


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


class MetricsLogger:
    """Collects scalars/texts on rank 0; a no-op on other ranks (they still call it, so code stays unbranched)."""

    def __init__(self, output_dir: str, cfg: Any, *, rank: int = 0, total_steps: int = 0, start_step: int = 0,
                 run_config: dict[str, Any] | None = None):
        self.active = rank == 0
        self.output_dir = output_dir
        self.cfg = cfg
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.total_steps = total_steps
        self._tb = self._wandb = self._bar = None
        if not self.active:
            return
        os.makedirs(output_dir, exist_ok=True)
        self._truncate(start_step)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=start_step + 1)
        if cfg.wandb.enabled:
            try:
                import wandb  # optional dependency, imported only when asked for
            except ImportError as e:
                raise ValueError("config key 'logging.wandb.enabled' needs the wandb package (pip install wandb)") from e

            self._wandb = wandb.init(project=cfg.wandb.project, name=cfg.wandb.name, mode=cfg.wandb.mode,
                                     dir=output_dir, config=run_config, resume="allow")
        if cfg.progress_bar:
            self._bar = ProgressBar(total_steps, start_step)

    def _truncate(self, start_step: int) -> None:
        if not os.path.isfile(self.path):
            return
        with open(self.path) as f:
            keep = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
        with open(self.path, "w") as f:
            f.writelines(keep)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.active:
            return
        clean = {k: float(v) for k, v in sorted(scalars.items())}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **{k: _finite(v) for k, v in clean.items()}}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def log_text(self, step: int, tag: str, text: str) -> None:
        if not self.active:
            return
        log.info("[step %d] %s:\n%s", step, tag, text)
        if self._tb is not None:
            self._tb.add_text(tag, text.replace("\n", "  \n"), step)

    def progress(self, step: int, postfix: str = "") -> None:
        if self._bar is not None:
            self._bar.update(step, postfix)

    def history(self) -> list[dict[str, Any]]:
        if not os.path.isfile(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def close(self, plot: bool = True) -> str | None:
        """Flush everything; write ``curves.png`` (rank 0). Returns the PNG path or None."""
        if not self.active:
            return None
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        return plot_curves(self.history(), os.path.join(self.output_dir, "curves.png")) if plot else None


class ProgressBar:
    """A one-line progress bar with rate and ETA on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, total: int, start: int = 0, every_s: float = 10.0):
        self.total, self.start, self.t0 = total, start, time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.every_s, self._last = every_s, 0.0

    def update(self, step: int, postfix: str = "") -> None:
        now = time.perf_counter()
        done = step - self.start
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        frac = step / max(self.total, 1)
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        line = (f"[{bar}] {step}/{self.total} {rate:.2f} it/s elapsed {_hms(now - self.t0)} "
                f"ETA {_hms(eta)} {postfix}")
        if self.tty:
            sys.stderr.write("\r" + line[:200])
            sys.stderr.flush()
        elif now - self._last >= self.every_s or step >= self.total:
            self._last = now
            log.info(line)

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    s = int(seconds)
    return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


def plot_curves(history: list[dict[str, Any]], png_path: str) -> str | None:
    """Reward (mean +- std) and validation curves from ``metrics.jsonl`` rows -> a PNG. None if nothing to draw."""
    panels = [("reward/mean", "reward/std", "train reward"), ("train/loss", None, "train loss"),
              ("val/bleu", None, "validation BLEU")]
    panels = [p for p in panels if any(row.get(p[0]) is not None for row in history)]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (key, std_key, title) in zip(axes[0], panels):
        rows = [r for r in history if r.get(key) is not None]
        xs = [r["step"] for r in rows]
        ys = [r[key] for r in rows]
        dense = len(xs) >= 30
        ax.plot(xs, ys, marker=None if dense else "o", lw=1.0 if dense else 1.5, alpha=0.5 if dense else 1.0)
        if dense:  # per-batch values are noisy (batches differ in task/difficulty): add a running mean
            window = max(5, len(ys) // 20)
            smooth = [sum(ys[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1))
                      for i in range(len(ys))]
            ax.plot(xs, smooth, lw=2.0, color="C1", label=f"running mean ({window})")
            ax.legend(loc="best", fontsize=8)
        if std_key and all(r.get(std_key) is not None for r in rows):
            lo = [y - r[std_key] for y, r in zip(ys, rows)]
            hi = [y + r[std_key] for y, r in zip(ys, rows)]
            ax.fill_between(xs, lo, hi, alpha=0.15)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
