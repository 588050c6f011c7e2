"""TRL 1.16's other GRPO loss types (cispo, sapo, luspo, vespo) and the importance-corrected KL: values computed
by hand from the papers' formulas (with `math`, independently of the implementation), plus gradient identities."""

import math

import pytest
import torch

from vlmalign.losses import policy_loss
from vlmalign.losses.policy_variants import vespo_weights

LOGPS = [[-1.0, -2.0], [-0.5, -1.5]]
OLD = [[-1.2, -2.0], [-0.5, -1.0]]
ADV = [1.0, -1.0]


def _run(loss_type, mask=((1, 1), (1, 1)), **kw):
    logps = torch.tensor(LOGPS, dtype=torch.float64, requires_grad=True)
    loss, _ = policy_loss(logps, torch.tensor(OLD, dtype=torch.float64), torch.tensor(ADV, dtype=torch.float64),
                          torch.tensor(mask, dtype=torch.float64), loss_type=loss_type, **kw)
    loss.backward()
    return loss.item(), logps.grad


def test_cispo_hand_values():
    eps_max = 1.1
    r = [[math.exp(0.2), 1.0], [1.0, math.exp(-0.5)]]
    terms = [-min(r[i][t], eps_max) * ADV[i] * LOGPS[i][t] for i in range(2) for t in range(2)]
    loss, grad = _run("cispo", epsilon_high=eps_max)
    assert loss == pytest.approx(sum(terms) / 4)
    # the clipped ratio is a constant: d/dlogp = -min(r, eps_max) * A / N, even where the ratio is clipped
    assert grad[0, 0].item() == pytest.approx(-eps_max * 1.0 / 4)
    assert grad[1, 1].item() == pytest.approx(-math.exp(-0.5) * -1.0 / 4)


def test_sapo_hand_values_and_unit_gradient_on_policy():
    tau_pos, tau_neg = 1.0, 1.05
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    r = [[math.exp(0.2), 1.0], [1.0, math.exp(-0.5)]]
    rows = []
    for i in range(2):
        tau = tau_pos if ADV[i] > 0 else tau_neg
        rows.append(sum(-(4 / tau) * sig(tau * (r[i][t] - 1)) * ADV[i] for t in range(2)) / 2)
    loss, _ = _run("sapo", sapo_temperature_pos=tau_pos, sapo_temperature_neg=tau_neg)
    assert loss == pytest.approx(sum(rows) / 2)
    # on-policy (ratio 1) the soft gate has slope 1: SAPO's gradient equals GRPO's
    logps = torch.tensor(LOGPS, dtype=torch.float64, requires_grad=True)
    grads = []
    for loss_type in ("sapo", "grpo"):
        logps.grad = None
        loss, _ = policy_loss(logps, logps.detach(), torch.tensor(ADV, dtype=torch.float64), torch.ones(2, 2,
                              dtype=torch.float64), loss_type=loss_type)
        loss.backward()
        grads.append(logps.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_luspo_scales_sequence_loss_by_length():
    # on-policy, sequence-level ratio 1: per-token loss -A, summed over each row's valid tokens, mean over rows
    logps = torch.tensor(LOGPS, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    loss, _ = policy_loss(logps, logps.detach(), torch.tensor(ADV, dtype=torch.float64), mask, loss_type="luspo",
                          importance_sampling_level="sequence")
    assert loss.item() == pytest.approx((-1.0 * 2 + 1.0 * 1) / 2)


def test_vespo_hand_values_and_phi_one_on_policy():
    k_pos, lam_pos, k_neg, lam_neg = 2.0, 3.0, 3.0, 2.0
    phi0 = math.exp(lam_pos + k_pos * 0.2 - lam_pos * math.exp(0.2))      # row 0: sum log r = 0.2, A > 0
    phi1 = math.exp(lam_neg + k_neg * -0.5 - lam_neg * math.exp(-0.5))    # row 1: sum log r = -0.5, A < 0
    expected = (-phi0 * 1.0 * (LOGPS[0][0] + LOGPS[0][1]) - phi1 * -1.0 * (LOGPS[1][0] + LOGPS[1][1])) / 4
    loss, grad = _run("vespo", vespo_params=(k_pos, lam_pos, k_neg, lam_neg))
    assert loss == pytest.approx(expected)
    assert grad[0, 1].item() == pytest.approx(-phi0 / 4)   # phi is a constant weight
    on_policy = vespo_weights(torch.zeros(2, 3), torch.ones(2, 3), torch.tensor([[1.0], [-1.0]]), 2, 3, 3, 2)
    torch.testing.assert_close(on_policy, torch.ones(2, 1))


def test_kl_importance_correction():
    ref = torch.tensor([[-1.1, -1.9], [-0.7, -1.2]], dtype=torch.float64)
    logps = torch.tensor(LOGPS, dtype=torch.float64)
    values = {}
    for corrected in (False, True):
        values[corrected], _ = policy_loss(logps, torch.tensor(OLD, dtype=torch.float64), torch.zeros(2, dtype=
                                           torch.float64), torch.ones(2, 2, dtype=torch.float64), loss_type="bnpo",
                                           beta=0.5, ref_logps=ref, kl_importance_correction=corrected)
    kl = [[math.exp(ref[i, t].item() - LOGPS[i][t]) - (ref[i, t].item() - LOGPS[i][t]) - 1 for t in range(2)]
          for i in range(2)]
    r = [[math.exp(LOGPS[i][t] - OLD[i][t]) for t in range(2)] for i in range(2)]
    assert values[False].item() == pytest.approx(0.5 * sum(map(sum, kl)) / 4)
    assert values[True].item() == pytest.approx(0.5 * sum(kl[i][t] * r[i][t] for i in range(2) for t in range(2)) / 4)
