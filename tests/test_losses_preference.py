"""DPO-family losses checked against values computed by hand (plain ``math``) from the papers' formulas."""

import math

import pytest
import torch

from vlmalign.losses import (
    PREFERENCE_LOSSES,
    RunningMeanDelta,
    combined_preference_loss,
    dpo_reward_metrics,
    ipo_loss,
    preference_loss,
    sft_loss,
)

# A batch of 3 pairs with varied, non-zero log-probs (summed over completion tokens).
CHOSEN = [-3.2, -7.5, -1.1]
REJECTED = [-4.0, -6.1, -9.3]
REF_CHOSEN = [-3.5, -6.9, -2.0]
REF_REJECTED = [-3.6, -6.8, -8.1]
CHOSEN_LEN = [4, 9, 2]
REJECTED_LEN = [5, 7, 11]
BETA = 0.5


# ---- plain-python helpers -------------------------------------------------------------------------


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def logsig(x):
    return math.log(sig(x))


def rows():
    """Per pair: (lr_c, lr_r, chosen, len_c, len_r), by hand."""
    for c, r, rc, rr, lc, lr in zip(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, CHOSEN_LEN, REJECTED_LEN):
        yield c - rc, r - rr, c, lc, lr


def hand(formula):
    return [formula(*row) for row in rows()]


def batch(**options):
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    return dict(
        chosen_logps=t(CHOSEN),
        rejected_logps=t(REJECTED),
        ref_chosen_logps=t(REF_CHOSEN),
        ref_rejected_logps=t(REF_REJECTED),
        chosen_lengths=t(CHOSEN_LEN),
        rejected_lengths=t(REJECTED_LEN),
        beta=BETA,
        **options,
    )


def assert_rows(actual, expected):
    assert actual.shape == (len(expected),)
    assert actual.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)


# ---- each loss, by hand -----------------------------------------------------------------------------

EPS = 0.1  # label smoothing
TAU = 0.05  # discopop
B = BETA


def _discopop(lc, lr, *_):
    z = B * (lc - lr)
    m = sig(z / TAU)
    return (1 - m) * -logsig(z) + m * math.exp(-z)


def _exo(lc, lr, *_):
    z = B * (lc - lr)
    return sig(z) * (logsig(z) - math.log(1 - EPS)) + sig(-z) * (logsig(-z) - math.log(EPS))


HAND_FORMULAS = {
    # DPO, no smoothing: -log s(beta * Delta)
    "sigmoid": lambda lc, lr, *_: -logsig(B * (lc - lr)),
    # RSO hinge: max(0, 1 - beta * Delta)
    "hinge": lambda lc, lr, *_: max(0.0, 1 - B * (lc - lr)),
    # IPO on length-normalised log ratios
    "ipo": lambda lc, lr, c, nc, nr: (lc / nc - lr / nr - 1 / (2 * B)) ** 2,
    # robust DPO
    "robust": lambda lc, lr, *_: (-(1 - EPS) * logsig(B * (lc - lr)) + EPS * logsig(-B * (lc - lr))) / (1 - 2 * EPS),
    # BCO without shift
    "bco_pair": lambda lc, lr, *_: -logsig(B * lc) - logsig(-B * lr),
    "sppo_hard": lambda lc, lr, *_: (lc - 1 / (2 * B)) ** 2 + (lr + 1 / (2 * B)) ** 2,
    "nca_pair": lambda lc, lr, *_: -logsig(B * lc) - 0.5 * logsig(-B * lc) - 0.5 * logsig(-B * lr),
    "apo_zero": lambda lc, lr, *_: (1 - sig(B * lc)) + sig(B * lr),
    "apo_down": lambda lc, lr, *_: sig(B * lc) + (1 - sig(B * (lc - lr))),
    "exo_pair": _exo,
    "discopop": _discopop,
    # per-row token-mean NLL of chosen
    "sft": lambda lc, lr, c, nc, nr: -c / nc,
}


def test_every_registered_loss_has_a_hand_check():
    assert set(PREFERENCE_LOSSES) == set(HAND_FORMULAS)


@pytest.mark.parametrize("name", sorted(HAND_FORMULAS))
def test_loss_matches_hand_formula(name):
    options = {"discopop_tau": TAU}
    if name in ("robust", "exo_pair"):
        options["label_smoothing"] = EPS
    out = preference_loss(name, **batch(**options))
    assert_rows(out, hand(HAND_FORMULAS[name]))


def test_sigmoid_label_smoothing_is_cdpo():
    out = preference_loss("sigmoid", **batch(label_smoothing=0.2))
    expected = hand(lambda lc, lr, *_: -0.8 * logsig(B * (lc - lr)) - 0.2 * logsig(-B * (lc - lr)))
    assert_rows(out, expected)


