"""``nemo-grpo sample``: sample completions for one audio file from a local Granite Speech checkpoint dir.

    nemo-grpo sample --model DIR --audio a.wav --prompt "<|audio|> what is said?" -n 4 --temperature 0.9 --top-p 0.9
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from nemo_grpo.policy.features import SAMPLE_RATE


def load_audio(path: str, target_sr: int = SAMPLE_RATE) -> torch.Tensor:
    """Read any soundfile-readable file (wav, flac, ogg) -> mono float32 [S] at ``target_sr`` (polyphase resampling)."""
    import soundfile as sf

    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)  # [S, C]
    except Exception as exc:  # soundfile raises several types; name the file either way
        raise ValueError(f"cannot read audio {path!r}: {exc}") from exc
    mono = data.mean(axis=1)
    if sr != target_sr:
        from scipy.signal import resample_poly

        g = math.gcd(int(sr), int(target_sr))
        mono = resample_poly(mono, target_sr // g, int(sr) // g).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(mono))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local HF Granite Speech dir (e.g. from make-tiny)")
    parser.add_argument("--audio", required=True, help="audio file (wav/flac/...), resampled to 16 kHz")
    parser.add_argument("--prompt", default="<|audio|>can you transcribe the speech into a written format?",
                        help="user message with exactly one <|audio|>")
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("-n", "--num-samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    from nemo_grpo.policy.hf import HFGraniteSpeechPolicy
    from nemo_grpo.policy.inputs import build_prompt_batch

    policy = HFGraniteSpeechPolicy.from_pretrained(args.model, device=args.device)
    wave = load_audio(args.audio)
    batch = build_prompt_batch(policy.tokenizer, [wave], [args.prompt], [""], [args.audio], policy.config,
                               max_prompt_tokens=1 << 30, system_prompt=args.system_prompt)
    gen = torch.Generator(device=policy.device).manual_seed(args.seed)
    with torch.no_grad():
        comp = policy.generate(policy.encode(batch), args.num_samples, args.max_new_tokens,
                               temperature=args.temperature, top_p=args.top_p, generator=gen)
    for i, text in enumerate(comp.texts):
        logp = float(comp.logprobs[i].sum())
        flag = " [truncated]" if bool(comp.truncated[i]) else ""
        print(f"[{i}] logp={logp:.2f} tokens={int(comp.mask[i].sum())}{flag}\t{text}")
    return 0
