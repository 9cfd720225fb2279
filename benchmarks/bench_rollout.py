"""Rollout throughput (generated tokens/s): our rollout engine vs HF ``generate(num_return_sequences=G)``. Goal >= 2x.

Model: the tiny random Granite Speech (``make_tiny`` seed 0); prompts: B espeak-ng utterances (real speech, 16 kHz)
through ``build_prompt_batch``. Both sides produce exactly B*G*T new tokens per call (ours: ``common.fixed_length``;
HF: ``min_new_tokens = max_new_tokens = T``), ancestral sampling at temperature 1, top-p 1, fp32, 1 thread; the
counts are checked, not assumed.
  * ours: ``nemo_grpo.rollout.rollout`` (``Policy.encode`` once per prompt, then one KV-cached ``Policy.generate``
    over all N = B*G rows, log pi_old recorded at sampling time).
  * HF: ``GraniteSpeechForConditionalGeneration.generate(..., do_sample=True, num_return_sequences=G)`` on the same
    checkpoint (it expands the audio G times, so the encoder runs N times; it does not record log-probs).
Calls alternate ours / HF; medians over the repeats.

    python benchmarks/bench_rollout.py [--smoke] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import torch  # noqa: E402

NAME = "bench_rollout"
GOAL = 2.0


def ours_call(policy, batch, g: int, t: int, gen: torch.Generator) -> int:
    from nemo_grpo.rollout import rollout

    with common.fixed_length(policy):
        ro = rollout(policy, batch, num_samples=g, max_new_tokens=t, generator=gen)
    return int(ro.completions.mask.sum())


def hf_call(model, batch, g: int, t: int, pad_id: int, eos_id: int) -> int:
    with torch.no_grad():
        out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             input_features=batch.input_features, input_features_mask=batch.input_features_mask,
                             do_sample=True, num_return_sequences=g, max_new_tokens=t, min_new_tokens=t,
                             top_p=1.0, top_k=0, temperature=1.0, pad_token_id=pad_id, eos_token_id=eos_id)
    new = out[:, batch.input_ids.shape[1]:]  # [N, T]; eos is suppressed until T, so every row has T new tokens
    return int(new.numel())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=2, help="B")
    ap.add_argument("--num-generations", type=int, default=8, help="G")
    ap.add_argument("--new-tokens", type=int, default=64, help="T (forced)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=str(common.RESULTS_DIR))
    args = ap.parse_args(argv)
    if args.smoke:
        args.prompts, args.num_generations, args.new_tokens, args.warmup, args.repeats = 1, 2, 4, 0, 1
    logging.basicConfig(level=logging.WARNING)
    common.quiet()
    rec = common.record(NAME, args)
    from transformers import GraniteSpeechForConditionalGeneration

    from nemo_grpo.policy.hf import HFGraniteSpeechPolicy

    b, g, t = args.prompts, args.num_generations, args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = common.make_tiny_model(os.path.join(tmp, "tiny"))
        policy = HFGraniteSpeechPolicy.from_pretrained(model_dir)
        hf = GraniteSpeechForConditionalGeneration.from_pretrained(model_dir).eval()
    batch = common.speech_batch(policy, b)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    times: dict[str, list[float]] = {"ours": [], "hf": []}
    tokens: dict[str, list[int]] = {"ours": [], "hf": []}
    for i in range(args.warmup + args.repeats):
        for name, fn in (("ours", lambda: ours_call(policy, batch, g, t, gen)),
                         ("hf", lambda: hf_call(hf, batch, g, t, policy.pad_token_id, policy.eos_token_id))):
            sec, n_tok = common.timed(fn)
            if n_tok != b * g * t:
                raise RuntimeError(f"{name} generated {n_tok} tokens, expected B*G*T = {b * g * t}")
            if i >= args.warmup:
                times[name].append(sec)
                tokens[name].append(n_tok)
    tps = {k: [n / s for n, s in zip(tokens[k], times[k])] for k in times}
    ratio = common.median(tps["ours"]) / common.median(tps["hf"])
    rec["settings"] = {"B": b, "G": g, "T": t, "tokens_per_call": b * g * t,
                       "audio_s": [round(float(x.numel()) / 16000, 2) for x in common.espeak_waves(
                           tuple(batch.references))], "prompt_tokens": int(batch.input_ids.shape[1])}
    rec["seconds_per_call"] = {k: common.summary(v) for k, v in times.items()}
    rec["tokens_per_s"] = {k: common.summary(v) for k, v in tps.items()}
    rec["ratio_ours_over_hf"] = ratio
    rec["goal"] = f"ours/HF tokens per second >= {GOAL}"
    rec["verdict"] = common.verdict(ratio, GOAL, higher_is_better=True)
    rec["profiles"] = {}
    if (ratio < GOAL and not args.smoke) or args.profile:
        rec["profiles"]["ours_cprofile"] = common.cprofile_top(lambda: ours_call(policy, batch, g, t, gen))
        rec["profiles"]["hf_cprofile"] = common.cprofile_top(
            lambda: hf_call(hf, batch, g, t, policy.pad_token_id, policy.eos_token_id))
    common.write_results(NAME, rec, markdown(rec), args.out)
    print(f"{NAME}: ours {common.median(tps['ours']):.0f} tok/s, HF generate {common.median(tps['hf']):.0f} tok/s "
          f"-> ours/HF = {ratio:.2f} {rec['verdict']}")
    return rec


def markdown(rec: dict) -> list[str]:
    st, s, tp = rec["settings"], rec["seconds_per_call"], rec["tokens_per_s"]
    lines = common.md_header(rec, "Rollout throughput: nemo_grpo rollout vs HF generate (tiny Granite Speech, CPU)")
    lines += [f"Setting: B={st['B']} espeak-ng utterances ({st['audio_s']} s audio, {st['prompt_tokens']} prompt "
              f"tokens incl. audio) x G={st['G']} samples x T={st['T']} forced new tokens = {st['tokens_per_call']} "
              "tokens per call; temperature 1, fp32, 1 thread.", "",
              "| system | median tokens/s | median s/call | min s | max s | n |", "|---|---|---|---|---|---|"]
    for k, label in (("ours", "nemo_grpo rollout (encode once + KV-cache sampler)"),
                     ("hf", "HF generate(num_return_sequences=G)")):
        lines.append(f"| {label} | {tp[k]['median']:.0f} | {s[k]['median']:.4f} | {s[k]['min']:.4f} | "
                     f"{s[k]['max']:.4f} | {s[k]['n']} |")
    lines += ["", f"**ours/HF = {rec['ratio_ours_over_hf']:.2f}x** — {rec['verdict']}", ""]
    for name, text in rec["profiles"].items():
        lines += [f"### Profile: {name}", ""] + common.code_block(text)
    return lines


if __name__ == "__main__":
    main()
