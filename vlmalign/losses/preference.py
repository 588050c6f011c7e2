"""DPO-family preference losses as pure functions (tensors in, tensors out, no trainer state).

Notation (all tensors are ``[B]`` float, one entry per preference pair):

* ``chosen_logps`` / ``rejected_logps``: log pi_theta(y|x), **summed** over the completion tokens;
* ``ref_chosen_logps`` / ``ref_rejected_logps``: the same under the reference policy;
* ``lr_c = chosen_logps - ref_chosen_logps`` and ``lr_r = rejected_logps - ref_rejected_logps``
  (per-sequence log-ratios);
* ``Delta = lr_c - lr_r`` (the implicit reward margin divided by beta).

Every loss function returns the **per-pair** loss ``[B]`` (not reduced) and takes only its own options: a
misspelt option is a TypeError naming it. :func:`preference_loss` (and :func:`combined_preference_loss`) take one
shared bag of tensors and options and give each loss the ones it takes; an option no loss takes is a TypeError.

The formulas follow TRL 1.16 (``DPOTrainer._compute_loss``) unless stated otherwise. Deviations, all
documented in the function concerned:

* ``sigmoid`` supports ``label_smoothing`` (conservative DPO); TRL 1.16 dropped it from ``sigmoid``.
  With ``label_smoothing=0`` (the default) both are identical.
* ``bco_pair`` takes the reward shift ``reward_shift`` (the BCO / MPO papers' delta; TRL <= 0.28); TRL 1.16 has no
  shift. ``reward_shift=0`` (the default) reproduces TRL 1.16.
* ``sft`` is the per-row token-mean NLL; TRL 1.16 uses one token mean over the whole micro-batch.
* ``ipo`` requires the completion lengths (TRL normalises the same way; the paper uses sums).

MPO (Wang et al. 2024, "Enhancing the Reasoning Ability of Multimodal Large Language Models via Mixed
Preference Optimization", arXiv 2411.10442) is ``combined_preference_loss(["sigmoid", "bco_pair", "sft"],
[0.8, 0.2, 1.0], ...)``.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .preference_stats import RunningMeanDelta, _logratios, dpo_reward_metrics  # noqa: F401 (re-exported)

__all__ = [
    "PREFERENCE_LOSSES",
    "RunningMeanDelta",
    "apo_down_loss",
    "apo_zero_loss",
    "bco_pair_loss",
    "combined_preference_loss",
    "preference_loss",
    "discopop_loss",
    "dpo_reward_metrics",
    "exo_pair_loss",
    "hinge_loss",
    "ipo_loss",
    "nca_pair_loss",
    "robust_loss",
    "sft_loss",
    "sigmoid_loss",
    "sppo_hard_loss",
]


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps) -> Tensor:
    """``Delta = lr_c - lr_r`` [B]."""
    lr_c, lr_r = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return lr_c - lr_r


def _check_beta(beta: float) -> None:
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")


# --------------------------------------------------------------------------------------------------
# losses on the margin Delta
# --------------------------------------------------------------------------------------------------


def sigmoid_loss(
    chosen_logps: Tensor,  # [B]
    rejected_logps: Tensor,  # [B]
    ref_chosen_logps: Tensor,  # [B]
    ref_rejected_logps: Tensor,  # [B]
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> Tensor:  # [B]
    """DPO loss, with optional label smoothing (conservative DPO, cDPO).

    ``l = -(1 - eps) * logsigmoid(beta * Delta) - eps * logsigmoid(-beta * Delta)``, eps = ``label_smoothing``.

    Papers: Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward
    Model", arXiv 2305.18290; cDPO: Mitchell 2023, "A note on DPO with noisy preferences & relationship
    to IPO" (technical note, no arXiv id). With eps=0 this is TRL 1.16's ``sigmoid`` exactly; TRL 1.16
    ignores ``label_smoothing`` for ``sigmoid`` (TRL <= 0.28 used the cDPO form above).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"sigmoid: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    z = beta * _margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)  # [B]
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def hinge_loss(
    chosen_logps: Tensor,  # [B]
    rejected_logps: Tensor,  # [B]
    ref_chosen_logps: Tensor,  # [B]
    ref_rejected_logps: Tensor,  # [B]
    *,
    beta: float = 0.1,
) -> Tensor:  # [B]
    """Hinge loss on the reference-normalised margin: ``l = relu(1 - beta * Delta)``.

    Papers: Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", arXiv
    2305.10425 (hinge on raw log-likelihoods); Liu et al. 2023, "Statistical Rejection Sampling Improves
    Preference Optimization" (RSO), arXiv 2309.06657 (hinge on reference log-ratios, used here and in TRL).
    """
    z = beta * _margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)  # [B]
    return torch.relu(1.0 - z)


