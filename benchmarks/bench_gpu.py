"""GPU check: the HF and megatron-core backends on a 2B-shaped random Granite Speech, train step + rollout timed.

Run through ``benchmarks/gpu_check.sh`` (one command, <= 8 minutes on one H100, no network). ``--smoke`` runs the
same code on a tiny model (CPU works) so the script itself is tested where there is no GPU.

What is measured, per backend (``hf``: fp32 master weights + bf16 autocast, the recipe's GPU mode;
``megatron``: the same; ``megatron_bf16``: native bf16 parameters with fp32 main params in megatron's distributed
optimizer), after one untimed warm-up of each phase:
  rollout     B prompts x G samples, up to T new tokens, KV cache (Policy.encode + Policy.generate):
              generated tokens / s, and decode MFU = 2 * N_dense * tokens / s / peak
  score       no-grad scoring of those N = B*G completions (the old/reference log-prob pass): tokens / s
  train step  score with grad + a token-mean policy-gradient loss + backward over micro-batches + optimizer_step
              (clip 1.0, AdamW): tokens / s and MFU = 6 * N_dense * tokens + attention / s / peak
  parity      (recorded, not timed) the bf16 numerics the GRPO ratio relies on:
              ``generate_vs_score``: log-probs recorded while sampling vs ``score`` of the same tokens, over B prompts
              of different audio lengths (left-padded; a decode step that ignored the pad mask shows here);
              ``vs_hf``: megatron ``score`` of the HF backend's rollout tokens vs HF's own ``score`` (same random
              checkpoint, each backend in its GPU mode). Max / mean abs over completion tokens; ``ok`` applies the
              provisional bf16 tolerances PARITY_TOL (fp32 on CPU --smoke agrees to ~1e-6).
N_dense = LLM transformer-layer parameters + V*H for the (tied) LM-head matmul; attention FLOPs
12 * L * H * S/2 per trained token (causal average). Encoder/projector FLOPs are not counted (frozen encoder,
small projector). tokens = prompt + completion tokens (every position is computed).
Writes ``<out>/gpu_check.json`` (environment, sizes, results, errors per backend).
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import sys
import time
import traceback

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

log = logging.getLogger("bench_gpu")

# provisional bf16 tolerances (mean abs, max abs) of per-token log-probs; not yet calibrated on a GPU
PARITY_TOL = {"generate_vs_score": (2e-2, 0.5), "vs_hf": (5e-2, 1.0)}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core FLOP/s (SXM)


def granite_speech_config(tokenizer, smoke: bool):
    """granite-speech-3.3-2b shapes (public config; Granite 3.3 2B text model), or a tiny variant for --smoke."""
    from transformers import GraniteSpeechConfig

    if smoke:
        text = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=1000, attention_multiplier=0.125)
        enc = dict(num_layers=2, hidden_dim=64, num_heads=4, dim_head=16, context_size=64, max_pos_emb=64)
        proj = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
                    encoder_hidden_size=64)
    else:
        text = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=40, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=49160, attention_multiplier=0.015625)
        enc = dict(num_layers=16, hidden_dim=1024, num_heads=8, dim_head=128, context_size=200, max_pos_emb=512)
        proj = dict(hidden_size=1024, num_hidden_layers=2, num_attention_heads=16, intermediate_size=4096,
                    encoder_hidden_size=1024)
    text.update(model_type="granite", max_position_embeddings=4096, rope_theta=10_000_000.0, rms_norm_eps=1e-5,
                tie_word_embeddings=True, logits_scaling=8.0, embedding_multiplier=12.0, residual_multiplier=0.22,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id)
    enc.update(input_dim=160, feedforward_mult=4, output_dim=256, dropout=0.0, conv_kernel_size=15,
               conv_expansion_factor=2)
    proj.update(model_type="blip_2_qformer", cross_attention_frequency=1, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
    return GraniteSpeechConfig(text_config=text, encoder_config=enc, projector_config=proj,
                               audio_token_index=tokenizer.convert_tokens_to_ids("<|audio|>"),
                               window_size=15, downsample_rate=5, has_lora_adapter=False, tie_word_embeddings=True)


def make_model_dir(out_dir: str, smoke: bool, device: torch.device) -> dict:
    """Random Granite Speech checkpoint (bf16 weights on disk, initialised on the device for speed)."""
    from transformers import GraniteSpeechForConditionalGeneration

    from nemo_grpo.policy.tiny import train_tokenizer

    t0 = time.perf_counter()
    tok = train_tokenizer()
    cfg = granite_speech_config(tok, smoke)
    torch.manual_seed(0)
    with torch.device(device):
        model = GraniteSpeechForConditionalGeneration(cfg).to(torch.bfloat16)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    text = model.model.language_model
    info = {"params_total": sum(p.numel() for p in model.parameters()),
            "params_llm_layers": sum(p.numel() for p in text.layers.parameters()),
            "params_encoder": sum(p.numel() for p in model.model.encoder.parameters()),
            "params_projector": sum(p.numel() for p in model.model.projector.parameters()),
            "make_s": time.perf_counter() - t0}
    del model
    gc.collect()
    return info


def prompt_batch(policy, n_prompts: int, audio_seconds: float):
    from nemo_grpo.policy.inputs import build_prompt_batch

    g = torch.Generator().manual_seed(0)
    # 10% steps in audio length: prompts left-padded to different lengths (5% steps tied at 1 s of --smoke audio)
    waves = [0.1 * torch.randn(int(16000 * audio_seconds * (1.0 - 0.1 * (i % 4))), generator=g)
             for i in range(n_prompts)]
    return build_prompt_batch(policy.tokenizer, waves, ["<|audio|> answer the question about the audio"] * n_prompts,
                              ["ref"] * n_prompts, [f"p{i}" for i in range(n_prompts)], policy.config,
                              max_prompt_tokens=4096)


def build_policy(kind: str, model_dir: str, device: torch.device):
    if kind == "hf":
        from nemo_grpo.policy.hf import HFGraniteSpeechPolicy

        return HFGraniteSpeechPolicy.from_pretrained(model_dir, device=device, dtype=torch.float32)
    from nemo_grpo.policy.megatron import MegatronGraniteSpeechPolicy

    dtype = torch.bfloat16 if kind == "megatron_bf16" else torch.float32
    return MegatronGraniteSpeechPolicy.from_pretrained(model_dir, tensor_parallel_size=1, params_dtype=dtype)


def autocast(policy_kind: str, device: torch.device):
    """The recipe's GPU mode (bf16 autocast over fp32 weights); native-bf16 megatron needs none."""
    import contextlib

    if device.type == "cuda" and policy_kind != "megatron_bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_rollout(policy, kind, batch, args, device) -> tuple[dict, object]:
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    sync(device)
    t0 = time.perf_counter()
    with autocast(kind, device), torch.no_grad():
        ctx = policy.encode(batch)
        comps = policy.generate(ctx, args.samples, args.new_tokens, temperature=1.0, top_p=1.0, generator=gen)
    sync(device)
    dt = time.perf_counter() - t0
    gen_tokens = int(comps.mask.sum())
    return {"s": dt, "generated_tokens": gen_tokens, "tokens_per_s": gen_tokens / dt,
            "completion_len_mean": float(comps.mask.sum(1).float().mean())}, (ctx, comps)


