"""GRPO step time: nemo_grpo vs TRL 1.16 ``GRPOTrainer``, same tiny Granite LM, text-only prompts (goal: <= 0.5x).

Both sides run the same model weights (the LM of the tiny Granite Speech checkpoint, ``make_tiny`` seed 0; TRL gets
it as a ``GraniteForCausalLM`` dir), the same B text prompts, G samples each, exactly T new tokens per sample (ours:
``common.fixed_length``; TRL: ``min_new_tokens = max_completion_length = T``), temperature 1, top-p 1, beta (KL to a
frozen reference, so both run a reference forward), loss "dapo", eps 0.2, AdamW lr 1e-6 constant, grad clip 1.0,
one micro-batch, one update per rollout, sentence-BLEU reward (``nemo_grpo.rewards`` for both), fp32, 1 thread.

A step = generation + reward + advantages + reference log-probs + loss + backward + optimizer step.
  * TRL: time between consecutive ``on_step_end`` callbacks of ``trainer.train()`` (everything the trainer does).
  * ours: ``common.grpo_step``, i.e. the recipe's own functions (``rollout``, ``advantages_and_mask``,
    ``reference_logprobs``, ``policy_update``) on ``HFGraniteSpeechPolicy``. TRL has no audio, so the text-only run
    uses ``TextOnlyPolicy``: the same class with the prompt embeddings taken from the token embeddings instead of
    merged audio (the ONLY override; sampling, scoring, loss and optimizer code are the shipped ones).
    ``ours_audio`` additionally runs the unmodified policy WITH espeak-ng audio prompts (encoder + projector
    work TRL never does) as a stricter reference point.
Rounds alternate ours / TRL so load drift on the shared machine hits both.

    python benchmarks/bench_grpo_vs_trl.py [--smoke] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (pins threads / offline mode before torch)

import torch  # noqa: E402

from nemo_grpo.policy.base import PromptBatch, PromptContext  # noqa: E402
from nemo_grpo.policy.hf import HFGraniteSpeechPolicy  # noqa: E402

NAME = "bench_grpo_vs_trl"
GOAL = 0.5
PROMPTS = ["Answer the question: what color is the box?", "Translate into German: the ball is on the right.",
           "Where is the green cup?", "How many apples are there?"]
REFS = ["The box is red.", "Der Ball ist rechts.", "The cup is under the table.", "There are three apples."]


class TextOnlyPolicy(HFGraniteSpeechPolicy):
    """``HFGraniteSpeechPolicy`` for prompts without audio: no encoder pass, prompt embeddings = token embeddings."""

    def encode(self, batch: PromptBatch) -> PromptContext:
        return PromptContext(batch=batch.to(self.device), audio=None)

    def _prompt_embeds(self, ctx: PromptContext) -> torch.Tensor:
        return self._lm.embed_tokens(ctx.batch.input_ids)  # [B, P, H]


def text_batch(tokenizer, b: int, step: int) -> PromptBatch:
    """B text prompts, LEFT-padded (as TRL tokenizes them: no special tokens added), rotating per step."""
    idx = [(step * b + i) % len(PROMPTS) for i in range(b)]
    rows = [tokenizer(PROMPTS[i], add_special_tokens=False)["input_ids"] for i in idx]
    p = max(len(r) for r in rows)
    ids = torch.full((b, p), tokenizer.pad_token_id, dtype=torch.long)  # [B, P]
    att = torch.zeros((b, p), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, p - len(r):] = torch.tensor(r)
        att[j, p - len(r):] = 1
    return PromptBatch(ids, att, torch.zeros(b, 0, 160), torch.zeros(b, 0, dtype=torch.bool),
                       [REFS[i] for i in idx], [f"p{i}" for i in idx], [PROMPTS[i] for i in idx])


def export_granite_lm(speech_dir: str, out_dir: str) -> str:
    """The LM of a Granite Speech dir as a ``GraniteForCausalLM`` dir (same weights, tokenizer)."""
    from transformers import AutoTokenizer, GraniteForCausalLM, GraniteSpeechForConditionalGeneration

    speech = GraniteSpeechForConditionalGeneration.from_pretrained(speech_dir)
    lm = GraniteForCausalLM(speech.config.text_config)
    state = {f"model.{k}": v for k, v in speech.model.language_model.state_dict().items()}
    state["lm_head.weight"] = speech.lm_head.weight
    missing, unexpected = lm.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"LM export mismatch: missing {missing}, unexpected {unexpected}")
    lm.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(speech_dir).save_pretrained(out_dir)
    return out_dir


def check_same_model(policy: TextOnlyPolicy, lm_dir: str) -> float:
    """Max |log-prob difference| between our scoring and GraniteForCausalLM's forward on the same completions."""
    from transformers import GraniteForCausalLM

    lm = GraniteForCausalLM.from_pretrained(lm_dir).eval()
    batch = text_batch(policy.tokenizer, 2, 0)
    ctx = policy.encode(batch)
    with torch.no_grad():
        comps = policy.generate(ctx, 3, 8, generator=torch.Generator().manual_seed(0))
        ours, _ = policy.score(ctx, comps.token_ids, comps.group)
        ids = torch.cat([batch.input_ids[comps.group], comps.token_ids], 1)
        att = torch.cat([batch.attention_mask[comps.group], torch.ones_like(comps.token_ids)], 1)
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        p = batch.input_ids.shape[1]
        logits = lm(input_ids=ids, attention_mask=att, position_ids=pos).logits[:, p - 1:-1].float()
        theirs = torch.log_softmax(logits, -1).gather(-1, comps.token_ids[..., None]).squeeze(-1)
    return float((ours - theirs)[comps.mask].abs().max())


