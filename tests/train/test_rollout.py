"""The rollout engine on the real tiny policy: grouping, encode-once, mixed-policy reference members."""
import torch

from nemo_grpo.policy.inputs import encode_completions
from nemo_grpo.rollout import rollout
from tests.train.conftest import make_batch


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_on_policy_rollout_is_one_generate_call(tiny_policy):
    batch = make_batch(tiny_policy)
    calls = {"encode": 0}
    orig = tiny_policy.encode

    def counting(b):
        calls["encode"] += 1
        return orig(b)

    tiny_policy.encode = counting
    try:
        ro = rollout(tiny_policy, batch, num_samples=4, max_new_tokens=6, generator=_gen(1))
    finally:
        del tiny_policy.encode
    assert calls["encode"] == 1  # audio encoded once for all B*G samples
    c = ro.completions
    assert len(c) == 12 and c.group.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert not c.off_policy.any()
    ref = tiny_policy.generate(tiny_policy.encode(batch), 4, 6, generator=_gen(1))
    assert torch.equal(c.token_ids, ref.token_ids) and torch.equal(c.logprobs, ref.logprobs)
    assert ro.stats["rollout/gen_tokens"] == float(c.mask.sum()) and ro.stats["perf/rollout_tokens_per_s"] > 0


def test_mixed_policy_appends_reference_as_last_off_policy_member(tiny_policy):
    batch = make_batch(tiny_policy)
    g = 4
    ro = rollout(tiny_policy, batch, num_samples=g, mixed_policy=True, max_new_tokens=5, generator=_gen(2))
    c = ro.completions
    sampled = tiny_policy.generate(tiny_policy.encode(batch), g - 1, 5, generator=_gen(2))
    ref_ids, ref_mask, ref_cut = encode_completions(tiny_policy.tokenizer, batch.references, max_tokens=5)
    assert len(c) == 3 * g and c.group.tolist() == [b for b in range(3) for _ in range(g)]
    assert c.off_policy.tolist() == ([False] * (g - 1) + [True]) * 3
    t_gen, t_ref = sampled.token_ids.shape[1], ref_ids.shape[1]
    for b in range(3):
        rows = slice(b * g, b * g + g - 1)
        assert torch.equal(c.token_ids[rows, :t_gen], sampled.token_ids[b * (g - 1):(b + 1) * (g - 1)])
        assert not c.mask[rows, t_gen:].any()
        r = b * g + g - 1
        assert torch.equal(c.token_ids[r, :t_ref], ref_ids[b]) and torch.equal(c.mask[r, :t_ref], ref_mask[b])
        assert not c.mask[r, t_ref:].any() and (c.token_ids[r, t_ref:] == tiny_policy.pad_token_id).all()
        assert (c.logprobs[r] == 0).all()  # pi_phi = 1, never generated
        n = int(ref_mask[b].sum())
        if ref_cut[b]:  # longer than max_new_tokens: cut without eos, rewarded as the cut text it trains on
            assert c.truncated[r] and n == 5 and tiny_policy.eos_token_id not in c.token_ids[r, :n].tolist()
            assert c.texts[r] == tiny_policy.tokenizer.decode(ref_ids[b, :n], skip_special_tokens=True)
            assert batch.references[b].startswith(c.texts[r]) and c.texts[r] != batch.references[b]
        else:
            assert not c.truncated[r] and c.texts[r] == batch.references[b]
            assert c.token_ids[r, n - 1] == tiny_policy.eos_token_id  # eos counted
    assert ref_cut.any() and not ref_cut.all()  # both cases ran
    assert ro.stats["rollout/gen_tokens"] == float(sampled.mask.sum())  # the reference is not "generated"
