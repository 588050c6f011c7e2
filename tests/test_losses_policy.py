"""GRPO / GSPO clipped objective checked against values computed by hand on a tiny [2, 3] batch."""

import math

import pytest
import torch

from vlmalign.losses import importance_weights, k3_kl, policy_loss

# Two completions, T = 3; the second has a padded last token holding garbage.
LOGPS = [[-1.0, -2.0, -0.5], [-0.3, -1.5, -30.0]]
OLD = [[-1.1, -1.7, -0.9], [-0.2, -1.2, 7.0]]
REF = [[-1.3, -1.8, -0.6], [-0.1, -1.9, 3.0]]
MASK = [[1, 1, 1], [1, 1, 0]]
ADV = [1.5, -0.8]
VALID = [[(i, t) for t in range(3) if MASK[i][t]] for i in range(2)]
N_VALID = 5


def tensors(requires_grad=False):
    logps = torch.tensor(LOGPS, dtype=torch.float64, requires_grad=requires_grad)
    old = torch.tensor(OLD, dtype=torch.float64)
    mask = torch.tensor(MASK, dtype=torch.float64)
    adv = torch.tensor(ADV, dtype=torch.float64)
    return logps, old, adv, mask


# ---- plain-python reference -----------------------------------------------------------------------


def clip(x, lo, hi):
    return max(lo, min(hi, x))


def hand_ratio(i, t, level):
    """Token ratio exp(l - l_old) or GSPO's exp(mean over the row's valid tokens of (l - l_old))."""
    if level == "token":
        return math.exp(LOGPS[i][t] - OLD[i][t])
    return math.exp(sum(LOGPS[i][s] - OLD[i][s] for _, s in VALID[i]) / len(VALID[i]))


def hand_token_loss(i, t, level="token", eps_low=0.2, eps_high=None, delta=None, beta=0.0):
    eps_high = eps_low if eps_high is None else eps_high
    w, a = hand_ratio(i, t, level), ADV[i]
    unclipped = min(w, delta) if delta is not None else w
    loss = -min(unclipped * a, clip(w, 1 - eps_low, 1 + eps_high) * a)
    if beta:
        d = REF[i][t] - LOGPS[i][t]
        loss += beta * (math.exp(d) - d - 1)
    return loss


def hand_aggregate(loss_type, max_len=None, num_items=None, **kw):
    per_row = [[hand_token_loss(i, t, **kw) for _, t in VALID[i]] for i in range(2)]
    total = sum(sum(r) for r in per_row)
    if loss_type == "grpo":
        return sum(sum(r) / len(r) for r in per_row) / 2
    if loss_type == "bnpo":
        return total / N_VALID
    if loss_type == "dr_grpo":
        return total / (2 * max_len)
    if loss_type == "dapo":
        return total / (num_items if num_items is not None else N_VALID)
    raise AssertionError(loss_type)


def run(loss_type="grpo", level="token", **kw):
    logps, old, adv, mask = tensors()
    return policy_loss(logps, old, adv, mask, loss_type=loss_type, importance_sampling_level=level, **kw)


# ---- every loss_type x level, by hand ------------------------------------------------------------------

AGG_OPTIONS = {
    "grpo": {},
    "bnpo": {},
    "dr_grpo": {"max_completion_length": 4},
    "dapo": {"num_items_in_batch": 12},
}


