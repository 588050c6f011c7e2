"""Truncated importance sampling (vLLM sampling vs trainer policy) on a hand-built example: every expected number is
written out from the formula rho = exp(old - sampling) (per token, or exp of the row's sum), truncated / masked."""

import math

import pytest
import torch

from vlmalign.losses.policy import policy_loss
from vlmalign.losses.sampling_correction import sampling_importance_weights, sampling_logp_difference

OLD = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]])
SAMPLED = torch.tensor([[-1.5, -1.0, -0.5], [-0.3, -1.0, float("nan")]])   # row 1's last token is padding
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
# d = old - sampled: row 0 [0.5, -1.0, 0.0] (sum -0.5), row 1 [0.0, 0.3] (sum 0.3)


@pytest.mark.parametrize("mode,clip_max,clip_min,expected", [
    ("token_truncate", 1.5, None, [[1.5, math.exp(-1.0), 1.0], [1.0, math.exp(0.3), 1.0]]),
    ("token_truncate", 1.5, 0.5, [[1.5, 0.5, 1.0], [1.0, math.exp(0.3), 1.0]]),
    ("token_mask", 1.5, None, [[0.0, math.exp(-1.0), 1.0], [1.0, math.exp(0.3), 1.0]]),
    ("token_mask", 1.5, 0.5, [[0.0, 0.0, 1.0], [1.0, math.exp(0.3), 1.0]]),
    ("sequence_truncate", 1.2, None, [[math.exp(-0.5)] * 3, [1.2, 1.2, 1.0]]),
    ("sequence_mask", 1.2, None, [[math.exp(-0.5)] * 3, [0.0, 0.0, 1.0]]),
    ("sequence_mask", 3.0, 0.7, [[0.0] * 3, [math.exp(0.3), math.exp(0.3), 1.0]]),
])
def test_weights_by_hand(mode, clip_max, clip_min, expected):
    rho = sampling_importance_weights(OLD, SAMPLED, MASK, mode=mode, clip_max=clip_max, clip_min=clip_min)
    torch.testing.assert_close(rho, torch.tensor(expected), rtol=0, atol=1e-6)


def test_bad_mode_and_range():
    with pytest.raises(ValueError, match="token_truncate"):
        sampling_importance_weights(OLD, SAMPLED, MASK, mode="tis")
    with pytest.raises(ValueError, match="clip_min"):
        sampling_importance_weights(OLD, SAMPLED, MASK, clip_max=1.0, clip_min=2.0)


def test_logp_difference():
    stats = sampling_logp_difference(OLD, SAMPLED, MASK)
    assert stats["max"].item() == pytest.approx(1.0)
    assert stats["mean"].item() == pytest.approx((0.5 + 1.0 + 0.0 + 0.0 + 0.3) / 5)


def test_tis_changes_the_loss_as_its_formula_says():
    """On-policy (ratio 1, no clipping), bnpo: loss = sum_t -rho_t * A_i / (valid tokens), and the gradient on each
    token's log-prob is -rho_t * A_i / 5; the KL term is not weighted."""
    advantages = torch.tensor([1.0, -2.0])
    rho = sampling_importance_weights(OLD, SAMPLED, MASK, mode="token_truncate", clip_max=1.5)
    logps = OLD.clone().masked_fill(~MASK.bool(), 0.0).requires_grad_(True)
    loss, _ = policy_loss(logps, OLD, advantages, MASK, loss_type="bnpo", sampling_weights=rho)
    expected = (-(1.5 + math.exp(-1.0) + 1.0) * 1.0 + (1.0 + math.exp(0.3)) * 2.0) / 5
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    grad = torch.tensor([[-1.5, -math.exp(-1.0), -1.0], [2.0, 2.0 * math.exp(0.3), 0.0]]) / 5
    torch.testing.assert_close(logps.grad, grad, rtol=0, atol=1e-6)
    plain, _ = policy_loss(OLD.clone(), OLD, advantages, MASK, loss_type="bnpo")
    assert plain.item() == pytest.approx((-3.0 + 4.0) / 5, abs=1e-6)
    # beta > 0: rho weights the policy term only; ref = old - 0.1 gives k3 = exp(-0.1) + 0.1 - 1 on every token
    ref = OLD - 0.1
    with_kl, _ = policy_loss(OLD.clone(), OLD, advantages, MASK, loss_type="bnpo", sampling_weights=rho, beta=0.5,
                             ref_logps=ref)
    assert with_kl.item() == pytest.approx(expected + 0.5 * (math.exp(-0.1) + 0.1 - 1.0), abs=1e-6)