def test_sigmoid_default_beta_and_gradient():
    b = batch()
    b.pop("beta")
    chosen = b["chosen_logps"].clone().requires_grad_(True)
    b["chosen_logps"] = chosen
    out = preference_loss("sigmoid", **b)  # beta = 0.1
    assert_rows(out.detach(), hand(lambda lc, lr, *_: -logsig(0.1 * (lc - lr))))
    out.sum().backward()
    # d/dc [-log s(beta*Delta)] = -beta * (1 - s(beta*Delta))
    assert chosen.grad.tolist() == pytest.approx(hand(lambda lc, lr, *_: -0.1 * (1 - sig(0.1 * (lc - lr)))))


def test_bco_pair_with_nonzero_delta():
    delta = 0.25
    expected = hand(lambda lc, lr, *_: -logsig(B * lc - delta) - logsig(-(B * lr - delta)))
    assert_rows(preference_loss("bco_pair", **batch(reward_shift=delta)), expected)
    assert_rows(preference_loss("bco_pair", **batch(reward_shift=torch.tensor(delta, dtype=torch.float64))), expected)
    # the shift changes the value (guards against an ignored delta)
    assert (preference_loss("bco_pair", **batch(reward_shift=delta)).tolist()
            != pytest.approx(preference_loss("bco_pair", **batch()).tolist()))


def test_ipo_requires_lengths():
    b = batch()
    b.pop("chosen_lengths")
    with pytest.raises(ValueError, match="chosen_lengths"):
        ipo_loss(**b)


def test_ipo_with_unit_lengths_is_paper_form():
    b = batch()
    b["chosen_lengths"] = torch.ones(3, dtype=torch.float64)
    b["rejected_lengths"] = torch.ones(3, dtype=torch.float64)
    assert_rows(ipo_loss(**b), hand(lambda lc, lr, *_: (lc - lr - 1 / (2 * B)) ** 2))


def test_exo_pair_needs_label_smoothing():
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss("exo_pair", **batch())


def test_robust_rejects_half_smoothing():
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss("robust", **batch(label_smoothing=0.5))


def test_sft_is_per_token_mean_nll():
    chosen = torch.tensor(CHOSEN, dtype=torch.float64)
    out = sft_loss(chosen, chosen_lengths=torch.tensor(CHOSEN_LEN, dtype=torch.float64))
    assert_rows(out, [3.2 / 4, 7.5 / 9, 1.1 / 2])


# ---- combiner (MPO) ----------------------------------------------------------------------------------


def mean(xs):
    return sum(xs) / len(xs)


def test_mpo_combination_is_weighted_sum_of_means():
    delta = -0.15
    b = batch(reward_shift=delta)
    b["chosen_logps"] = b["chosen_logps"].clone().requires_grad_(True)
    loss, parts = combined_preference_loss(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], **b)

    dpo = mean(hand(HAND_FORMULAS["sigmoid"]))
    bco = mean(hand(lambda lc, lr, *_: -logsig(B * lc - delta) - logsig(-(B * lr - delta))))
    sft = mean(hand(HAND_FORMULAS["sft"]))
    assert loss.item() == pytest.approx(0.8 * dpo + 0.2 * bco + 1.0 * sft, rel=1e-12)
    assert parts["sigmoid"].item() == pytest.approx(dpo, rel=1e-12)
    assert parts["bco_pair"].item() == pytest.approx(bco, rel=1e-12)
    assert parts["sft"].item() == pytest.approx(sft, rel=1e-12)
    assert all(not p.requires_grad for p in parts.values())

    # equals the weighted sum of the single losses on the same batch
    singles = [combined_preference_loss([n], None, **b)[0] for n in ("sigmoid", "bco_pair", "sft")]
    assert loss.item() == pytest.approx(0.8 * singles[0].item() + 0.2 * singles[1].item() + singles[2].item())
    loss.backward()
    assert b["chosen_logps"].grad is not None


def test_combiner_default_weights_are_one():
    loss, _ = combined_preference_loss(["hinge", "apo_zero"], None, **batch())
    expected = mean(hand(HAND_FORMULAS["hinge"])) + mean(hand(HAND_FORMULAS["apo_zero"]))
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_combiner_rejects_unknown_name_listing_valid_ones():
    with pytest.raises(ValueError, match="valid") as info:
        combined_preference_loss(["sigmoid", "simpo"], None, **batch())
    assert "simpo" in str(info.value) and "bco_pair" in str(info.value)


def test_combiner_rejects_weight_length_mismatch():
    with pytest.raises(ValueError, match="loss_weights"):
        combined_preference_loss(["sigmoid", "sft"], [1.0], **batch())