@pytest.mark.parametrize("level", ["token", "sequence", "sequence_token"])
@pytest.mark.parametrize("loss_type", sorted(AGG_OPTIONS))
def test_loss_matches_hand_value(loss_type, level):
    opts = AGG_OPTIONS[loss_type]
    loss, _ = run(loss_type, level, epsilon_low=0.1, epsilon_high=0.05, **opts)
    expected = hand_aggregate(
        loss_type,
        max_len=opts.get("max_completion_length"),
        num_items=opts.get("num_items_in_batch"),
        level=level,
        eps_low=0.1,
        eps_high=0.05,
    )
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_token_level_default_epsilon_values():
    # eps = 0.2: token (0,1) ratio 0.741 unclipped branch; (0,2) ratio 1.49 clipped at 1.2; (1,1) low-clipped at 0.8
    assert hand_token_loss(0, 2) == pytest.approx(-1.2 * 1.5)
    assert hand_token_loss(1, 1) == pytest.approx(0.8 * 0.8)
    loss, _ = run("bnpo")
    assert loss.item() == pytest.approx(hand_aggregate("bnpo"), rel=1e-12)


def test_dapo_falls_back_to_local_token_count():
    loss, _ = run("dapo")
    assert loss.item() == pytest.approx(hand_aggregate("dapo"), rel=1e-12)
    loss_t, _ = run("dapo", num_items_in_batch=torch.tensor(12.0))
    assert loss_t.item() == pytest.approx(hand_aggregate("dapo", num_items=12), rel=1e-12)


def test_dr_grpo_requires_max_completion_length():
    with pytest.raises(ValueError, match="max_completion_length"):
        run("dr_grpo")


