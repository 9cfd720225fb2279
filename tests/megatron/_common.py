"""Shared pieces of the megatron test workers (run under ``torchrun --nproc_per_node=2``, gloo, fp32)."""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)
# megatron warns about missing apex/TE at import: expected on CPU, noise in test logs
import warnings  # noqa: E402

warnings.filterwarnings("ignore", message=".*Apex.*")
warnings.filterwarnings("ignore", message=".*Transformer Engine.*")


def prompt_batch(tokenizer, config):
    """Two prompts of different audio length (left padding, masked audio tokens) from seeded noise."""
    from nemo_grpo.policy.inputs import build_prompt_batch

    g = torch.Generator().manual_seed(0)
    waves = [torch.randn(16000, generator=g) * 0.1, torch.randn(9000, generator=g) * 0.1]
    return build_prompt_batch(tokenizer, waves, ["<|audio|> what is said?", "Translate <|audio|> now"],
                              ["the red box", "die rote Kiste ist links"], ["utt_a", "utt_b"], config)


def completions(tokenizer):
    """N=4 completions (2 per prompt) of different lengths: token_ids [4, T], mask [4, T], group [4]."""
    from nemo_grpo.policy.inputs import encode_completions

    ids, mask, _ = encode_completions(tokenizer, ["the red box", "eins zwei drei", "die rote Kiste ist links", "no"])
    # a sampled pad token before eos (it happens): HF's embedding has padding_idx=pad, so that lookup passes no
    # gradient to the pad row; the megatron backend must match
    ids = ids.clone()
    ids[0, 1] = tokenizer.pad_token_id
    return ids, mask, torch.tensor([0, 0, 1, 1])


def token_weights(mask: torch.Tensor) -> torch.Tensor:
    """Fixed, non-uniform per-token weights so a gradient check sees every position distinctly. [N, T]."""
    return torch.linspace(0.5, 1.5, mask.numel()).view_as(mask) * mask


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def write_result(path: str, result: dict) -> None:
    """Rank 0 writes the metrics the pytest side asserts on."""
    if rank() == 0:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def max_diff(a: dict, b: dict) -> float:
    keys = sorted(set(a) & set(b))
    if set(a) != set(b):
        raise AssertionError(f"key sets differ: {sorted(set(a) ^ set(b))[:6]}")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in keys)