def reward_for_trl(reward_fn):
    def bleu_reward(prompts, completions, reference, **kwargs):
        return reward_fn(list(completions), list(reference)).total.tolist()
    return bleu_reward


def _timed_method(obj, name: str, acc: dict) -> None:
    """Wrap ``obj.name`` so its seconds add up in ``acc[name]`` (TRL's phases, for the breakdown only)."""
    fn = getattr(obj, name)

    def wrapper(*a, **k):
        t0 = common.now()
        try:
            return fn(*a, **k)
        finally:
            acc[name] = acc.get(name, 0.0) + common.now() - t0
    setattr(obj, name, wrapper)


def run_trl(lm_dir: str, args, steps: int, tmp: str, reward_fn, phases: dict | None = None) -> list[float]:
    """TRL GRPOTrainer for ``steps`` steps; seconds between consecutive step ends (the first follows train start).
    ``phases`` accumulates TRL's generation (``_generate``), generation + reward + reference/old log-probs
    (``_generate_and_score_completions``) and loss forward (``compute_loss``) seconds over all steps."""
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            times.append(common.now())

        def on_step_end(self, *a, **k):
            times.append(common.now())

    b, g, t = args.prompts, args.num_generations, args.completion_length
    cfg = GRPOConfig(
        output_dir=os.path.join(tmp, "trl"), use_cpu=True, report_to="none", save_strategy="no", seed=0,
        per_device_train_batch_size=b * g, gradient_accumulation_steps=1, num_generations=g, num_iterations=1,
        max_completion_length=t, generation_kwargs={"min_new_tokens": t}, temperature=1.0, top_p=1.0,
        beta=args.beta, epsilon=0.2, loss_type="dapo", learning_rate=1e-6, lr_scheduler_type="constant",
        max_grad_norm=1.0, max_steps=steps, logging_steps=10**6, bf16=False, fp16=False, disable_dropout=True,
        dataloader_num_workers=0, disable_tqdm=True, model_init_kwargs={"dtype": torch.float32},
    )
    n_rows = b * steps
    ds = Dataset.from_dict({"prompt": [PROMPTS[i % len(PROMPTS)] for i in range(n_rows)],
                            "reference": [REFS[i % len(REFS)] for i in range(n_rows)]})
    trainer = GRPOTrainer(model=lm_dir, reward_funcs=reward_for_trl(reward_fn), args=cfg, train_dataset=ds,
                          processing_class=AutoTokenizer.from_pretrained(lm_dir), callbacks=[StepTimer()])
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cb in (PrinterCallback, ProgressCallback):  # console printing is not part of a step
        trainer.remove_callback(cb)
    if phases is not None:
        for name in ("_generate", "_generate_and_score_completions", "compute_loss"):
            _timed_method(trainer, name, phases)
    torch.set_num_threads(1)
    trainer.train()
    return [b2 - a for a, b2 in zip(times, times[1:])]


def run_ours(s: common.StepSession, ref, reward_fn, steps: int, batch_fn, probe: bool = False
             ) -> tuple[list[float], dict]:
    """``steps`` full steps (batch construction included); per-step seconds and summed phase seconds. ``probe``:
    with ``common.hf_model_decode`` (decode steps through GraniteModel.forward instead of the lean step)."""
    times, phases = [], {}
    with common.fixed_length(s.policy), (common.hf_model_decode(s.policy) if probe else contextlib.nullcontext()):
        for i in range(steps):
            t0 = common.now()
            common.grpo_step(s, batch_fn(i), reward_fn, ref, phases)
            times.append(common.now() - t0)
    return times, phases


