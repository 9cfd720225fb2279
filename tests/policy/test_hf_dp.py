"""optimizer_step under torch.distributed (gloo, 2 CPU ranks) == one process stepping on the averaged gradient."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nemo_grpo.policy.hf import HFGraniteSpeechPolicy
from nemo_grpo.policy.inputs import build_prompt_batch, encode_completions

TEXTS = [["ja", "nein"], ["die rote Kiste", "zwei"]]  # rank r trains on TEXTS[r]


def _loss(policy, rank):
    g = torch.Generator().manual_seed(rank)
    waves = [torch.randn(8000, generator=g) * 0.1 for _ in range(2)]
    batch = build_prompt_batch(policy.tokenizer, waves, ["<|audio|> hi"] * 2, TEXTS[rank], ["a", "b"],
                               policy.config)
    tokens, mask, _ = encode_completions(policy.tokenizer, TEXTS[rank])
    logp, _ = policy.score(policy.encode(batch), tokens, torch.arange(2))
    return -(logp * mask).sum() / mask.sum()


def _make(model_dir):
    torch.set_num_threads(1)
    policy = HFGraniteSpeechPolicy.from_pretrained(model_dir)
    policy.configure_optimizer(lr=1e-2, weight_decay=0.0, betas=(0.9, 0.99), eps=1e-8, max_grad_norm=0.5)
    return policy


def _worker(rank, model_dir, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        policy = _make(model_dir)
        assert policy.data_parallel() == (rank, 2)
        _loss(policy, rank).backward()
        norm = policy.optimizer_step(1e-2)
        torch.save({"norm": norm, "state": policy.state_dict()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
def test_dp_all_reduce_equals_averaged_single_process(tiny_model_dir, tmp_path):
    # fork: the children inherit the imported modules (spawn would re-import torch+transformers, ~15 s)
    mp.start_processes(_worker, args=(tiny_model_dir, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    single = _make(tiny_model_dir)
    ((_loss(single, 0) + _loss(single, 1)) / 2).backward()
    norm = single.optimizer_step(1e-2)
    assert abs(norm - r0["norm"]) < 1e-5 and r0["norm"] == r1["norm"]
    for name, want in single.state_dict().items():
        assert torch.equal(r0["state"][name], r1["state"][name]), name
        assert torch.allclose(r0["state"][name], want, atol=1e-6), name
