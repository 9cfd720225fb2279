"""Shared benchmark helpers: environment, machine/version/commit record, timing, profiles, result files, and the
GRPO step composed from the recipe's own functions.

Every benchmark imports this module FIRST (``import common``): it pins one thread and offline mode before torch or
transformers are imported, because on a 2-core shared box extra threads were 5-30x slower and a hub lookup stalls.

The GRPO step (``grpo_step``) is the recipe's own ``nemo_grpo.train.grpo.grpo_step`` (``rollout`` -> ``reward_fn``
-> ``advantages_and_mask`` -> ``reference_logprobs`` (beta > 0) -> ``policy_update``: score + ``grpo_loss`` +
backward per micro-batch, then ``Policy.optimizer_step``), called as it is; ``StepSession`` supplies the few session
attributes it reads, borrowing ``TrainSession``'s own ``autocast``/``optimizer_step`` methods.

Shape legend: B prompts, G samples per prompt, N = B*G, T completion tokens.
"""
from __future__ import annotations

import contextlib
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

for _k, _v in (("OMP_NUM_THREADS", "1"), ("MKL_NUM_THREADS", "1"), ("HF_HUB_OFFLINE", "1"),
               ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"), ("HF_DATASETS_OFFLINE", "1"),
               ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_VERBOSITY", "error")):
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a fresh clone without `pip install -e .`
    sys.path.insert(0, str(REPO))
RESULTS_DIR = REPO / "benchmarks" / "results"


# ------------------------------------------------------------------------------------------ machine record ------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "trl", "accelerate", "lhotse", "nemo-toolkit", "sacrebleu", "bert-score"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def git_commit() -> str:
    """Short HEAD commit, with ``+dirty`` when tracked files differ (the numbers may not be that commit's)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=20).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD") or "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict[str, Any]:
    """CPU model, logical cores, torch threads and the 1/5/15-min load average (the box is shared: record it)."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_avg": [round(x, 2) for x in os.getloadavg()], "platform": platform.platform()}


def record(name: str, args: Any) -> dict[str, Any]:
    """The header every result JSON starts with."""
    return {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": git_commit(),
            "machine": machine(), "versions": versions(),
            "args": {k: v for k, v in vars(args).items() if k != "out"}}


# ------------------------------------------------------------------------------------------ timing --------------
# The clock every timed region uses. Default CPU seconds of this process: on the shared 2-core box other helpers'
# jobs steal wall time in bursts (per-round wall ratios ranged 0.4-1.7 for the same code), while the process's own
# CPU time measures the work done (all timed code runs in this process on 1 thread; TRL included). ``--clock wall``
# switches back to wall time (what a dedicated machine shows).
CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}
_clock: list[Callable[[], float]] = [time.process_time]


def set_clock(name: str) -> None:
    if name not in CLOCKS:
        raise ValueError(f"--clock {name!r}: choose one of {sorted(CLOCKS)}")
    _clock[0] = CLOCKS[name]


def now() -> float:
    """Seconds on the selected clock (``set_clock``)."""
    return _clock[0]()


def add_clock_argument(ap: Any) -> None:
    ap.add_argument("--clock", default="cpu", choices=sorted(CLOCKS),
                    help="cpu: this process's CPU seconds (robust to a shared machine's load); wall: wall clock")


def parse_run_args(ap: Any, argv: Any) -> Any:
    """Add the arguments every timing benchmark shares (--clock, --smoke, --out), parse, and set the clock."""
    add_clock_argument(ap)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 1 round (CI: proves it runs)")
    ap.add_argument("--out", default=str(RESULTS_DIR))
    args = ap.parse_args(argv)
    set_clock(args.clock)
    return args


def clock_note(rec: dict[str, Any]) -> str:
    """The md line naming the clock; empty for a benchmark that has no ``--clock`` (it times on its own)."""
    if "clock" not in rec["args"]:
        return ""
    if rec["args"]["clock"] == "cpu":
        return ("Times are CPU seconds of the benchmark process (`time.process_time`; everything timed runs in it on "
                "one thread, TRL included): robust to the shared machine's load. `--clock wall` gives wall time.")
    return "Times are wall-clock seconds (`time.perf_counter`)."


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def summary(xs: list[float]) -> dict[str, Any]:
    """Median, min, max and the raw values (seconds unless stated)."""
    return {"median": median(xs), "min": min(xs) if xs else None, "max": max(xs) if xs else None,
            "n": len(xs), "values": [round(x, 6) for x in xs]}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = now()
    out = fn()
    return now() - t0, out


