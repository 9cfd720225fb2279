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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import torch  # noqa: E402

NAME = "bench_rollout"
GOAL = 2.0


def ours_rollout(policy, batch, g: int, t: int, gen: torch.Generator):
    from nemo_grpo.rollout import rollout

    with common.fixed_length(policy):
        return rollout(policy, batch, num_samples=g, max_new_tokens=t, generator=gen)


def ours_call(policy, batch, g: int, t: int, gen: torch.Generator) -> int:
    return int(ours_rollout(policy, batch, g, t, gen).completions.mask.sum())


def hf_step_call(policy, batch, g: int, t: int, gen: torch.Generator) -> int:
    with common.hf_model_decode(policy):
        return ours_call(policy, batch, g, t, gen)


def check_probe(policy, batch, g: int, t: int) -> float:
    """The HF-model decode path samples the same tokens as the shipped lean step from the same seed; returns the
    max |log-prob diff|."""
    a = ours_rollout(policy, batch, g, t, torch.Generator().manual_seed(0)).completions
    with common.hf_model_decode(policy):
        b = ours_rollout(policy, batch, g, t, torch.Generator().manual_seed(0)).completions
    if not torch.equal(a.token_ids, b.token_ids):
        raise RuntimeError("the HF-model decode path sampled different tokens than the shipped lean step")
    return float((a.logprobs - b.logprobs).abs().max())


def hf_call(model, batch, g: int, t: int, pad_id: int, eos_id: int) -> int:
    with torch.no_grad():
        out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             input_features=batch.input_features, input_features_mask=batch.input_features_mask,
                             do_sample=True, num_return_sequences=g, max_new_tokens=t, min_new_tokens=t,
                             top_p=1.0, top_k=0, temperature=1.0, pad_token_id=pad_id, eos_token_id=eos_id)
    new = out[:, batch.input_ids.shape[1]:]  # [N, T]; eos is suppressed until T, so every row has T new tokens
    return int(new.numel())


def long_batch(policy, b: int, seconds: float):
    """B prompts whose audio is espeak-ng sentences concatenated up to ``seconds`` (LibriSQA-length utterances)."""
    from nemo_grpo.policy.inputs import build_prompt_batch

    sentences = common.espeak_waves()
    waves = []
    for i in range(b):
        parts, n = [], 0
        while n < seconds * 16000:
            w = sentences[(i + len(parts)) % len(sentences)]
            parts.append(w)
            n += w.numel()
        waves.append(torch.cat(parts)[: int(seconds * 16000)])
    refs = [common.SENTENCES[i % len(common.SENTENCES)] for i in range(b)]
    return build_prompt_batch(policy.tokenizer, waves, ["<|audio|> answer the question"] * b, refs,
                              [f"long{i}" for i in range(b)], policy.config)