def time_score(policy, kind, ctx, comps, args, device) -> dict:
    sync(device)
    t0 = time.perf_counter()
    with autocast(kind, device), torch.no_grad():
        for sl in slices(len(comps), args.micro_batch):
            policy.score(ctx, comps.token_ids[sl], comps.group[sl])
    sync(device)
    dt = time.perf_counter() - t0
    return {"s": dt, "tokens_per_s": seq_tokens(ctx, comps) / dt}


def slices(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def seq_tokens(ctx, comps) -> int:
    return int(ctx.batch.input_ids.shape[1] * len(comps) + comps.token_ids.numel())


def time_train_step(policy, kind, ctx, comps, args, device) -> dict:
    """One optimizer step of a token-mean policy-gradient loss with fixed random advantages."""
    g = torch.Generator().manual_seed(1)
    adv = torch.randn(len(comps), generator=g).to(device)
    mask = comps.mask.to(device)
    count = mask.sum()
    policy.train()
    sync(device)
    t0 = time.perf_counter()
    for sl in slices(len(comps), args.micro_batch):
        with autocast(kind, device):
            logp, _ = policy.score(ctx, comps.token_ids[sl], comps.group[sl])
        loss = -(logp.float() * adv[sl, None] * mask[sl]).sum() / count
        loss.backward()
    grad_norm = policy.optimizer_step(1e-6)
    sync(device)
    dt = time.perf_counter() - t0
    policy.eval()
    return {"s": dt, "tokens_per_s": seq_tokens(ctx, comps) / dt, "grad_norm": float(grad_norm),
            "loss": float(loss.detach())}


def logprob_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, tol: tuple[float, float]) -> dict:
    d = (a.float().cpu() - b.float().cpu())[mask.bool().cpu()].abs()
    out = {"max_abs": float(d.max()) if d.numel() else 0.0, "mean_abs": float(d.mean()) if d.numel() else 0.0,
           "tokens": int(d.numel())}
    out["ok"] = out["mean_abs"] <= tol[0] and out["max_abs"] <= tol[1]
    return out