def test_unknown_options_raise():
    with pytest.raises(ValueError, match="loss_type"):
        run("ppo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        run("grpo", "tokens")
    logps, old, adv, mask = tensors()
    with pytest.raises(ValueError, match="ref_logps"):
        policy_loss(logps, old, adv, mask, beta=0.1)


# ---- importance ratios ------------------------------------------------------------------------------------


def test_gspo_ratio_is_exp_of_mean_token_log_ratio():
    logps, old, _, mask = tensors()
    w = importance_weights(logps, old, mask, "sequence")
    assert w.shape == (2, 3)
    s0 = math.exp(((-1.0 + 1.1) + (-2.0 + 1.7) + (-0.5 + 0.9)) / 3)
    s1 = math.exp(((-0.3 + 0.2) + (-1.5 + 1.2)) / 2)  # padded token excluded
    assert w[0].tolist() == pytest.approx([s0] * 3, rel=1e-12)
    assert w[1, :2].tolist() == pytest.approx([s1] * 2, rel=1e-12)
    w_st = importance_weights(logps, old, mask, "sequence_token")
    assert w_st[0].tolist() == pytest.approx([s0] * 3, rel=1e-12)
    assert w_st[1, :2].tolist() == pytest.approx([s1] * 2, rel=1e-12)


def test_token_ratio():
    logps, old, _, mask = tensors()
    w = importance_weights(logps, old, mask, "token")
    for i, t in VALID[0] + VALID[1]:
        assert w[i, t].item() == pytest.approx(math.exp(LOGPS[i][t] - OLD[i][t]), rel=1e-12)


@pytest.mark.parametrize("level", ["token", "sequence", "sequence_token"])
def test_on_policy_ratio_is_one_and_no_clipping(level):
    logps, _, adv, mask = tensors(requires_grad=True)
    w = importance_weights(logps, logps.detach(), mask, level)
    assert torch.allclose(w[mask.bool()], torch.ones(N_VALID, dtype=torch.float64))
    loss, metrics = policy_loss(logps, logps.detach(), adv, mask, importance_sampling_level=level)
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert metrics[key].item() == 0.0
    # on-policy the value is -mean_i A_i and the gradient is the policy gradient -A_i / |y_i| per token
    assert loss.item() == pytest.approx(-(1.5 - 0.8) / 2)
    loss.backward()
    expected = [[-1.5 / 3 / 2] * 3, [0.8 / 2 / 2, 0.8 / 2 / 2, 0.0]]
    assert logps.grad.tolist() == [pytest.approx(r, rel=1e-12) for r in expected]


def test_off_policy_clip_metrics():
    _, metrics = run("grpo", "token")  # eps = 0.2
    # high: A>0 and w>1.2 -> (0,2) w=1.49; low: A<0 and w<0.8 -> (1,1) w=0.741; out of 5 valid tokens
    assert metrics["clip_ratio/high_mean"].item() == pytest.approx(1 / 5)
    assert metrics["clip_ratio/low_mean"].item() == pytest.approx(1 / 5)
    assert metrics["clip_ratio/region_mean"].item() == pytest.approx(2 / 5)
    assert all(not v.requires_grad for v in metrics.values())
    assert "kl" not in metrics

    _, seq_metrics = run("grpo", "sequence", epsilon_low=0.1, epsilon_high=0.05)
    # s0 = exp(0.0667) = 1.069 > 1.05 with A>0 (3 tokens); s1 = exp(-0.2) = 0.819 < 0.9 with A<0 (2 tokens)
    assert seq_metrics["clip_ratio/high_mean"].item() == pytest.approx(3 / 5)
    assert seq_metrics["clip_ratio/low_mean"].item() == pytest.approx(2 / 5)
    assert seq_metrics["clip_ratio/region_mean"].item() == pytest.approx(1.0)


@pytest.mark.parametrize("loss_type", sorted(AGG_OPTIONS))
@pytest.mark.parametrize("eps", [0.2, 0.15, 0.02])  # clips neither row / only row 1 (s=0.82) / both rows
def test_sequence_token_gradient_equals_sequence_gradient(loss_type, eps):
    grads = {}
    for level in ("sequence", "sequence_token"):
        logps, old, adv, mask = tensors(requires_grad=True)
        loss, _ = policy_loss(
            logps, old, adv, mask, importance_sampling_level=level, loss_type=loss_type, epsilon_low=eps,
            **AGG_OPTIONS[loss_type],
        )
        loss.backward()
        grads[level] = logps.grad
    assert torch.allclose(grads["sequence"], grads["sequence_token"], rtol=1e-12, atol=1e-14)
    assert (grads["sequence"][0].abs() > 0).all() == (eps > 0.1)  # row 0 (s=1.07) is clipped only at 0.02
    assert (grads["sequence"][1, :2].abs() > 0).all() == (eps > 0.19)  # row 1 (s=0.82) is clipped below 0.19
    assert grads["sequence"][1, 2].item() == 0.0  # padding gets no gradient


def test_sequence_gradient_by_hand():
    # unclipped GSPO, grpo aggregation: d loss / d l_t = -A_i * s_i / |y_i| / B
    logps, old, adv, mask = tensors(requires_grad=True)
    loss, _ = policy_loss(logps, old, adv, mask, importance_sampling_level="sequence", epsilon_low=0.5)
    loss.backward()
    s0, s1 = hand_ratio(0, 0, "sequence"), hand_ratio(1, 0, "sequence")
    expected = [[-1.5 * s0 / 3 / 2] * 3, [0.8 * s1 / 2 / 2] * 2 + [0.0]]
    assert logps.grad.tolist() == [pytest.approx(r, rel=1e-12) for r in expected]


# ---- KL, asymmetric clip, delta ---------------------------------------------------------------------------


def test_k3_kl_value_and_penalty():
    logps, old, adv, mask = tensors()
    ref = torch.tensor(REF, dtype=torch.float64)
    kl = k3_kl(logps, ref)
    d = REF[0][1] - LOGPS[0][1]  # 0.2
    assert kl[0, 1].item() == pytest.approx(math.exp(d) - d - 1, rel=1e-12)

    beta = 0.04
    loss, metrics = policy_loss(logps, old, adv, mask, beta=beta, ref_logps=ref, loss_type="bnpo")
    assert loss.item() == pytest.approx(hand_aggregate("bnpo", beta=beta), rel=1e-12)
    k3 = [math.exp(REF[i][t] - LOGPS[i][t]) - (REF[i][t] - LOGPS[i][t]) - 1 for i, t in VALID[0] + VALID[1]]
    assert metrics["kl"].item() == pytest.approx(sum(k3) / N_VALID, rel=1e-12)

    # ref given with beta = 0: logged, not added
    loss0, metrics0 = policy_loss(logps, old, adv, mask, ref_logps=ref, loss_type="bnpo")
    assert loss0.item() == pytest.approx(hand_aggregate("bnpo"), rel=1e-12)
    assert metrics0["kl"].item() == pytest.approx(sum(k3) / N_VALID, rel=1e-12)


def _single_token(ratio, advantage, **kw):
    logps = torch.tensor([[math.log(ratio)]], dtype=torch.float64)
    return policy_loss(logps, torch.zeros(1, 1, dtype=torch.float64), torch.tensor([advantage]), torch.ones(1, 1), **kw)


def test_epsilon_high_asymmetry():
    # w = 1.25, A = +1: clipped at 1.2 with symmetric eps, free with eps_high = 0.28 (DAPO)
    loss_sym, m_sym = _single_token(1.25, 1.0, epsilon_low=0.2)
    loss_asym, m_asym = _single_token(1.25, 1.0, epsilon_low=0.2, epsilon_high=0.28)
    assert loss_sym.item() == pytest.approx(-1.2)
    assert loss_asym.item() == pytest.approx(-1.25)
    assert m_sym["clip_ratio/high_mean"].item() == 1.0
    assert m_asym["clip_ratio/high_mean"].item() == 0.0
    # the low side still uses epsilon_low: w = 0.75, A = -1 -> -min(-0.75, -0.8) = 0.8
    loss_low, m_low = _single_token(0.75, -1.0, epsilon_low=0.2, epsilon_high=0.28)
    assert loss_low.item() == pytest.approx(0.8)
    assert m_low["clip_ratio/low_mean"].item() == 1.0


def test_delta_two_sided_clip():
    # w = 3, A = -1: plain PPO clip lets -min(-3, -1.2) = 3 through; delta = 2 caps it at 2
    loss_plain, _ = _single_token(3.0, -1.0)
    loss_delta, _ = _single_token(3.0, -1.0, delta=2.0)
    assert loss_plain.item() == pytest.approx(3.0)
    assert loss_delta.item() == pytest.approx(2.0)
    # with A > 0 delta changes nothing (the clipped branch wins)
    assert _single_token(3.0, 1.0, delta=2.0)[0].item() == pytest.approx(-1.2)
    # and on the [2, 3] batch it matches the hand formula
    loss, _ = run("grpo", delta=1.3, epsilon_low=0.2)
    assert loss.item() == pytest.approx(hand_aggregate("grpo", delta=1.3), rel=1e-12)


# ---- shapes / robustness --------------------------------------------------------------------------------


def test_per_token_advantages_equal_broadcast():
    logps, old, adv, mask = tensors()
    loss_1d, _ = policy_loss(logps, old, adv, mask)
    loss_2d, _ = policy_loss(logps, old, adv[:, None].expand(2, 3), mask)
    assert loss_2d.item() == pytest.approx(loss_1d.item(), rel=1e-12)


def test_infinite_padding_and_empty_rows_stay_finite():
    logps, old, adv, mask = tensors()
    logps = logps.clone()
    logps[1, 2] = float("-inf")
    logps.requires_grad_(True)
    ref = torch.tensor(REF, dtype=torch.float64)
    for level in ("token", "sequence", "sequence_token"):
        loss, metrics = policy_loss(logps, old, adv, mask, importance_sampling_level=level, beta=0.1, ref_logps=ref)
        (grad,) = torch.autograd.grad(loss, logps)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # a row zeroed by mask_truncated_completions contributes nothing
    mask0 = mask.clone()
    mask0[1] = 0
    loss, _ = policy_loss(tensors()[0], old, adv, mask0, loss_type="bnpo")
    expected = sum(hand_token_loss(0, t) for t in range(3)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-12)