def run_setting(policy, hf, batch, args, megatron=None) -> dict:
    """Alternating ours / HF (/ ours on the megatron backend) calls; per-call seconds and tokens/s (token counts
    checked = B*G*T)."""
    b, g, t = len(batch), args.num_generations, args.new_tokens
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    calls = [("ours", lambda: ours_call(policy, batch, g, t, gen)),
             ("hf", lambda: hf_call(hf, batch, g, t, policy.pad_token_id, policy.eos_token_id))]
    if megatron is not None:
        calls.append(("ours_megatron", lambda: ours_call(megatron, batch, g, t, gen)))
    if args.probe:
        calls.append(("ours_hf_step", lambda: hf_step_call(policy, batch, g, t, gen)))
    times: dict[str, list[float]] = {name: [] for name, _ in calls}
    tps: dict[str, list[float]] = {name: [] for name, _ in calls}
    for i in range(args.warmup + args.repeats):
        for name, fn in calls:
            sec, n_tok = common.timed(fn)
            if n_tok != b * g * t:
                raise RuntimeError(f"{name} generated {n_tok} tokens, expected B*G*T = {b * g * t}")
            if i >= args.warmup:
                times[name].append(sec)
                tps[name].append(n_tok / sec)
    # headline: median over repeats of the PAIRED speed-up (ours vs HF in the same repeat, adjacent calls), so a load
    # swing on the shared box hits both sides of each pair; per-system medians are reported beside it
    paired = {k: [a / b for a, b in zip(tps[k], tps["hf"])] for k in tps if k != "hf"}
    ratio = common.median(paired["ours"])
    audio_s = batch.input_features.shape[1] / 50.0  # 50 feature frames per second (padded length)
    extra = {"probe_logprob_max_abs_diff": check_probe(policy, batch, g, t)} if args.probe else {}
    return {**extra, "B": b, "G": g, "T": t, "tokens_per_call": b * g * t, "audio_s_max": round(audio_s, 2),
            "prompt_tokens": int(batch.input_ids.shape[1]),
            "seconds_per_call": {k: common.summary(v) for k, v in times.items()},
            "tokens_per_s": {k: common.summary(v) for k, v in tps.items()},
            "ratio_ours_over_hf": ratio, "paired_speedups": {k: [round(x, 4) for x in v] for k, v in paired.items()},
            "ratio_of_medians": common.median(tps["ours"]) / common.median(tps["hf"]),
            "verdict": common.verdict(ratio, GOAL, higher_is_better=True)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=2, help="B")
    ap.add_argument("--num-generations", type=int, default=8, help="G")
    ap.add_argument("--new-tokens", type=int, default=64, help="T (forced)")
    ap.add_argument("--long-audio-seconds", type=float, default=12.0,
                    help="second setting: audio this long (LibriSQA-like); 0 = skip")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--no-megatron", dest="megatron", action="store_false",
                    help="skip the extra row: our rollout on the megatron-core backend")
    ap.add_argument("--no-probe", dest="probe", action="store_false",
                    help="skip the extra row: our rollout with decode steps through GraniteModel.forward")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--model", default="tiny", choices=sorted(common.MODEL_PRESETS),
                    help="model size preset (common.MODEL_PRESETS)")
    ap.add_argument("--tag", default="", help="suffix for the result file names (e.g. the --model preset)")
    args = common.parse_run_args(ap, argv)
    if args.smoke:
        args.prompts, args.num_generations, args.new_tokens, args.warmup, args.repeats = 1, 2, 4, 0, 1
        args.long_audio_seconds, args.megatron = 3.0, False  # the probe stays on: its token check is cheap
    logging.basicConfig(level=logging.WARNING)
    common.quiet()
    rec = common.record(NAME, args)
    from transformers import GraniteSpeechForConditionalGeneration

    from nemo_grpo.policy.hf import HFGraniteSpeechPolicy

    tmp = tempfile.TemporaryDirectory()
    model_dir = common.make_tiny_model(os.path.join(tmp.name, "tiny"), args.model)
    rec["model"] = {"preset": args.model, "parameters": common.model_parameters(model_dir)}
    policy = HFGraniteSpeechPolicy.from_pretrained(model_dir)
    hf = GraniteSpeechForConditionalGeneration.from_pretrained(model_dir).eval()
    batches = {"toy_utterances": common.speech_batch(policy, args.prompts)}
    if args.long_audio_seconds > 0:
        batches[f"long_audio_{args.long_audio_seconds:g}s"] = long_batch(policy, args.prompts,
                                                                          args.long_audio_seconds)
    megatron = None
    if args.megatron:  # the same rollout engine on the megatron-core backend (world of 1, TP=1, CPU)
        from nemo_grpo.policy.megatron import MegatronGraniteSpeechPolicy

        megatron = MegatronGraniteSpeechPolicy.from_pretrained(model_dir, trainable=False)
    rec["settings"] = {name: run_setting(policy, hf, batch, args, megatron) for name, batch in batches.items()}
    main_setting = rec["settings"]["toy_utterances"]
    ratio = main_setting["ratio_ours_over_hf"]
    rec["ratio_ours_over_hf"] = ratio
    rec["goal"] = f"ours/HF tokens per second >= {GOAL} (judged on toy_utterances; other settings reported)"
    rec["verdict"] = main_setting["verdict"]
    rec["profiles"] = {}
    if (ratio < GOAL and not args.smoke) or args.profile:
        gen, b0 = torch.Generator().manual_seed(0), batches["toy_utterances"]
        g, t = args.num_generations, args.new_tokens
        rec["profiles"]["ours_cprofile"] = common.cprofile_top(lambda: ours_call(policy, b0, g, t, gen), top=25)
        rec["profiles"]["hf_cprofile"] = common.cprofile_top(
            lambda: hf_call(hf, b0, g, t, policy.pad_token_id, policy.eos_token_id), top=25)
    tmp.cleanup()
    common.write_results(NAME + (f"_{args.tag}" if args.tag else ""), rec, markdown(rec), args.out)
    for name, st in rec["settings"].items():
        tp = st["tokens_per_s"]
        print(f"{NAME} [{name}]: ours {tp['ours']['median']:.0f} tok/s, HF generate {tp['hf']['median']:.0f} tok/s "
              f"-> ours/HF = {st['ratio_ours_over_hf']:.2f} {st['verdict']}")
    return rec