def build_ours(policy_cls, model_dir: str, cfg):
    policy = policy_cls.from_pretrained(model_dir)
    ref = None
    if cfg.grpo.beta > 0:  # the frozen reference, as runtime.build_policy(trainable=False) makes it
        ref = policy_cls.from_pretrained(model_dir, train_projector=False, train_llm=False)
        for p in ref.trainable_parameters():
            p.requires_grad_(False)
    return common.StepSession(cfg, policy), ref


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=1, help="B prompts per step")
    ap.add_argument("--num-generations", type=int, default=8, help="G")
    ap.add_argument("--completion-length", type=int, default=32, help="T (forced)")
    ap.add_argument("--beta", type=float, default=0.02)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-audio", action="store_true", help="skip the ours-with-audio reference run")
    ap.add_argument("--no-probe", dest="probe", action="store_false",
                    help="skip the extra run with decode steps through GraniteModel.forward (lean_decode=False)")
    ap.add_argument("--profile", action="store_true", help="include profiles even when the goal is met")
    ap.add_argument("--model", default="tiny", choices=sorted(common.MODEL_PRESETS),
                    help="model size preset (common.MODEL_PRESETS)")
    ap.add_argument("--tag", default="", help="suffix for the result file names (e.g. the --model preset)")
    args = common.parse_run_args(ap, argv)
    if args.smoke:
        args.num_generations, args.completion_length, args.rounds, args.warmup, args.repeats = 2, 4, 1, 1, 1
    logging.basicConfig(level=logging.WARNING)
    common.quiet()
    rec = common.record(NAME, args)
    from nemo_grpo.rewards import build_reward

    reward_fn = build_reward("bleu")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = common.make_tiny_model(os.path.join(tmp, "tiny"), args.model)
        rec["model"] = {"preset": args.model, "parameters": common.model_parameters(model_dir)}
        lm_dir = export_granite_lm(model_dir, os.path.join(tmp, "lm"))
        cfg = common.train_config(model_dir, num_generations=args.num_generations, beta=args.beta,
                                  max_new_tokens=args.completion_length, loss_type="dapo")
        s_text, ref_text = build_ours(TextOnlyPolicy, model_dir, cfg)
        rec["logprob_max_abs_diff_vs_GraniteForCausalLM"] = check_same_model(s_text.policy, lm_dir)
        s_audio, ref_audio = (None, None) if args.no_audio else build_ours(HFGraniteSpeechPolicy, model_dir, cfg)
        audio_batch = None if s_audio is None else common.speech_batch(s_audio.policy, args.prompts)
        n = args.warmup + args.repeats
        res = {"ours_text": [], "trl": [], "ours_audio": [], "ours_text_hf_step": []}
        phases = {"ours_text": {}, "ours_audio": {}, "trl": {}}
        per_round, per_round_audio, per_round_probe, totals = [], [], [], {"ours_text": 0.0, "trl": 0.0}
        for _ in range(args.rounds):
            t_ours, ph = run_ours(s_text, ref_text, reward_fn, n, lambda i: text_batch(s_text.policy.tokenizer,
                                                                                          args.prompts, i))
            _add(phases["ours_text"], ph)
            t_trl = run_trl(lm_dir, args, n, tmp, reward_fn, phases["trl"])
            totals["ours_text"] += sum(t_ours)
            totals["trl"] += sum(t_trl)
            res["ours_text"] += t_ours[args.warmup:]
            res["trl"] += t_trl[args.warmup:]
            per_round.append(common.median(t_ours[args.warmup:]) / common.median(t_trl[args.warmup:]))
            if args.probe:
                t_probe, _ = run_ours(s_text, ref_text, reward_fn, n, lambda i: text_batch(s_text.policy.tokenizer,
                                                                                             args.prompts, i), True)
                res["ours_text_hf_step"] += t_probe[args.warmup:]
                per_round_probe.append(common.median(t_probe[args.warmup:]) / common.median(t_trl[args.warmup:]))
            if s_audio is not None:
                t_aud, ph = run_ours(s_audio, ref_audio, reward_fn, n, lambda i: audio_batch)
                _add(phases["ours_audio"], ph)
                res["ours_audio"] += t_aud[args.warmup:]
                per_round_audio.append(common.median(t_aud[args.warmup:]) / common.median(t_trl[args.warmup:]))
        profiles = {}
        # headline: the median over rounds of each round's side-by-side ratio (pooled medians can pair steps
        # taken under different load)
        ratio = common.median(per_round)
        if (ratio > GOAL and not args.smoke) or args.profile:
            with common.fixed_length(s_text.policy):
                b0 = text_batch(s_text.policy.tokenizer, args.prompts, 0)
                profiles["ours_cprofile"] = common.cprofile_top(
                    lambda: common.grpo_step(s_text, b0, reward_fn, ref_text))
                profiles["ours_torch_ops"] = common.torch_profile_top(
                    lambda: common.grpo_step(s_text, b0, reward_fn, ref_text))
            profiles["trl_cprofile_3_steps"] = common.cprofile_top(
                lambda: run_trl(lm_dir, args, 3, tmp, reward_fn), sort="cumulative", top=30)
    rec["settings"] = {"B": args.prompts, "G": args.num_generations, "T": args.completion_length,
                       "beta": args.beta, "loss_type": "dapo", "reward": "bleu", "tokens_per_step":
                       args.prompts * args.num_generations * args.completion_length}
    rec["step_s"] = {k: common.summary(v) for k, v in res.items() if v}
    rec["phases_s_total"] = phases
    rec["total_s"] = totals
    rec["ratio_ours_over_trl"] = ratio
    rec["ratio_per_round"] = per_round
    rec["ratio_pooled_medians"] = common.median(res["ours_text"]) / common.median(res["trl"])
    if res["ours_audio"]:
        rec["ratio_ours_audio_over_trl"] = common.median(per_round_audio)
    if res["ours_text_hf_step"]:
        rec["ratio_hf_step_over_trl"] = common.median(per_round_probe)
    rec["goal"] = f"ours/TRL <= {GOAL}"
    rec["verdict"] = common.verdict(ratio, GOAL, higher_is_better=False)
    rec["profiles"] = profiles
    common.write_results(NAME + (f"_{args.tag}" if args.tag else ""), rec, markdown(rec), args.out)
    print(f"{NAME}: ours {common.median(res['ours_text']) * 1e3:.1f} ms/step, TRL "
          f"{common.median(res['trl']) * 1e3:.1f} ms/step -> ours/TRL = {ratio:.3f} {rec['verdict']}")
    return rec


