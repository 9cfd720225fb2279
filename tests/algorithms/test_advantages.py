"""Group advantages (Eq. 1), the dynamic-sampling filter and overlong masking, against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from nemo_grpo.algorithms import group_advantages, mask_truncated, nonzero_variance_groups

D = torch.float64


def test_default_is_unbiased_std_plus_1e4():
    # mean 0.5; unbiased std sqrt((4 * 0.25) / 3) = 1/sqrt(3)
    a = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=D))
    s = 0.5 / (1 / math.sqrt(3) + 1e-4)
    torch.testing.assert_close(a, torch.tensor([[s, -s, -s, s]], dtype=D), rtol=1e-12, atol=1e-12)


def test_population_std_no_eps():
    a = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=D), unbiased=False, eps=0.0)
    torch.testing.assert_close(a, torch.tensor([[1.0, -1.0, -1.0, 1.0]], dtype=D))


def test_several_groups_are_independent():
    r = torch.tensor([[0.0, 1.0, 2.0, 3.0], [10.0, 10.0, 10.0, 14.0]], dtype=D)
    a = group_advantages(r, eps=0.0)
    s0 = math.sqrt(5 / 3)  # unbiased std of 0..3
    s1 = math.sqrt(12 / 3)  # mean 11, squared deviations 1, 1, 1, 9
    want = torch.tensor([[-1.5 / s0, -0.5 / s0, 0.5 / s0, 1.5 / s0], [-1 / s1, -1 / s1, -1 / s1, 3 / s1]], dtype=D)
    torch.testing.assert_close(a, want)


def test_no_std_scaling_and_leave_one_out():
    r = torch.tensor([[0.0, 1.0, 2.0, 3.0]], dtype=D)
    torch.testing.assert_close(group_advantages(r, scale_by_std=False), torch.tensor([[-1.5, -0.5, 0.5, 1.5]], dtype=D))
    # baseline of member i = mean of the other three: 2, 5/3, 4/3, 1
    loo = group_advantages(r, scale_by_std=False, leave_one_out=True)
    torch.testing.assert_close(loo, torch.tensor([[-2.0, -2 / 3, 2 / 3, 2.0]], dtype=D))
    loo_s = group_advantages(r, leave_one_out=True, eps=0.0)
    torch.testing.assert_close(loo_s, loo / math.sqrt(5 / 3))


def test_exclude_mask_keeps_member_out_of_statistics():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.2, 0.4, 0.6, 1.0]], dtype=D)
    excl = torch.tensor([[False, False, False, True], [False, False, False, True]])
    a = group_advantages(r, exclude_mask=excl, unbiased=False, eps=0.0)
    # group 0: stats over [1, 0, 0]: mean 1/3, population std sqrt(2)/3
    s = math.sqrt(2) / 3
    g0 = [(2 / 3) / s, -(1 / 3) / s, -(1 / 3) / s, (2 / 3) / s]
    # group 1: stats over [0.2, 0.4, 0.6]: mean 0.4, population std sqrt(0.08 / 3)
    s1 = math.sqrt(0.08 / 3)
    g1 = [-0.2 / s1, 0.0, 0.2 / s1, 0.6 / s1]
    torch.testing.assert_close(a, torch.tensor([g0, g1], dtype=D))
    # default (None) includes the member, as the paper does
    want = torch.tensor([[1.0, -1, -1, 1]], dtype=D)
    torch.testing.assert_close(group_advantages(r[:1], unbiased=False, eps=0.0), want)


def test_zero_variance_and_degenerate_groups_are_exactly_zero():
    # 0.1 * 3 rounds, so a float mean of equal values is not exactly the value: the test must be exact anyway.
    for dtype in (torch.float32, torch.float64):
        r = torch.tensor([[0.1] * 8, [0.7] * 8, [0.0, 1, 0, 1, 0, 1, 0, 1]], dtype=dtype)
        a = group_advantages(r, eps=0.0)
        assert torch.isfinite(a).all()
        assert torch.equal(a[:2], torch.zeros(2, 8, dtype=dtype))
        assert (a[2].abs() > 0.9).all()
        assert torch.equal(group_advantages(r, leave_one_out=True)[:2], torch.zeros(2, 8, dtype=dtype))
    # G = 1, and a group whose only included member is one
    assert torch.equal(group_advantages(torch.tensor([[0.3], [0.9]])), torch.zeros(2, 1))
    one_left = group_advantages(torch.tensor([[0.3, 0.9]]), exclude_mask=torch.tensor([[False, True]]))
    assert torch.equal(one_left, torch.zeros(1, 2))


def test_bad_rewards_raise_naming_the_item():
    with pytest.raises(ValueError, match=r"rewards\[1, 2\]"):
        group_advantages(torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, float("nan")]]))
    with pytest.raises(ValueError, match=r"\[B, G\]"):
        group_advantages(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="exclude_mask"):
        group_advantages(torch.zeros(2, 3), exclude_mask=torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="eps"):
        group_advantages(torch.zeros(2, 3), eps=-1.0)


def test_nonzero_variance_groups():
    r = torch.tensor([[0.5, 0.5, 0.5], [0.0, 0.0, 1e-6], [1.0, 0.0, 1.0]])
    assert nonzero_variance_groups(r).tolist() == [False, True, True]
    assert nonzero_variance_groups(torch.tensor([[0.3], [0.1]])).tolist() == [False, False]


def test_mask_truncated_returns_new_mask():
    mask = torch.tensor([[True, True, False], [True, True, True], [True, False, False]])
    before = mask.clone()
    out = mask_truncated(mask, torch.tensor([False, True, False]))
    assert out.tolist() == [[True, True, False], [False, False, False], [True, False, False]]
    assert torch.equal(mask, before) and out.data_ptr() != mask.data_ptr()
    with pytest.raises(ValueError, match="truncated"):
        mask_truncated(mask, torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="mask"):
        mask_truncated(mask.long(), torch.tensor([False, True, False]))
