"""Evaluation glue: decode a split with evaluation sampling, score it, evaluate a checkpoint.

Evaluation decoding is the paper's for every system (top-p 0.9, temperature 0.9, one sample per prompt), drawn
from a generator with a fixed seed under an isolated RNG, so it is reproducible and leaves training untouched.
Outputs are the evaluation command's JSONL records ``{"id", "hypothesis", "reference"}``.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch

from nemo_grpo.rollout import rollout
from nemo_grpo.train import runtime

log = logging.getLogger(__name__)


def make_loader_factory(cfg: Any, tokenizer: Any, dp_rank: int, dp_size: int) -> Callable[[str, int], Iterable]:
    """-> ``loader(split, epoch)``: the data layer's loader for that split, sharded over DP ranks, reshuffled per
    epoch (seed derived from ``cfg.seed``, the split and the epoch)."""
    from transformers import AutoConfig

    from nemo_grpo.data.dataset import build_dataloader

    model_config = AutoConfig.from_pretrained(cfg.model.path)

    def loader(split: str, epoch: int = 0) -> Iterable:
        return build_dataloader(cfg.data, tokenizer, model_config, split=split,
                                seed=runtime.derive_seed(cfg.seed, split, epoch),
                                dp_rank=dp_rank, dp_world_size=dp_size)

    return loader


@torch.no_grad()
def decode_batches(policy: Any, batches: Iterable, eval_cfg: Any, *, device: torch.device, bf16: bool = False,
                   max_batches: int | None = None) -> list[dict[str, str]]:
    """One evaluation-sampled completion per prompt -> records (this rank's share only)."""
    records: list[dict[str, str]] = []
    was_training = getattr(policy, "training", None)
    policy.eval()
    with runtime.isolated_rng(eval_cfg.seed):
        gen = torch.Generator(device=device)
        gen.manual_seed(eval_cfg.seed)
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            batch = batch.to(device)
            with runtime.autocast(bf16, device):
                ro = rollout(policy, batch, num_samples=1, max_new_tokens=eval_cfg.max_new_tokens,
                             temperature=eval_cfg.temperature, top_p=eval_cfg.top_p, generator=gen)
            for cid, hyp, ref in zip(batch.ids, ro.completions.texts, batch.references):
                records.append({"id": str(cid), "hypothesis": hyp, "reference": ref})
    if was_training is not False:
        policy.train()
    return records


def gather_records(records: list[dict[str, str]]) -> list[dict[str, str]]:
    """All ranks' records, deduplicated by id (tensor-parallel peers decode the same prompts), in rank order."""
    seen, out = set(), []
    for part in runtime.gather_objects(records):
        for r in part:
            if r["id"] not in seen:
                seen.add(r["id"])
                out.append(r)
    return out


def decode(session: Any, split: str, max_batches: int | None = None) -> list[dict[str, str]]:
    """Decode ``split`` with the session's current policy; every rank gets all records."""
    loader = session.make_loader(split, 0)
    with runtime.isolated_rng(runtime.derive_seed(session.cfg.seed, "open", split)):
        batches = iter(loader)
    recs = decode_batches(session.policy, batches, session.cfg.eval, device=session.device, bf16=session.bf16,
                          max_batches=max_batches)
    return gather_records(recs)


def metric_options(eval_cfg: Any) -> dict[str, Any]:
    return {"lang": eval_cfg.lang, "bleu_tokenize": eval_cfg.bleu_tokenize,
            "bertscore_model": eval_cfg.bertscore_model}


def decode_model(cfg: Any, model_dir: str, split: str = "test", max_batches: int | None = None
                 ) -> list[dict[str, str]]:
    """Decode ``split`` of ``cfg.data`` with a frozen policy built from the HF checkpoint ``model_dir`` (configured
    backend) and ``cfg.eval`` decoding. Every rank gets all records."""
    mcfg = dataclasses.replace(cfg.model, path=model_dir)
    policy = runtime.build_policy(mcfg, trainable=False, seed=cfg.seed)
    dp_rank, dp_size = policy.data_parallel()
    device = runtime.pick_device(cfg.model.device)
    loader = make_loader_factory(dataclasses.replace(cfg, model=mcfg), policy.tokenizer, dp_rank, dp_size)
    with runtime.isolated_rng(runtime.derive_seed(cfg.seed, "open", split)):
        batches = iter(loader(split, 0))
    recs = decode_batches(policy, batches, cfg.eval, device=device,
                          bf16=runtime.use_bf16(cfg.model.precision, device), max_batches=max_batches)
    return gather_records(recs)


def evaluate_model(cfg: Any, model_dir: str, split: str = "test", out_jsonl: str | None = None,
                   name: str = "model", max_batches: int | None = None) -> dict[str, Any]:
    """``decode_model`` + outputs JSONL (rank 0) + ``corpus_metrics`` (x100; {} on ranks > 0)."""
    from nemo_grpo.evaluation import corpus_metrics, write_outputs

    recs = decode_model(cfg, model_dir, split, max_batches)
    if runtime.world()[0] != 0:
        return {}
    if out_jsonl:
        write_outputs(out_jsonl, recs)
    metrics = corpus_metrics([r["hypothesis"] for r in recs], [r["reference"] for r in recs],
                             **metric_options(cfg.eval))
    log.info("%s on %s: BLEU %.2f (%d prompts)", name, split, metrics["BLEU"], len(recs))
    return metrics


def score_test(session: Any, model_dir: str) -> dict[str, Any]:
    """End-of-run test evaluation of ``model_dir``: ``test_outputs.jsonl`` + ``test/metrics.json`` + ``test/table.md``."""
    from nemo_grpo.evaluation import evaluate_outputs, write_outputs, write_results

    recs = decode_model(session.cfg, model_dir, "test")
    if session.rank != 0:
        return {}
    write_outputs(os.path.join(session.cfg.output_dir, "test_outputs.jsonl"), recs)
    name = session.cfg.algorithm
    result = evaluate_outputs({name: recs}, title=f"{name} (best validation checkpoint), test split",
                              **metric_options(session.cfg.eval))
    write_results(result, os.path.join(session.cfg.output_dir, "test"))
    log.info("test results:\n%s", result["table_md"])
    return {k: v for k, v in result["systems"][name].items() if k != "settings"}