def parity(policy, kind, ctx, comps, args, device, shared: dict) -> dict:
    """See ``parity`` in the module docstring. ``shared`` carries the HF rollout to the megatron backends."""
    res = {"prompt_lengths": sorted(set(ctx.batch.attention_mask.sum(1).tolist()))}
    with autocast(kind, device), torch.no_grad():
        lp = torch.cat([policy.score(ctx, comps.token_ids[sl], comps.group[sl])[0]
                        for sl in slices(len(comps), args.micro_batch)])
    res["generate_vs_score"] = logprob_diff(comps.logprobs, lp, comps.mask, PARITY_TOL["generate_vs_score"])
    if kind == "hf":
        shared["hf"] = {"token_ids": comps.token_ids.cpu(), "group": comps.group.cpu(), "mask": comps.mask.cpu(),
                        "logprobs": lp.cpu()}
    elif "hf" in shared:
        ref = shared["hf"]
        with autocast(kind, device), torch.no_grad():
            lp = torch.cat([policy.score(ctx, ref["token_ids"][sl], ref["group"][sl])[0]
                            for sl in slices(len(ref["group"]), args.micro_batch)])
        res["vs_hf"] = logprob_diff(ref["logprobs"], lp, ref["mask"], PARITY_TOL["vs_hf"])
    return res