def _add(acc: dict, ph: dict) -> None:
    for k, v in ph.items():
        acc[k] = acc.get(k, 0.0) + v


def markdown(rec: dict) -> list[str]:
    st, s = rec["settings"], rec["step_s"]
    lines = common.md_header(rec, "GRPO step: nemo_grpo vs TRL 1.16 GRPOTrainer (tiny Granite LM, CPU)")
    lines += [f"Model: `{rec['model']['preset']}` random Granite Speech ({rec['model']['parameters'] / 1e6:.2f} M "
              "parameters; TRL gets its LM as GraniteForCausalLM).", "",
              f"Setting: B={st['B']} prompt(s) x G={st['G']} samples x T={st['T']} forced new tokens, beta "
              f"{st['beta']}, loss dapo, BLEU reward, fp32, 1 thread. Same weights both sides (max |log-prob diff| "
              f"ours vs GraniteForCausalLM: {rec['logprob_max_abs_diff_vs_GraniteForCausalLM']:.2e}).", "",
              "| system | median s/step | min | max | n |", "|---|---|---|---|---|"]
    for k, label in (("ours_text", "nemo_grpo (text-only prompts)"), ("trl", "TRL GRPOTrainer (text-only)"),
                     ("ours_audio", "nemo_grpo WITH audio prompts (stricter)"),
                     ("ours_text_hf_step", "nemo_grpo text-only, decode steps through GraniteModel.forward")):
        if k in s:
            lines.append(f"| {label} | {s[k]['median']:.4f} | {s[k]['min']:.4f} | {s[k]['max']:.4f} | {s[k]['n']} |")
    lines += ["", f"**ours/TRL = {rec['ratio_ours_over_trl']:.3f}** (median of the per-round side-by-side ratios "
              + ", ".join(f"{r:.3f}" for r in rec["ratio_per_round"])
              + f"; pooled medians give {rec['ratio_pooled_medians']:.3f}) — {rec['verdict']}"]
    if "ratio_ours_audio_over_trl" in rec:
        lines += ["", f"ours WITH audio / TRL text-only = {rec['ratio_ours_audio_over_trl']:.3f} (same statistic)"]
    if "ratio_hf_step_over_trl" in rec:
        lines += ["", "ours with `lean_decode = False` (decode steps through GraniteModel.forward, the path before "
                  f"the lean step) / TRL = {rec['ratio_hf_step_over_trl']:.3f}: what the shipped lean decode step buys"]
    lines += ["", "Where the time goes (seconds summed over all steps incl. warmup; TRL's methods nest: "
              "_generate_and_score_completions contains _generate, the reward and the reference forward; "
              "compute_loss is the loss forward, backward and optimizer are outside it):", ""]
    for k, ph in rec["phases_s_total"].items():
        if ph:
            tot = sum(ph.values()) if k != "trl" else None
            lines.append(f"- {k}: " + ", ".join(f"{n} {v:.2f} s" + (f" ({100 * v / tot:.0f}%)" if tot else "")
                                               for n, v in ph.items()))
    lines.append(f"- step totals (same steps): ours_text {rec['total_s']['ours_text']:.2f} s, "
                 f"trl {rec['total_s']['trl']:.2f} s")
    lines.append("")
    lines += common.profile_sections(rec)
    return lines


if __name__ == "__main__":
    main()