def markdown(rec: dict) -> list[str]:
    lines = common.md_header(rec, "Rollout throughput: nemo_grpo rollout vs HF generate (tiny Granite Speech, CPU)")
    lines += [f"Model: `{rec['model']['preset']}` random Granite Speech ({rec['model']['parameters'] / 1e6:.2f} M "
              "parameters).", "",
              "Both sides generate exactly B*G*T tokens per call (checked); temperature 1, fp32, 1 thread. ours = "
              "encode once + one KV-cache batch over N rows; HF = generate(num_return_sequences=G), which expands "
              "the audio and the prompt to N rows.", "",
              "| setting | B x G x T | audio s (max) | prompt tokens | ours tok/s | HF tok/s | ours/HF | ours s/call "
              "(min-max) | HF s/call (min-max) | verdict | ours, megatron backend: tok/s (vs HF) | ours with "
              "HF-model decode steps (lean_decode=False): tok/s (vs HF) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, st in rec["settings"].items():
        tp, s = st["tokens_per_s"], st["seconds_per_call"]
        def vs_hf(k: str) -> str:
            return f"{tp[k]['median']:.0f} ({common.median(st['paired_speedups'][k]):.2f}x)" if k in tp else "-"
        lines.append(f"| {name} | {st['B']} x {st['G']} x {st['T']} | {st['audio_s_max']} | {st['prompt_tokens']} | "
                     f"{tp['ours']['median']:.0f} | {tp['hf']['median']:.0f} | **{st['ratio_ours_over_hf']:.2f}x** | "
                     f"{s['ours']['median']:.3f} ({s['ours']['min']:.3f}-{s['ours']['max']:.3f}) | "
                     f"{s['hf']['median']:.3f} ({s['hf']['min']:.3f}-{s['hf']['max']:.3f}) | {st['verdict']} | "
                     f"{vs_hf('ours_megatron')} | {vs_hf('ours_hf_step')} |")
    lines += ["", "ours/HF (and the megatron / probe columns) = median over repeats of the paired speed-up (ours and "
              "HF called back to back in each repeat); ratio of the per-system medians: "
              + ", ".join(f"{k} {st['ratio_of_medians']:.2f}x" for k, st in rec["settings"].items()), "",
              f"Goal: {rec['goal']} — {rec['verdict']}", "",
              "Last column: the same rollout with `policy.lean_decode = False` (decode steps through "
              "`GraniteModel.forward`, the path before the lean step); checked to sample identical tokens (max "
              "|log-prob diff| "
              + ", ".join(f"{st.get('probe_logprob_max_abs_diff', float('nan')):.1e}"
                          for st in rec["settings"].values())
              + "). It shows what the shipped lean decode step buys.", ""]
    lines += common.profile_sections(rec)
    return lines


if __name__ == "__main__":
    main()
