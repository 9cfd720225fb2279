"""The SFT recipe (the paper's baseline): teacher forcing on the reference answers of the same data and model.

Per step: a batch of B prompts -> the references tokenized as the policy would emit them (text + eos; eos is
learned, so the model learns to stop) -> token NLL on answer tokens only (the prompt and audio are context, never
targets) over micro-batches -> one AdamW step -> maybe validate / checkpoint.

Loss: sum of -log p(answer tokens) / number of answer tokens of the whole batch (all micro-batches and DP ranks),
the same global normalisation as the GRPO "dapo" loss. Scored with temperature 1 through the policy's single
logits path (``Policy.score``), so SFT optimises exactly the distribution that GRPO later samples from.

Shape legend: B prompts, T answer tokens.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from nemo_grpo.algorithms import microbatch_slices
from nemo_grpo.train import runtime
from nemo_grpo.train.config import TrainConfig
from nemo_grpo.train.session import TrainSession

log = logging.getLogger(__name__)


def sft_loss(logp: torch.Tensor, mask: torch.Tensor, normalizer: torch.Tensor) -> torch.Tensor:
    """-sum(logp over counted tokens) / normalizer. logp [B, T] (with grad), mask [B, T] bool."""
    return -torch.where(mask, logp, 0.0).sum() / normalizer.clamp(min=1.0)


def train_sft(cfg: TrainConfig) -> dict[str, Any]:
    """Run SFT to ``trainer.max_steps``; returns the run summary (best validation, test metrics, paths)."""
    from nemo_grpo.policy.inputs import encode_completions

    s = TrainSession(cfg)
    s.policy.train()
    while s.step < cfg.trainer.max_steps:
        batch = s.next_batch()
        with s.timer("train"):
            # targets capped at the completion length GRPO samples (grpo.max_new_tokens); a cut target has no eos
            ids, mask, cut = encode_completions(s.policy.tokenizer, batch.references,
                                                max_tokens=cfg.grpo.max_new_tokens)  # [B, T]
            ids, mask = ids.to(s.device), mask.to(s.device)
            group = torch.arange(len(batch), device=s.device)
            # global answer-token count / DP size: optimizer_step averages gradients over DP ranks
            normalizer = runtime.dp_sum(mask.sum().float(), s.dp_size) / s.dp_size
            total = torch.zeros((), dtype=torch.float64)
            with s.autocast():
                ctx = s.policy.encode(batch)
            for sl in microbatch_slices(len(batch), cfg.trainer.micro_batch_size):
                with s.autocast():
                    logp, _ = s.policy.score(ctx, ids[sl], group[sl], temperature=1.0)
                loss = sft_loss(logp.float(), mask[sl], normalizer)
                loss.backward()
                total += loss.detach().double().cpu()
            opt = s.optimizer_step()
        tokens = float(mask.sum())
        metrics = s.dp_mean({"train/answer_tokens": tokens, "train/cut_targets": float(cut.sum()),
                             "perf/tokens_per_s": tokens / max(s.timers.get("train", 0.0), 1e-9), **opt})
        metrics["train/loss"] = float(runtime.dp_sum(total, s.dp_size)) / s.dp_size  # the global token mean
        s.end_step(metrics)
    return s.finish()