def ipo_loss(
    chosen_logps: Tensor,  # [B]
    rejected_logps: Tensor,  # [B]
    ref_chosen_logps: Tensor,  # [B]
    ref_rejected_logps: Tensor,  # [B]
    *,
    beta: float = 0.1,
    chosen_lengths: Tensor | None = None,  # [B] number of chosen completion tokens
    rejected_lengths: Tensor | None = None,  # [B] number of rejected completion tokens
) -> Tensor:  # [B]
    """IPO loss on length-normalised log-ratios: ``l = (Delta_bar - 1/(2 beta))**2`` with
    ``Delta_bar = lr_c / len(y_c) - lr_r / len(y_r)`` (beta plays the role of the paper's tau).

    Paper: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", arXiv 2310.12036. The paper writes sums of log-probs; TRL (confirmed by the authors)
    divides policy and reference log-probs by the completion length, and so do we. Lengths are therefore
    required; pass ones to get the paper's unnormalised form.
    """
    _check_beta(beta)
    if chosen_lengths is None or rejected_lengths is None:
        raise ValueError(
            "ipo needs `chosen_lengths` and `rejected_lengths` (completion token counts, [B]) to use "
            "per-token mean log-probs; pass ones for the unnormalised paper form"
        )
    lr_c, lr_r = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    delta_bar = lr_c / chosen_lengths - lr_r / rejected_lengths  # [B]
    return (delta_bar - 1.0 / (2.0 * beta)) ** 2


