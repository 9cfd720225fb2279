"""The backend-agnostic sampler on a known bigram 'model' (exact probabilities), and top-p vs HF's warper."""
import torch
from transformers.generation.logits_process import TopPLogitsWarper

from nemo_grpo.policy.sampling import sample_tokens, scale_logits, token_logprobs, top_p_keep

V, EOS, PAD = 7, 0, 6


def _bigram(table, rows=64):
    """prefill: every row starts after token 1; step: next logits = table[token]. Counts step calls."""
    calls = []

    def prefill():
        return table[torch.full((rows,), 1)], {"len": 0}

    def step(tokens, cache, t):
        calls.append(tokens.clone())
        return table[tokens], {"len": cache["len"] + 1}

    return prefill, step, calls

ROWS = 64


def test_stops_at_eos_pads_and_logprobs_are_exact():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(V, V, generator=g) * 3
    table[:, PAD] = -1e4  # the model never emits pad itself
    prefill, step, calls = _bigram(table)
    out = sample_tokens(prefill, step, max_new_tokens=10, eos_token_id=EOS, pad_token_id=PAD, logits_scaling=2.0,
                        temperature=0.7, generator=torch.Generator().manual_seed(1))
    ids, mask, logp = out.token_ids, out.mask, out.logprobs
    assert ids.shape == mask.shape == logp.shape and ids.shape[0] == ROWS
    prev = torch.full((ROWS,), 1)
    for t in range(ids.shape[1]):
        want = torch.log_softmax(table[prev] / 2.0 / 0.7, -1).gather(1, ids[:, t:t + 1]).squeeze(1)
        live = mask[:, t]
        assert torch.allclose(logp[live, t], want[live], atol=1e-6)
        assert (logp[~live, t] == 0).all() and (ids[~live, t] == PAD).all()
        prev = ids[:, t]
    lengths = mask.sum(1)
    stopped = ~out.truncated
    assert stopped.any() and out.truncated.any()
    assert (ids[stopped, lengths[stopped] - 1] == EOS).all()
    assert (lengths[out.truncated] == 10).all() and not (ids[out.truncated] == EOS).any()
    assert torch.equal(mask, torch.arange(ids.shape[1]) < lengths.unsqueeze(1))  # mask is a prefix
    assert len(calls) == ids.shape[1] - 1  # no step after the last token


def test_distribution_matches_scaled_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 3.0, 0.5, -2.0])
    table = logits.expand(V, V).clone()
    prefill, step, _ = _bigram(table, rows=40000)
    out = sample_tokens(prefill, step, max_new_tokens=1, eos_token_id=EOS, pad_token_id=PAD,
                        logits_scaling=4.0, temperature=0.5, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(out.token_ids[:, 0], minlength=V).float() / 40000
    assert (freq - torch.softmax(logits / 4.0 / 0.5, -1)).abs().max() < 0.01
    # a wrong scaling (the 5.x bug) would be visibly off
    assert (freq - torch.softmax(logits / 0.5, -1)).abs().max() > 0.1


def test_top_p_matches_hf_warper_and_greedy():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(32, 50, generator=g) * 2
    for top_p in (0.3, 0.75, 0.9):
        hf_keep = torch.isfinite(TopPLogitsWarper(top_p)(None, scores.clone()))
        assert torch.equal(top_p_keep(torch.softmax(scores, -1), top_p), hf_keep)
    table = torch.randn(V, V, generator=g)
    prefill, step, _ = _bigram(table)
    out = sample_tokens(prefill, step, max_new_tokens=3, eos_token_id=EOS, pad_token_id=PAD, logits_scaling=3.0,
                        temperature=0.0)
    assert (out.token_ids[:, 0] == table[1].argmax()).all()


def test_token_logprobs_and_entropy():
    scaled = scale_logits(torch.randn(3, 4, 11), 2.0, 0.5)
    ids = torch.randint(0, 11, (3, 4))
    lp, ent = token_logprobs(scaled, ids, return_entropy=True)
    dist = torch.distributions.Categorical(logits=scaled)
    assert torch.allclose(lp, dist.log_prob(ids), atol=1e-6)
    assert torch.allclose(ent, dist.entropy(), atol=1e-6)
