"""How GRPO step cost grows: step time vs G (4, 8, 12) at T=100 and vs completion length T (50, 100, 200) at G=8.

Model: the tiny Granite Speech policy (``make_tiny`` seed 0) WITH audio (B espeak-ng utterances); step =
``common.grpo_step`` (the recipe's rollout -> BLEU reward -> advantages -> reference (beta 0.02) -> policy update,
one micro-batch), every sample forced to exactly T tokens (``common.fixed_length``) so cost depends only on (G, T).
Configurations are interleaved within each round so load drift on the shared machine spreads over all of them.
Reported: median step seconds, seconds per generated token, the rollout / train split, and the log-log slope of
step time between the smallest and largest setting (1 = linear growth).

    python benchmarks/bench_scaling.py [--smoke] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

NAME = "bench_scaling"


def run_config(s, ref, batch, reward_fn, g: int, t: int, steps: int, warmup: int) -> tuple[list[float], dict]:
    """``steps`` timed steps at (G, T) after ``warmup``; per-step seconds and phase seconds summed over timed steps."""
    s.cfg.grpo.num_generations, s.cfg.grpo.max_new_tokens = g, t
    times, phases = [], {}
    with common.fixed_length(s.policy):
        for i in range(warmup + steps):
            ph: dict[str, float] = {}
            t0 = common.now()
            common.grpo_step(s, batch, reward_fn, ref, ph)
            if i >= warmup:
                times.append(common.now() - t0)
                for k, v in ph.items():
                    phases[k] = phases.get(k, 0.0) + v
    return times, phases


def slope(points: list[tuple[float, float]]) -> float:
    """d log(step time) / d log(x) between the first and last point."""
    (x0, y0), (x1, y1) = points[0], points[-1]
    return math.log(y1 / y0) / math.log(x1 / x0)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=2, help="B")
    ap.add_argument("--gs", type=int, nargs="+", default=[4, 8, 12])
    ap.add_argument("--ts", type=int, nargs="+", default=[50, 100, 200])
    ap.add_argument("--base-g", type=int, default=8)
    ap.add_argument("--base-t", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = common.parse_run_args(ap, argv)
    if args.smoke:
        args.prompts, args.gs, args.ts, args.base_g, args.base_t = 1, [2, 3], [2, 4], 2, 4
        args.rounds, args.warmup, args.repeats = 1, 0, 1
    logging.basicConfig(level=logging.WARNING)
    common.quiet()
    rec = common.record(NAME, args)
    from nemo_grpo.policy.hf import HFGraniteSpeechPolicy
    from nemo_grpo.rewards import build_reward

    configs = sorted({(g, args.base_t) for g in args.gs} | {(args.base_g, t) for t in args.ts})
    reward_fn = build_reward("bleu")
    times: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
    phases: dict[tuple[int, int], dict] = {c: {} for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = common.make_tiny_model(os.path.join(tmp, "tiny"))
        cfg = common.train_config(model_dir, num_generations=args.base_g, max_new_tokens=args.base_t)
        s = common.StepSession(cfg, HFGraniteSpeechPolicy.from_pretrained(model_dir))
        ref = common.build_reference(s)
        batch = common.speech_batch(s.policy, args.prompts)
        for _ in range(args.rounds):
            for g, t in configs:
                ts, ph = run_config(s, ref, batch, reward_fn, g, t, args.repeats, args.warmup)
                times[(g, t)] += ts
                for k, v in ph.items():
                    phases[(g, t)][k] = phases[(g, t)].get(k, 0.0) + v
    rows = []
    for g, t in configs:
        med = common.median(times[(g, t)])
        tot = sum(phases[(g, t)].values())
        rows.append({"G": g, "T": t, "step_s": common.summary(times[(g, t)]), "median_s": med,
                     "s_per_token": med / (args.prompts * g * t),
                     "phase_share": {k: v / tot for k, v in phases[(g, t)].items()}})
    by = {(r["G"], r["T"]): r["median_s"] for r in rows}
    rec["settings"] = {"B": args.prompts, "beta": cfg.grpo.beta, "loss_type": cfg.grpo.loss_type, "reward": "bleu"}
    rec["rows"] = rows
    rec["slope_vs_G"] = slope([(g, by[(g, args.base_t)]) for g in sorted(args.gs)])
    rec["slope_vs_T"] = slope([(t, by[(args.base_g, t)]) for t in sorted(args.ts)])
    common.write_results(NAME, rec, markdown(rec, args), args.out)
    print(f"{NAME}: step time ~ G^{rec['slope_vs_G']:.2f} (T={args.base_t}), ~ T^{rec['slope_vs_T']:.2f} "
          f"(G={args.base_g}); " + ", ".join(f"G={r['G']},T={r['T']}: {r['median_s']:.3f}s" for r in rows))
    return rec


def markdown(rec: dict, args) -> list[str]:
    st = rec["settings"]
    lines = common.md_header(rec, "GRPO step scaling with G and completion length (tiny Granite Speech, CPU)")
    lines += [f"Setting: B={st['B']} espeak-ng prompts with audio, forced T new tokens, beta {st['beta']}, loss "
              f"{st['loss_type']}, {st['reward']} reward, one micro-batch, fp32, 1 thread.", "",
              "| G | T | median step s | min | max | ms per generated token | rollout % | train % | reference % |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rec["rows"]:
        p, s = r["phase_share"], r["step_s"]
        lines.append(f"| {r['G']} | {r['T']} | {r['median_s']:.3f} | {s['min']:.3f} | {s['max']:.3f} | "
                     f"{1e3 * r['s_per_token']:.3f} | {100 * p.get('rollout', 0):.0f} | {100 * p.get('train', 0):.0f} "
                     f"| {100 * p.get('reference', 0):.0f} |")
    lines += ["", f"Growth: step time ~ G^{rec['slope_vs_G']:.2f} at T={args.base_t}; ~ T^{rec['slope_vs_T']:.2f} at "
              f"G={args.base_g} (log-log slope between the smallest and largest setting; 1 = linear).", ""]
    return lines


if __name__ == "__main__":
    main()
