"""``model.activation_checkpointing``: the same log-probs and gradients with and without, for both backends (fp32,
tiny model), while the layers really recompute (fewer saved bytes, a second forward per layer in backward) and the
rollout (KV cache, training mode, no grad) is unaffected."""
import json
import os
import subprocess
import sys

import torch

from nemo_grpo.policy.inputs import build_prompt_batch, encode_completions
from nemo_grpo.train import runtime
from nemo_grpo.train.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _inputs(tokenizer, config):
    g = torch.Generator().manual_seed(0)
    waves = [torch.randn(16000, generator=g) * 0.1, torch.randn(9000, generator=g) * 0.1]
    batch = build_prompt_batch(tokenizer, waves, ["<|audio|> what color is the box?", "translate <|audio|>"],
                               ["the box is red", "die Kiste ist rot"], ["u1", "u2"], config)
    ids, mask, _ = encode_completions(tokenizer, ["the red box", "eins zwei drei", "die rote Kiste", "no"])
    return batch, ids, mask, torch.tensor([0, 0, 1, 1])


def _hf_pass(model_dir, checkpointing):
    """(log-probs [4, T], grads by name, bytes saved for backward, decoder-layer forward calls) of one loss."""
    cfg = ModelConfig(path=model_dir, precision="fp32", device="cpu", activation_checkpointing=checkpointing)
    policy = runtime.build_policy(cfg, trainable=True, seed=0)
    policy.train()
    batch, ids, mask, group = _inputs(policy.tokenizer, policy.config)
    calls = []
    policy._lm.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    ctx = policy.encode(batch)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp, _ = policy.score(ctx, ids, group, temperature=0.7, return_entropy=True)
        loss = (lp * torch.linspace(0.5, 1.5, mask.numel()).view_as(mask) * mask).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}
    n_calls = len(calls)
    # the rollout still runs on its KV cache in training mode (checkpointing is off without grad)
    comps = policy.generate(ctx, 2, 6, generator=torch.Generator().manual_seed(3))
    return lp.detach(), grads, sum(saved), n_calls, comps.token_ids


def test_hf_checkpointing_same_logprobs_and_grads(tiny_model_dir):
    lp0, g0, saved0, calls0, toks0 = _hf_pass(tiny_model_dir, False)
    lp1, g1, saved1, calls1, toks1 = _hf_pass(tiny_model_dir, True)
    assert torch.equal(lp0, lp1)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=0, msg=name)
    assert (calls0, calls1) == (1, 2)  # the checkpointed layer ran again in backward
    assert saved1 < 0.8 * saved0  # the layers' internals were not kept
    assert torch.equal(toks0, toks1)


_MEGATRON = r"""
import json, sys, torch
sys.path.insert(0, "tests/policy")
from test_activation_checkpointing import _inputs
from nemo_grpo.policy.megatron.policy import MegatronGraniteSpeechPolicy
out = {}
for ckpt in (False, True):
    pol = MegatronGraniteSpeechPolicy.from_pretrained(sys.argv[1], tensor_parallel_size=1,
                                                      activation_checkpointing=ckpt)
    pol.train()
    calls = []
    pol.gpt.decoder.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    batch, ids, mask, group = _inputs(pol.tokenizer, pol.config)
    lp, _ = pol.score(pol.encode(batch), ids, group, temperature=0.7, return_entropy=True)
    (lp * torch.linspace(0.5, 1.5, mask.numel()).view_as(mask) * mask).sum().backward()
    pol.finalize_grads(all_reduce=True)
    out[ckpt] = (lp.detach(), pol.full_grads_hf(), len(calls), pol.gpt.config.recompute_granularity)
(lp0, g0, c0, r0), (lp1, g1, c1, r1) = out[False], out[True]
print(json.dumps({"lp_equal": torch.equal(lp0, lp1), "n_grads": len(g0), "keys_equal": g0.keys() == g1.keys(),
                  "grad_max_diff": max(float((g0[k] - g1[k]).abs().max()) for k in g0),
                  "calls": [c0, c1], "granularity": [r0, r1]}))
"""


def test_megatron_recompute_same_logprobs_and_grads(tiny_model_dir):
    """megatron-core full uniform recompute at TP=1 in one process (gloo, CPU)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", _MEGATRON, tiny_model_dir], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["granularity"] == [None, "full"]
    assert r["calls"] == [1, 2]  # the checkpointed layer ran again in backward
    assert r["lp_equal"] and r["keys_equal"] and r["n_grads"] > 10
    assert r["grad_max_diff"] == 0.0