def cprofile_top(fn: Callable[[], Any], top: int = 20, sort: str = "tottime") -> str:
    """Run ``fn`` once under cProfile; the ``top`` entries by ``sort`` as text (for the .md where a goal is missed)."""
    prof = cProfile.Profile()
    prof.enable()
    try:
        fn()
    finally:
        prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(sort)
    stats.print_stats(top)
    text = buf.getvalue()
    start = text.find("   ncalls")  # drop pstats' preamble lines
    return text[start:] if start >= 0 else text


def torch_profile_top(fn: Callable[[], Any], top: int = 15) -> str:
    """Run ``fn`` once under torch.profiler (CPU); operator table sorted by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    ops = prof.key_averages()
    # aten::* ops only: their self time is the tensor math; the rest of the wall time is Python/dispatch overhead
    aten_us = sum(e.self_cpu_time_total for e in ops if e.key.startswith("aten::"))
    return (ops.table(sort_by="self_cpu_time_total", row_limit=top)
            + f"\nwall (under the profiler) {1e3 * wall:.1f} ms; self time of aten:: ops {aten_us / 1e3:.1f} ms "
              f"({100 * aten_us / 1e6 / wall:.0f}% of wall)\n")


# ------------------------------------------------------------------------------------------ result files --------
def md_header(rec: dict[str, Any], title: str) -> list[str]:
    m, v = rec["machine"], rec["versions"]
    return [
        f"# {title}", "",
        f"- date: {rec['date']}; commit: `{rec['commit']}`",
        f"- machine: {m['cpu']}, {m['cores']} logical cores, torch threads {m['torch_threads']}, "
        f"load average {m['load_avg']} (shared box: absolute times are noisy; ratios are measured side by side)",
        f"- versions: torch {v['torch']}, transformers {v['transformers']}, trl {v['trl']}, "
        f"lhotse {v['lhotse']}, python {v['python']}",
        f"- args: `{json.dumps(rec['args'])}`",
        *([f"- {clock_note(rec)}"] if clock_note(rec) else []), "",
    ]


def write_results(name: str, rec: dict[str, Any], md_lines: list[str], out_dir: str | os.PathLike) -> Path:
    """Write ``<out_dir>/<name>.json`` and ``<name>.md``; returns the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rec["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    path = out / f"{name}.json"
    path.write_text(json.dumps(rec, indent=1, default=str) + "\n", encoding="utf-8")
    (out / f"{name}.md").write_text("\n".join(md_lines).rstrip() + "\n", encoding="utf-8")
    return path


def code_block(text: str) -> list[str]:
    return ["```", text.rstrip(), "```", ""]


def profile_sections(rec: dict[str, Any]) -> list[str]:
    """One "### Profile: name" section with a code block per entry of ``rec["profiles"]``."""
    return [line for name, text in rec["profiles"].items() for line in [f"### Profile: {name}", ""] + code_block(text)]


def verdict(ratio: float, goal: float, higher_is_better: bool) -> str:
    ok = ratio >= goal if higher_is_better else ratio <= goal
    return f"{'MET' if ok else 'MISSED'} (goal {'>=' if higher_is_better else '<='} {goal})"


# ------------------------------------------------------------------------------------------ inputs --------------
# ``--model`` presets: make_tiny overrides. "tiny" is the project's test model (~0.45 M parameters, per-token Python
# overhead dominates on CPU); "small" (~8 M) is large enough that matrix math dominates most of a step on one thread,
# to see how the ratios move toward the compute-bound regime of real checkpoints.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "small": {"hidden": 256, "text_layers": 8, "text_heads": 8, "text_kv_heads": 4, "text_ffn": 1024,
              "encoder_layers": 4, "qformer_heads": 8, "encoder_heads": 8},
}


def make_tiny_model(out_dir: str, preset: str = "tiny", **overrides: Any) -> str:
    """The project's random Granite Speech (``nemo_grpo.policy.tiny.make_tiny``, seed 0) in ``out_dir``; ``preset``
    names a ``MODEL_PRESETS`` entry (default: the tiny test model)."""
    from nemo_grpo.policy.tiny import make_tiny

    if preset not in MODEL_PRESETS:
        raise ValueError(f"--model {preset!r}: choose one of {sorted(MODEL_PRESETS)}")
    return make_tiny(out_dir, seed=0, **{**MODEL_PRESETS[preset], **overrides})