def robust_loss(
    chosen_logps: Tensor,  # [B]
    rejected_logps: Tensor,  # [B]
    ref_chosen_logps: Tensor,  # [B]
    ref_rejected_logps: Tensor,  # [B]
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> Tensor:  # [B]
    """Robust DPO, unbiased under preference-flip rate eps = ``label_smoothing``:
    ``l = [-(1 - eps) * logsigmoid(beta * Delta) + eps * logsigmoid(-beta * Delta)] / (1 - 2 eps)``.

    Paper: Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy Feedback",
    arXiv 2403.00409.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    z = beta * _margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)  # [B]
    eps = label_smoothing
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


def exo_pair_loss(
    chosen_logps: Tensor,  # [B]
    rejected_logps: Tensor,  # [B]
    ref_chosen_logps: Tensor,  # [B]
    ref_rejected_logps: Tensor,  # [B]
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> Tensor:  # [B]
    """EXO (pairwise): reverse KL from the model's pair distribution to the eps-smoothed labels,
    ``l = s(z) * (logsigmoid(z) - log(1 - eps)) + s(-z) * (logsigmoid(-z) - log eps)``,
    ``z = beta * Delta``, ``s`` = sigmoid, eps = ``label_smoothing`` (must be in (0, 1)).

    Paper: Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment",
    arXiv 2402.00856 (TRL suggests eps = 1e-3).
    """
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(
            f"exo_pair needs label_smoothing in (0, 1) (log eps would be -inf), got {label_smoothing}; "
            "the EXO paper / TRL suggest 1e-3"
        )
    z = beta * _margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)  # [B]
    eps = label_smoothing
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1.0 - eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )


def discopop_loss(
    chosen_logps: Tensor,  # [B]
    rejected_logps: Tensor,  # [B]
    ref_chosen_logps: Tensor,  # [B]
    ref_rejected_logps: Tensor,  # [B]
    *,
    beta: float = 0.1,
    discopop_tau: float = 0.05,
) -> Tensor:  # [B]
    """DiscoPOP / log-ratio modulated loss: with ``z = beta * Delta`` and ``m = sigmoid(z / tau)``,
    ``l = (1 - m) * (-logsigmoid(z)) + m * exp(-z)``.

    Paper: Chris Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for Large
    Language Models", arXiv 2406.08414 (tau = ``discopop_tau``, default 0.05).
    """
    if discopop_tau <= 0:
        raise ValueError(f"discopop_tau must be > 0, got {discopop_tau}")
    z = beta * _margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)  # [B]
    m = torch.sigmoid(z / discopop_tau)  # [B]
    return (1.0 - m) * -F.logsigmoid(z) + m * torch.exp(-z)


# --------------------------------------------------------------------------------------------------
# losses on the separate log-ratios lr_c, lr_r
# --------------------------------------------------------------------------------------------------


def bco_pair_loss(
    chosen_logps: Tensor,  # [B]
    rejected_logps: Tensor,  # [B]
    ref_chosen_logps: Tensor,  # [B]
    ref_rejected_logps: Tensor,  # [B]
    *,
    beta: float = 0.1,
    reward_shift: float | Tensor = 0.0,  # BCO's delta, e.g. RunningMeanDelta.value
) -> Tensor:  # [B]
    """BCO (paired form; MPO's "quality" loss): a binary classifier with the implicit reward
    ``r = beta * lr`` as logit, shifted by ``reward_shift`` (the papers' delta):
    ``l = -logsigmoid(beta * lr_c - shift) - logsigmoid(-(beta * lr_r - shift))``.

    Papers: Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment",
    arXiv 2404.04656 (delta = running mean of the rewards, see :class:`RunningMeanDelta`); MPO, arXiv
    2411.10442. ``reward_shift`` (named apart from GRPO's clip bound ``delta``) is a plain input so the function
    stays pure; the trainer passes
    ``RunningMeanDelta.value`` (or 0 when ``use_running_mean=False``). TRL 1.16 has no shift
    (== ``reward_shift=0``); TRL <= 0.28 used the shift as here.
    """
    lr_c, lr_r = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    shift = reward_shift.detach() if isinstance(reward_shift, Tensor) else reward_shift
    return -F.logsigmoid(beta * lr_c - shift) - F.logsigmoid(-(beta * lr_r - shift))


def sppo_hard_loss(
    chosen_logps: Tensor,  # [B]
    rejected_logps: Tensor,  # [B]
    ref_chosen_logps: Tensor,  # [B]
    ref_rejected_logps: Tensor,  # [B]
    *,
    beta: float = 0.1,
) -> Tensor:  # [B]
    """SPPO with hard win/loss probabilities (P(chosen wins) = 1, P(rejected wins) = 0):
    ``l = (lr_c - 1/(2 beta))**2 + (lr_r + 1/(2 beta))**2``.

    Paper: Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment",
    arXiv 2405.00675 (eta = 1/beta).
    """
    _check_beta(beta)
    lr_c, lr_r = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (lr_c - 0.5 / beta) ** 2 + (lr_r + 0.5 / beta) ** 2


def nca_pair_loss(
    chosen_logps: Tensor,  # [B]
    rejected_logps: Tensor,  # [B]
    ref_chosen_logps: Tensor,  # [B]
    ref_rejected_logps: Tensor,  # [B]
    *,
    beta: float = 0.1,
) -> Tensor:  # [B]
    """NCA (pairwise, K=2):
    ``l = -logsigmoid(beta * lr_c) - 0.5 * logsigmoid(-beta * lr_c) - 0.5 * logsigmoid(-beta * lr_r)``.

    Paper: Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards",
    arXiv 2402.05369.
    """
    lr_c, lr_r = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    r_c, r_r = beta * lr_c, beta * lr_r  # [B]
    return -F.logsigmoid(r_c) - 0.5 * F.logsigmoid(-r_c) - 0.5 * F.logsigmoid(-r_r)


def apo_zero_loss(
    chosen_logps: Tensor,  # [B]
    rejected_logps: Tensor,  # [B]
    ref_chosen_logps: Tensor,  # [B]
    ref_rejected_logps: Tensor,  # [B]
    *,
    beta: float = 0.1,
) -> Tensor:  # [B]
    """APO-zero (chosen better than the model's outputs): push chosen up, rejected down,
    ``l = (1 - sigmoid(beta * lr_c)) + sigmoid(beta * lr_r)``.

    Paper: D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions:
    Addressing Underspecification in Alignment", arXiv 2408.06266.
    """
    lr_c, lr_r = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (1.0 - torch.sigmoid(beta * lr_c)) + torch.sigmoid(beta * lr_r)


def apo_down_loss(
    chosen_logps: Tensor,  # [B]
    rejected_logps: Tensor,  # [B]
    ref_chosen_logps: Tensor,  # [B]
    ref_rejected_logps: Tensor,  # [B]
    *,
    beta: float = 0.1,
) -> Tensor:  # [B]
    """APO-down (model's outputs better than chosen): push both down, rejected more,
    ``l = sigmoid(beta * lr_c) + (1 - sigmoid(beta * (lr_c - lr_r)))``.

    Paper: D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions:
    Addressing Underspecification in Alignment", arXiv 2408.06266.
    """
    lr_c, lr_r = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return torch.sigmoid(beta * lr_c) + (1.0 - torch.sigmoid(beta * (lr_c - lr_r)))


def sft_loss(
    chosen_logps: Tensor,  # [B] summed log-probs of the chosen completion
    rejected_logps: Tensor | None = None,  # not used
    ref_chosen_logps: Tensor | None = None,  # not used
    ref_rejected_logps: Tensor | None = None,  # not used
    *,
    chosen_lengths: Tensor | None = None,  # [B] number of chosen completion tokens
) -> Tensor:  # [B]
    """Negative log-likelihood of the chosen completion, **per-token mean per row**:
    ``l_i = -chosen_logps_i / chosen_lengths_i``.

    Used as MPO's "generation" loss (arXiv 2411.10442) and RPO's NLL term (Pang et al. 2024, "Iterative
    Reasoning Preference Optimization", arXiv 2404.19733). Normalisation: each row is a token mean, and
    the combiner then averages rows, so every pair weighs the same whatever its length. TRL 1.16 instead
    takes one token mean over the whole micro-batch (``sum(logps) / sum(lengths)``), which weighs long
    completions more; the two agree when all chosen completions have the same length.
    The rejected and reference log-probs are accepted (the combiner passes them to every loss) and not used.
    """
    if chosen_lengths is None:
        raise ValueError("sft needs `chosen_lengths` ([B] chosen completion token counts)")
    return -chosen_logps / chosen_lengths.clamp(min=1)


# --------------------------------------------------------------------------------------------------
# registry and combiner (MPO)
# --------------------------------------------------------------------------------------------------

PREFERENCE_LOSSES: dict[str, Callable[..., Tensor]] = {
    "sigmoid": sigmoid_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "robust": robust_loss,
    "bco_pair": bco_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "nca_pair": nca_pair_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
    "exo_pair": exo_pair_loss,
    "discopop": discopop_loss,
    "sft": sft_loss,
}


def _accepted(func: Callable[..., Tensor]) -> set[str]:
    return {name for name in inspect.signature(func).parameters}


def preference_loss(name: str, **tensors_and_options) -> Tensor:  # [B]
    """The per-pair loss ``name`` on a shared bag of tensors and options: the loss gets the ones it takes. An option
    that no registered loss takes (a misspelling) is a TypeError naming it."""
    if name not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown preference loss type {name!r}; valid: {sorted(PREFERENCE_LOSSES)}")
    known = set().union(*(_accepted(f) for f in PREFERENCE_LOSSES.values()))
    unknown = sorted(set(tensors_and_options) - known)
    if unknown:
        raise TypeError(f"unknown preference-loss option(s) {unknown}; the losses take: {sorted(known)}")
    func = PREFERENCE_LOSSES[name]
    takes = _accepted(func)
    return func(**{k: v for k, v in tensors_and_options.items() if k in takes})


def combined_preference_loss(
    loss_types: list[str] | str,
    loss_weights: list[float] | None = None,
    **tensors_and_options,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted sum of batch-mean preference losses: ``L = sum_k w_k * mean_B(l_k)``.

    ``tensors_and_options`` holds the four log-prob tensors ``[B]`` plus any options the chosen losses
    need (``beta``, ``label_smoothing``, ``chosen_lengths``, ``rejected_lengths``, ``reward_shift``,
    ``discopop_tau``); each loss receives those it takes (`preference_loss`). Weights default to 1.0 each.

    Returns ``(loss 0-dim, {name: mean(l_k).detach()})``. MPO (arXiv 2411.10442):
    ``combined_preference_loss(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], ...)``.
    """
    if isinstance(loss_types, str):
        loss_types = [loss_types]
    if not loss_types:
        raise ValueError("loss_types must name at least one loss")
    unknown = [name for name in loss_types if name not in PREFERENCE_LOSSES]
    if unknown:
        raise ValueError(f"unknown preference loss type(s) {unknown}; valid: {sorted(PREFERENCE_LOSSES)}")
    if len(set(loss_types)) != len(loss_types):
        raise ValueError(f"duplicate loss types in {loss_types}")
    if loss_weights is None:
        loss_weights = [1.0] * len(loss_types)
    if len(loss_weights) != len(loss_types):
        raise ValueError(
            f"loss_weights has {len(loss_weights)} entries but loss_types has {len(loss_types)}: {loss_types}"
        )

    total: Tensor | float = 0.0
    parts: dict[str, Tensor] = {}
    for name, weight in zip(loss_types, loss_weights):
        per_pair = preference_loss(name, **tensors_and_options)  # [B]
        mean = per_pair.mean()  # 0-dim
        total = total + weight * mean
        parts[name] = mean.detach()
    return total, parts