# ---- BCO running mean -------------------------------------------------------------------------------


def test_running_mean_delta_update_sequence():
    running = RunningMeanDelta()
    assert running.value == 0.0
    running.update(torch.tensor([0.1, 0.3, -0.2, 0.6]))
    assert running.value == pytest.approx(0.8 / 4)
    running.update(torch.tensor([1.0, -0.4]))
    assert running.value == pytest.approx((0.8 + 0.6) / 6)
    running.update(torch.tensor([[2.0], [float("nan")]]))  # NaN ignored
    assert running.value == pytest.approx((0.8 + 0.6 + 2.0) / 7)
    assert running.state_dict() == {"mean": pytest.approx(3.4 / 7), "count": 7}


def test_running_mean_delta_state_dict_round_trip():
    running = RunningMeanDelta()
    running.update(torch.tensor([0.5, -1.5, 2.5]))
    restored = RunningMeanDelta()
    restored.load_state_dict(running.state_dict())
    assert restored.value == running.value == pytest.approx(1.5 / 3)
    assert restored.count == 3
    restored.update(torch.tensor([4.0]))
    assert restored.value == pytest.approx(5.5 / 4)


def test_running_mean_delta_reduce_fn_sees_gathered_rewards():
    # a fake 2-process gather: the other process contributed rewards + 1
    running = RunningMeanDelta(reduce_fn=lambda x: torch.cat([x, x + 1.0]))
    running.update(torch.tensor([0.2, 0.4]))
    assert running.value == pytest.approx((0.2 + 0.4 + 1.2 + 1.4) / 4)
    assert running.count == 4


def test_bco_training_loop_with_running_delta():
    """Two steps as the trainer runs them: update with [beta*lr_c, beta*lr_r] first, then use the mean."""
    running = RunningMeanDelta()
    all_rewards = []
    for step in range(2):
        b = batch()
        b["chosen_logps"] = b["chosen_logps"] + 0.3 * step
        rewards = torch.cat(
            [B * (b["chosen_logps"] - b["ref_chosen_logps"]), B * (b["rejected_logps"] - b["ref_rejected_logps"])]
        )
        running.update(rewards)
        out = preference_loss("bco_pair", **b, reward_shift=running.value)

        all_rewards += [B * (lc + 0.3 * step) for lc, *_ in rows()] + [B * lr for _, lr, *_ in rows()]
        delta = mean(all_rewards)
        expected = hand(lambda lc, lr, *_: -logsig(B * (lc + 0.3 * step) - delta) - logsig(-(B * lr - delta)))
        assert running.value == pytest.approx(delta, rel=1e-12)
        assert_rows(out, expected)


# ---- metrics ------------------------------------------------------------------------------------------


def test_dpo_reward_metrics_by_hand():
    b = batch()
    metrics = dpo_reward_metrics(
        b["chosen_logps"], b["rejected_logps"], b["ref_chosen_logps"], b["ref_rejected_logps"], BETA
    )
    r_c = [B * lc for lc, *_ in rows()]
    r_r = [B * lr for _, lr, *_ in rows()]
    expected = {
        "rewards/chosen": mean(r_c),
        "rewards/rejected": mean(r_r),
        "rewards/accuracies": mean([float(c > r) for c, r in zip(r_c, r_r)]),  # [T, F, T] -> 2/3
        "rewards/margins": mean([c - r for c, r in zip(r_c, r_r)]),
        "logps/chosen": mean(CHOSEN),
        "logps/rejected": mean(REJECTED),
    }
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        assert metrics[key].item() == pytest.approx(value, rel=1e-12), key
        assert metrics[key].dim() == 0 and not metrics[key].requires_grad
    assert metrics["rewards/accuracies"].item() == pytest.approx(2 / 3)


# ---- options ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_a_loss_rejects_an_option_it_does_not_take(name):
    tensors = {k: v for k, v in batch().items() if k.endswith("logps")}
    with pytest.raises(TypeError, match="betta"):
        PREFERENCE_LOSSES[name](**tensors, betta=0.2)


def test_the_shared_bag_rejects_an_option_no_loss_takes():
    with pytest.raises(TypeError, match="labl_smoothing"):
        combined_preference_loss(["sigmoid", "sft"], None, **batch(labl_smoothing=0.1))
    with pytest.raises(TypeError, match="labl_smoothing"):
        preference_loss("hinge", **batch(labl_smoothing=0.1))
    # options another loss takes are passed over, not refused: the trainer sends one bag whatever the loss types
    assert_rows(preference_loss("hinge", **batch(label_smoothing=0.3, discopop_tau=TAU)),
                hand(HAND_FORMULAS["hinge"]))
