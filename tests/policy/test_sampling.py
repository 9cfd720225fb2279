"""The backend-agnostic sampler on a known bigram 'model' (exact probabilities), and top-p vs HF's warper."""
import torch
from scipy.stats import chisquare
from transformers.generation.logits_process import TopPLogitsWarper

from nemo_grpo.policy.sampling import draw_inverse_cdf, sample_tokens, scale_logits, token_logprobs, top_p_keep

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


def _one_step_counts(logits, rows, top_p=1.0, seed=0):
    """Token counts [V] of ``rows`` single-token draws by ``sample_tokens`` from one fixed logits row [V]."""
    table = logits.expand(len(logits), len(logits)).clone()
    prefill, step, _ = _bigram(table, rows=rows)
    out = sample_tokens(prefill, step, max_new_tokens=1, eos_token_id=EOS, pad_token_id=PAD, logits_scaling=1.0,
                        top_p=top_p, generator=torch.Generator().manual_seed(seed))
    return torch.bincount(out.token_ids[:, 0], minlength=len(logits)).double()


def _chi2_p(counts, probs):
    """Pearson chi-square p-value of counts [V] against probs [V] over the tokens with probs > 0."""
    live = probs > 0
    return chisquare(counts[live], probs[live] / probs[live].sum() * counts[live].sum()).pvalue


def test_inverse_cdf_draw_is_the_softmax_distribution_chi_square():
    """Pearson chi-square of 200k draws against softmax(logits), incl. a token of probability ~2e-4 and one of 0
    (-inf logit, never drawn). Negative controls: the same counts reject a distribution shifted by one token and one
    with two probabilities swapped."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 3.0, -5.0, float("-inf")])
    probs = torch.softmax(logits, -1).double()
    n = 200_000
    counts = _one_step_counts(logits, n)
    assert counts[6] == 0  # probability 0 is never drawn
    p_value = _chi2_p(counts, probs)
    assert p_value > 1e-3, p_value  # the seeded test either passes or fails for good; a wrong draw gives ~0
    for wrong in (probs.roll(1), probs[[0, 1, 2, 4, 3, 5, 6]]):
        assert _chi2_p(counts, wrong) < 1e-12


def test_top_p_draws_exactly_the_minimal_nucleus_renormalised():
    """top_p 0.8 on probabilities [.45, .25, .15, .1, .05]: the minimal set with mass >= 0.8 is the top 3 (0.85;
    the top 2 have only 0.70). Draws hit exactly those, in proportion .45:.25:.15 (chi-square)."""
    probs = torch.tensor([0.25, 0.05, 0.45, 0.1, 0.15, 0.0, 0.0]).double()  # order scrambled on purpose
    logits = probs.float().log()
    assert torch.equal(top_p_keep(torch.softmax(logits, -1)[None], 0.8)[0],
                       torch.tensor([True, False, True, False, True, False, False]))
    n = 100_000
    counts = _one_step_counts(logits, n, top_p=0.8)
    nucleus = torch.tensor([0, 2, 4])
    assert counts.sum() == counts[nucleus].sum() == n  # nothing outside the nucleus
    p_value = _chi2_p(counts[nucleus], probs[nucleus])
    assert p_value > 1e-3, p_value
    assert _chi2_p(counts[nucleus], probs[[0, 2, 3]]) < 1e-12  # the test tells nucleus members apart


def test_inverse_cdf_edges_never_pick_a_zero_probability_token():
    """u = 1 (the largest uniform) picks the LAST token with mass, u -> 0 the FIRST, even with zero-mass tokens at
    both ends and in between; rows need not sum to 1 (a top-p-masked row)."""
    probs = torch.tensor([[0.0, 0.3, 0.0, 0.2, 0.0], [0.0, 0.0, 0.5, 0.0, 0.0]])
    hi = draw_inverse_cdf(probs, torch.ones(2, 1, dtype=torch.float64))
    lo = draw_inverse_cdf(probs, torch.full((2, 1), 2.0 ** -53, dtype=torch.float64))
    assert hi.tolist() == [3, 2] and lo.tolist() == [1, 2]
    mid = draw_inverse_cdf(probs, torch.tensor([[0.6], [0.5]], dtype=torch.float64))  # 0.6 * 0.5 = 0.3 <= cdf[1]
    assert mid.tolist() == [1, 2]


def test_sparse_stop_checks_give_the_same_output():
    """``stop_check_every`` > 1 (the accelerator default) only adds step calls after every row has finished; the
    returned tokens, mask, log-probs and truncation flags are those of checking every step."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(V, V, generator=g) * 3
    table[:, PAD] = -1e4
    table[:, EOS] += 2.0  # every row stops within a few tokens
    outs = []
    for every in (1, 4):
        prefill, step, calls = _bigram(table)
        outs.append((sample_tokens(prefill, step, max_new_tokens=30, eos_token_id=EOS, pad_token_id=PAD,
                                   logits_scaling=1.0, generator=torch.Generator().manual_seed(3),
                                   stop_check_every=every), len(calls)))
    (a, calls_a), (b, calls_b) = outs
    assert not a.truncated.any() and a.token_ids.shape[1] < 30
    for name in ("token_ids", "mask", "logprobs", "truncated"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert calls_a == a.token_ids.shape[1] - 1 <= calls_b