def model_parameters(model_dir: str) -> int:
    with open(os.path.join(model_dir, "tiny_info.json"), encoding="utf-8") as f:
        return int(json.load(f)["parameters"])


SENTENCES = (
    "the red box is on the left of the table",
    "what color is the ball under the chair",
    "three four one two nine",
    "the small dog sleeps near the big house by the river",
)


def espeak_waves(texts: tuple[str, ...] = SENTENCES, voice: str = "en-us") -> list[torch.Tensor]:
    """Real speech: espeak-ng renders each text (22.05 kHz WAV on stdout), resampled to 16 kHz. -> [S_b] floats."""
    import shutil

    import numpy as np
    import soundfile as sf
    from scipy.signal import resample_poly

    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is required for real audio (apt-get install espeak-ng)")
    waves = []
    for text in texts:
        wav = subprocess.run(["espeak-ng", "-v", voice, "--stdout", text], capture_output=True, check=True).stdout
        audio, sr = sf.read(io.BytesIO(wav), dtype="float32")
        if audio.ndim > 1:
            audio = audio[:, 0]
        g = np.gcd(16000, sr)
        waves.append(torch.from_numpy(resample_poly(audio, 16000 // g, sr // g).astype("float32")))
    return waves


def speech_batch(policy: Any, num_prompts: int, message: str = "<|audio|> answer the question") -> Any:
    """B espeak-ng prompts through the project's prompt builder (``build_prompt_batch``)."""
    from nemo_grpo.policy.inputs import build_prompt_batch

    texts = tuple(SENTENCES[i % len(SENTENCES)] for i in range(num_prompts))
    waves = espeak_waves(texts)
    return build_prompt_batch(policy.tokenizer, waves, [message] * num_prompts, list(texts),
                              [f"utt{i}" for i in range(num_prompts)], policy.config)


@contextlib.contextmanager
def fixed_length(policy: Any) -> Iterator[None]:
    """Every sample runs to ``max_new_tokens``: the sampler's stop test compares with ``policy.eos_token_id``, so an
    id no token has (-1) never stops a row. Sampled eos tokens stay ordinary tokens, so compute per step is exactly
    that of T tokens for all N rows (HF/TRL get ``min_new_tokens=T`` for the same effect)."""
    eos = policy.eos_token_id
    policy.eos_token_id = -1
    try:
        yield
    finally:
        policy.eos_token_id = eos


@contextlib.contextmanager
def hf_model_decode(policy: Any) -> Iterator[None]:
    """Our rollout with its KV-cache decode steps through ``GraniteModel.forward`` (``policy.lean_decode = False``,
    the HF-model reference path of ``HFGraniteSpeechPolicy``) instead of the shipped lean decode step: the
    comparison row shows what the lean step buys (the benchmarks check both sample identical tokens)."""
    if not hasattr(policy, "lean_decode"):
        raise ValueError(f"{type(policy).__name__} has no lean_decode switch")
    old = policy.lean_decode
    policy.lean_decode = False
    try:
        yield
    finally:
        policy.lean_decode = old


# ------------------------------------------------------------------------------------------ the GRPO step -------
def train_config(model_dir: str, **grpo: Any) -> Any:
    """A validated ``TrainConfig`` (paper defaults: G=8, beta 0.02, dapo, eps 0.2) with ``grpo`` overrides; lr
    constant so every timed step does the same work; one micro-batch per step unless ``micro_batch_size`` is given."""
    from nemo_grpo.train.config import validate

    mbs = grpo.pop("micro_batch_size", 1024)
    raw = {"model": {"path": model_dir, "device": "cpu", "precision": "fp32"}, "grpo": grpo,
           "optim": {"lr": 1e-6, "schedule": "constant"},
           "trainer": {"max_steps": 10**6, "micro_batch_size": mbs, "val_every": 0, "save_every": 0,
                       "test_at_end": False},
           "logging": {"tensorboard": False, "progress_bar": False, "plot": False}}
    return validate(raw)


class StepSession:
    """The attributes of ``TrainSession`` that the recipe's step reads (cfg, policy, dp_size, autocast, timer,
    optimizer_step, generator), with ``TrainSession``'s own ``autocast`` and ``optimizer_step`` methods. The
    benchmarks pass their own batches, so dynamic sampling (which draws more through ``next_batch``) is refused."""

    from nemo_grpo.train.session import TrainSession as _TS

    autocast = _TS.autocast
    optimizer_step = _TS.optimizer_step

    def __init__(self, cfg: Any, policy: Any, seed: int = 0):
        self.cfg, self.policy = cfg, policy
        self.dp_rank, self.dp_size, self.bf16, self.device = 0, 1, False, torch.device("cpu")
        self.opt_step, self.total_opt_steps = 0, cfg.trainer.max_steps * cfg.grpo.num_iterations
        self.generator = torch.Generator().manual_seed(seed)
        o = cfg.optim
        policy.configure_optimizer(lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps,
                                   max_grad_norm=o.max_grad_norm)
        policy.train()
        self.phases: dict[str, float] = {}

    @contextlib.contextmanager
    def timer(self, name: str):
        t0 = now()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + now() - t0

    def next_batch(self) -> Any:
        raise ValueError("benchmarks time fixed batches: grpo.dynamic_sampling is not supported here")


def build_reference(s: StepSession) -> Any:
    """The frozen KL reference exactly as ``train_grpo`` builds it (None when beta == 0)."""
    from nemo_grpo.train import runtime

    if s.cfg.grpo.beta <= 0:
        return None
    return runtime.build_policy(s.cfg.model, trainable=False, seed=s.cfg.seed)


def grpo_step(s: StepSession, batch: Any, reward_fn: Any, ref: Any = None,
              phases: dict[str, float] | None = None) -> dict[str, float]:
    """One GRPO step on ``batch`` (B prompts): the recipe's own ``nemo_grpo.train.grpo.grpo_step`` (what
    ``train_grpo`` runs per step, minus logging/checkpoints); adds each phase's seconds (rollout, reward incl.
    advantages, reference, train; this module's clock) into ``phases``. Returns the step metrics."""
    from nemo_grpo.train.grpo import grpo_step as recipe_step, loss_config

    s.phases = phases if phases is not None else {}
    metrics, _ = recipe_step(s, batch, reward_fn, ref, loss_config(s.cfg))
    return metrics


def quiet() -> None:
    """No progress bars / info chatter from transformers, datasets and TRL in benchmark output."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


# ------------------------------------------------------------------------------------------ RESULTS.md table ----
def summary_table(results_dir: str | os.PathLike = RESULTS_DIR) -> list[str]:
    """One row per benchmark result JSON of this folder's four CPU benchmarks (for RESULTS.md)."""
    rows = ["| benchmark | date (commit) | load avg | measured | goal | verdict |", "|---|---|---|---|---|---|"]

    def load(name: str) -> dict | None:
        path = Path(results_dir) / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def head(r: dict) -> str:
        return f"{r['date']} (`{r['commit']}`) | {r['machine']['load_avg'][0]}"

    r = load("bench_grpo_vs_trl")
    if r:
        s = r["step_s"]
        rows.append(f"| GRPO step vs TRL (text-only, B={r['settings']['B']} G={r['settings']['G']} "
                    f"T={r['settings']['T']}) | {head(r)} | ours {1e3 * s['ours_text']['median']:.0f} ms, TRL "
                    f"{1e3 * s['trl']['median']:.0f} ms -> **{r['ratio_ours_over_trl']:.2f}** (ours with audio: "
                    f"{r.get('ratio_ours_audio_over_trl', float('nan')):.2f}) | <= 0.5 | {r['verdict']} |")
    r = load("bench_rollout")
    if r:
        parts = [f"{k}: **{v['ratio_ours_over_hf']:.2f}x** ({v['tokens_per_s']['ours']['median']:.0f} vs "
                 f"{v['tokens_per_s']['hf']['median']:.0f} tok/s)" for k, v in r["settings"].items()]
        rows.append(f"| rollout tokens/s vs HF generate | {head(r)} | {'; '.join(parts)} | >= 2x | {r['verdict']} |")
    r = load("bench_step_share")
    if r:
        parts = [f"{k} {100 * v['share']:.1f}%" for k, v in r["results"].items()]
        ok = sum(v["verdict"].startswith("MET") for v in r["results"].values())
        rows.append(f"| reward + data share of a step | {head(r)} | {', '.join(parts)} | <= 5% | "
                    f"{ok}/{len(r['results'])} MET |")
    r = load("bench_scaling")
    if r:
        parts = [f"G={x['G']},T={x['T']}: {x['median_s']:.2f} s" for x in r["rows"]]
        rows.append(f"| scaling | {head(r)} | {', '.join(parts)}; ~G^{r['slope_vs_G']:.2f}, ~T^{r['slope_vs_T']:.2f} "
                    "| (report) | - |")
    return rows


if __name__ == "__main__":
    print("\n".join(summary_table()))
