"""Group-relative advantages, hand-computed (G=4, two groups)."""

import math

import pytest
import torch

from vlmalign.rl.advantages import group_advantages, nanstd, slice_for_process

EPS = 1e-4
NAN = float("nan")

# Group 0: [2, NaN, 4, 6] -> valid mean 4, deviations -2, 0, +2, unbiased std sqrt((4 + 0 + 4) / 2) = 2.
# Group 1: [1, 1, 1, 1]   -> mean 1, std 0 (zero-std group).
REWARDS = torch.tensor([2.0, NAN, 4.0, 6.0, 1.0, 1.0, 1.0, 1.0])


def test_group_scaling():
    adv, metrics = group_advantages(REWARDS, num_generations=4, scale_rewards="group", eps=EPS)
    expected = [-2 / (2 + EPS), 0.0, 0.0, 2 / (2 + EPS), 0.0, 0.0, 0.0, 0.0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)
    assert adv.dtype == torch.float32
    assert metrics["frac_reward_zero_std"] == 0.5
    assert metrics["reward_std"] == pytest.approx((2.0 + 0.0) / 2)


def test_batch_scaling_uses_group_mean_and_batch_std():
    adv, _ = group_advantages(REWARDS, num_generations=4, scale_rewards="batch", eps=EPS)
    valid = [2.0, 4.0, 6.0, 1.0, 1.0, 1.0, 1.0]  # the NaN is left out
    mean = sum(valid) / 7  # 16/7
    batch_std = math.sqrt(sum((v - mean) ** 2 for v in valid) / 6)  # unbiased
    expected = [-2 / (batch_std + EPS), 0.0, 0.0, 2 / (batch_std + EPS), 0.0, 0.0, 0.0, 0.0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)


def test_none_scaling_is_dr_grpo():
    adv, metrics = group_advantages(REWARDS, num_generations=4, scale_rewards="none")
    assert adv.tolist() == [-2.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0]
    assert metrics["frac_reward_zero_std"] == 0.5


def test_group_scaling_without_nan():
    # [0, 0, 1, 1]: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3); [3, 3, 3, 3]: zero std.
    rewards = torch.tensor([0.0, 0.0, 1.0, 1.0, 3.0, 3.0, 3.0, 3.0])
    adv, metrics = group_advantages(rewards, 4)
    a = 0.5 / (math.sqrt(1 / 3) + EPS)
    assert adv.tolist() == pytest.approx([-a, -a, a, a, 0, 0, 0, 0], abs=1e-6)
    assert metrics["reward_std"] == pytest.approx(math.sqrt(1 / 3) / 2)


def test_all_nan_group_gets_zero_advantage():
    rewards = torch.tensor([NAN, NAN, NAN, NAN, 0.0, 1.0, 0.0, 1.0])
    adv, metrics = group_advantages(rewards, 4, "none")
    assert adv.tolist() == [0.0, 0.0, 0.0, 0.0, -0.5, 0.5, -0.5, 0.5]
    assert metrics["frac_reward_zero_std"] == 0.5  # a group without valid rewards gives no signal


def test_invalid_inputs():
    with pytest.raises(ValueError, match="not a multiple of num_generations"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(4), 4, scale_rewards="std")
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 4), 4)


def test_nanstd():
    assert nanstd(torch.tensor([2.0, NAN, 4.0, 6.0])).item() == pytest.approx(2.0)
    assert nanstd(torch.tensor([5.0, NAN])).item() == 0.0
    assert math.isnan(nanstd(torch.tensor([NAN, NAN])).item())


def test_slice_for_process():
    x = torch.arange(8)
    assert slice_for_process(x, 0, 2).tolist() == [0, 1, 2, 3]
    assert slice_for_process(x, 1, 2).tolist() == [4, 5, 6, 7]
    assert slice_for_process(x, 0, 1).tolist() == list(range(8))
    with pytest.raises(ValueError):
        slice_for_process(x, 0, 3)
    with pytest.raises(ValueError):
        slice_for_process(x, 2, 2)