def flops(info: dict, cfg, seq_len: int) -> tuple[float, float]:
    """(train FLOPs per token, decode FLOPs per token) of the LLM (see the module docstring)."""
    t = cfg.text_config
    dense = info["params_llm_layers"] + t.vocab_size * t.hidden_size
    attn = 12 * t.num_hidden_layers * t.hidden_size * seq_len / 2
    return 6 * dense + attn, 2 * dense


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def bench_backend(kind: str, model_dir: str, info: dict, args, device, shared: dict | None = None) -> dict:
    t0 = time.perf_counter()
    policy = build_policy(kind, model_dir, device)
    policy.configure_optimizer(lr=1e-6, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, max_grad_norm=1.0)
    policy.eval()
    res = {"load_s": time.perf_counter() - t0}
    batch = prompt_batch(policy, args.prompts, args.audio_seconds)
    res["prompt_tokens"] = int(batch.input_ids.shape[1])
    time_rollout(policy, kind, batch, args, device)  # warm-up (kernels, allocator, caches)
    res["rollout"], (ctx, comps) = time_rollout(policy, kind, batch, args, device)
    res["score"] = time_score(policy, kind, ctx, comps, args, device)
    res["parity"] = parity(policy, kind, ctx, comps, args, device, {} if shared is None else shared)
    time_train_step(policy, kind, ctx, comps, args, device)  # warm-up (optimizer state allocation)
    steps = [time_train_step(policy, kind, ctx, comps, args, device) for _ in range(args.steps)]
    res["train_step"] = {"s_mean": sum(s["s"] for s in steps) / len(steps),
                         "tokens_per_s": sum(s["tokens_per_s"] for s in steps) / len(steps),
                         "grad_norms": [s["grad_norm"] for s in steps], "losses": [s["loss"] for s in steps]}
    train_fpt, decode_fpt = flops(info, policy.config, res["prompt_tokens"] + args.new_tokens)
    peak = peak_flops(device)
    if peak:
        res["train_step"]["mfu"] = res["train_step"]["tokens_per_s"] * train_fpt / peak
        res["rollout"]["decode_mfu"] = res["rollout"]["tokens_per_s"] * decode_fpt / peak
    if device.type == "cuda":
        res["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del policy, ctx, comps
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return res


def environment(device: torch.device) -> dict:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    try:
        import megatron.core

        env["megatron_core"] = megatron.core.__version__
    except Exception as e:  # reported, the megatron rows then carry the error
        env["megatron_core"] = f"not importable: {e}"
    from nemo_grpo.policy.megatron.model import have_te

    env["transformer_engine"] = have_te()
    return env


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny model, tiny batch (CPU ok): tests this script")
    p.add_argument("--out", default=os.environ.get("OUT", os.path.join(REPO, "benchmarks", "results")))
    p.add_argument("--backends", default="hf,megatron_bf16,megatron")
    p.add_argument("--prompts", type=int, default=8, help="B")
    p.add_argument("--samples", type=int, default=8, help="G")
    p.add_argument("--new-tokens", type=int, default=128, help="T (random weights rarely emit eos)")
    p.add_argument("--audio-seconds", type=float, default=10.0)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="timed train steps (after one warm-up)")
    p.add_argument("--deadline-s", type=float, default=400.0, help="skip backends not started by then")
    args = p.parse_args(argv)
    if args.smoke:
        args.prompts, args.samples, args.new_tokens = 2, 2, 6
        args.audio_seconds, args.micro_batch, args.steps = 1.0, 2, 1
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # DDP lists every parameter at INFO
    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    os.makedirs(args.out, exist_ok=True)
    model_dir = os.path.join(args.out if args.smoke else os.environ.get("TMPDIR", "/tmp"), "granite_speech_random")
    report = {"args": vars(args), "environment": environment(device), "results": {}, "errors": {}}
    shared: dict = {}  # the HF rollout, scored again by the megatron backends (parity.vs_hf)
    report["model"] = make_model_dir(model_dir, args.smoke, device)
    for kind in [k for k in args.backends.split(",") if k]:
        if time.perf_counter() - t_start > args.deadline_s:
            report["errors"][kind] = "skipped: deadline"
            continue
        log.info("benchmarking %s", kind)
        try:
            report["results"][kind] = bench_backend(kind, model_dir, report["model"], args, device, shared)
            log.info("%s: %s", kind, json.dumps(report["results"][kind]))
        except Exception:
            report["errors"][kind] = traceback.format_exc()[-4000:]
            log.error("%s failed:\n%s", kind, report["errors"][kind])
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        write(report, args.out)
    report["wall_s"] = time.perf_counter() - t_start
    # listed, not fatal: the tolerances are provisional until calibrated on a GPU (benchmarks/RESULTS.md)
    report["parity_failures"] = [f"{kind}.{name}" for kind, r in report["results"].items()
                                 for name, v in r.get("parity", {}).items() if isinstance(v, dict) and not v["ok"]]
    write(report, args.out)
    return 0 if not report["errors"] else 1


def write(report: dict, out: str) -> None:
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
