"""GRPO / GSPO clipped policy objective as pure functions.

Inputs are per-token tensors ``[B, T]`` over the completion positions (B completions, T = padded
completion length): ``logps`` (current policy, with grad), ``old_logps`` (the policy that sampled the
completions; pass ``logps.detach()`` when on-policy), ``mask`` (1 for completion tokens that count in
the loss, 0 for padding), and ``advantages`` ``[B]`` (or ``[B, T]``).

Papers:

* PPO clipping: Schulman et al. 2017, "Proximal Policy Optimization Algorithms", arXiv 1707.06347.
* GRPO: Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language
  Models", arXiv 2402.03300.
* GSPO / GSPO-token: Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv 2507.18071.
* DAPO (asymmetric clip ``epsilon_high``, token-level mean): Yu et al. 2025, "DAPO: An Open-Source LLM
  Reinforcement Learning System at Scale", arXiv 2503.14476.
* Dr. GRPO: Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective", arXiv 2503.20783.
* Two-sided clip ``delta``: Prime Intellect 2025, "INTELLECT-2: A Reasoning Model Trained Through Globally
  Decentralized Reinforcement Learning", arXiv 2505.07291.
* k3 KL estimator: Schulman 2020, "Approximating KL Divergence" (blog post, no arXiv id).

Not done here, by design:

* ``mask_truncated_completions`` is applied by the trainer, by zeroing the ``mask`` row of every
  completion that did not end with EOS. A fully masked row contributes nothing (its GSPO ratio is 1).
* Entropy (bonus, masks, metrics) is computed elsewhere (see ``logprobs.token_logprobs_from_hidden``).
* Division by gradient-accumulation steps and cross-process averaging are the trainer's job.

KL term: plain k3, or k3 times the importance ratio with ``kl_importance_correction=True`` (TRL 1.16's
``use_bias_correction_kl``, its default and GRPOConfig's); the two agree on-policy (ratio 1).

Other loss types (``cispo``, ``sapo``, ``luspo``, ``vespo``): per-token formulas in :mod:`.policy_variants`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import policy_variants as variants

__all__ = [
    "IMPORTANCE_SAMPLING_LEVELS",
    "POLICY_LOSS_TYPES",
    "importance_weights",
    "k3_kl",
    "policy_loss",
]

IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence", "sequence_token")
POLICY_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
#: loss types normalised by the active tokens of the whole generation batch (as dapo)
TOKEN_NORMALISED_LOSS_TYPES = ("dapo", "cispo", "vespo")


def _masked_sequence_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over each row's valid tokens: ``[B, T], [B, T] -> [B]`` (0 for a fully masked row)."""
    return (values * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over all valid tokens of the batch: ``[B, T], [B, T] -> []``."""
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def importance_weights(
    logps: Tensor,  # [B, T] current policy log-probs (with grad)
    old_logps: Tensor,  # [B, T] sampling-policy log-probs
    mask: Tensor,  # [B, T] 1 = valid completion token
    level: str = "token",
) -> Tensor:  # [B, T]
    """Importance ratios ``w [B, T]`` between the current and the sampling policy.

    * ``token`` (PPO / GRPO): ``w_t = exp(logp_t - old_logp_t)``.
    * ``sequence`` (GSPO, arXiv 2507.18071 eq. 7): ``s_i = exp(mean_{t valid}(logp_t - old_logp_t))``,
      i.e. ``(pi(y_i) / pi_old(y_i)) ** (1/|y_i|)``, broadcast to the row's tokens.
    * ``sequence_token`` (GSPO-token, arXiv 2507.18071 eq. 13): ``w_t = sg(s_i) * exp(logp_t - sg(logp_t))``.
      Same value as ``sequence``, but the gradient goes through each token's own log-prob; with a
      per-sequence advantage its gradient equals GSPO's.

    ``old_logps`` is treated as a constant (detached). Padding positions get ratio 1 whatever they hold.
    """
    valid = mask.bool()
    mask = mask.to(logps.dtype)
    logps = logps.masked_fill(~valid, 0.0)  # padding -> 0 so it cannot produce inf / NaN
    log_ratio = logps - old_logps.detach().masked_fill(~valid, 0.0)  # [B, T], 0 on padding
    if level == "token":
        return torch.exp(log_ratio)
    seq_log_ratio = _masked_sequence_mean(log_ratio, mask).unsqueeze(-1)  # [B, 1]
    if level == "sequence":
        return torch.exp(seq_log_ratio).expand_as(logps)
    if level == "sequence_token":
        return torch.exp(seq_log_ratio.detach() + logps - logps.detach())  # [B, T]
    raise ValueError(f"unknown importance_sampling_level {level!r}; valid: {list(IMPORTANCE_SAMPLING_LEVELS)}")


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:  # [B, T]
    """Per-token k3 estimate of KL(pi || pi_ref): ``exp(ref - logp) - (ref - logp) - 1`` (>= 0).

    Schulman 2020, "Approximating KL Divergence" (blog); used by GRPO (arXiv 2402.03300, eq. 4).
    """
    diff = ref_logps - logps  # [B, T]
    return torch.exp(diff) - diff - 1.0


def _aggregate(
    per_token_loss: Tensor,  # [B, T]
    mask: Tensor,  # [B, T]
    loss_type: str,
    max_completion_length: int | None,
    num_items_in_batch: int | float | Tensor | None,
) -> Tensor:  # []
    """Reduce the per-token loss according to ``loss_type`` (see :func:`policy_loss`)."""
    masked_sum = (per_token_loss * mask).sum()
    if loss_type in ("grpo", "sapo"):
        return _masked_sequence_mean(per_token_loss, mask).mean()
    if loss_type == "bnpo":
        return masked_sum / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        return masked_sum / (per_token_loss.shape[0] * max_completion_length)
    if loss_type == "luspo":  # per-sequence sum (the sequence loss times its length), mean over sequences
        return (per_token_loss * mask).sum(-1).mean()
    if loss_type in TOKEN_NORMALISED_LOSS_TYPES:
        if num_items_in_batch is None:
            num_items_in_batch = mask.sum()
        denom = torch.as_tensor(num_items_in_batch, dtype=masked_sum.dtype, device=masked_sum.device)
        return masked_sum / denom.clamp(min=1.0)
    raise ValueError(f"unknown loss_type {loss_type!r}; valid: {list(POLICY_LOSS_TYPES)}")


def policy_loss(
    logps: Tensor,  # [B, T]
    old_logps: Tensor,  # [B, T]
    advantages: Tensor,  # [B] or [B, T]
    mask: Tensor,  # [B, T]
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    importance_sampling_level: str = "token",
    loss_type: str = "grpo",
    beta: float = 0.0,
    ref_logps: Tensor | None = None,  # [B, T]
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | Tensor | None = None,
    kl_importance_correction: bool = False,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_params: tuple[float, float, float, float] = (2.0, 3.0, 3.0, 2.0),
    sampling_weights: Tensor | None = None,  # [B, T] or [B, 1]
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate objective of GRPO / GSPO (PPO clip, arXiv 1707.06347; GRPO, arXiv 2402.03300;
    GSPO, arXiv 2507.18071).

    Per token, with ``w`` from :func:`importance_weights` (``importance_sampling_level``):
    ``l_t = -min(w' * A, clip(w, 1 - epsilon_low, 1 + epsilon_high) * A) + beta * k3_t``, where
    ``w' = min(w, delta)`` if ``delta`` is set (INTELLECT-2 two-sided clip, arXiv 2505.07291; as in TRL only
    the unclipped term is clamped) else ``w``; ``epsilon_high`` defaults to ``epsilon_low``;
    ``k3_t = exp(ref - logp) - (ref - logp) - 1`` (needs ``ref_logps`` when ``beta > 0``).
    ``sampling_weights`` (constants, e.g. `vlmalign.losses.sampling_correction.sampling_importance_weights`)
    multiply the clipped term when given: ``l_t = -rho_t * min(...) + beta * k3_t`` (TRL's order).

    Aggregation (``loss_type``), with ``m`` the mask:

    * ``grpo``: ``mean_i [sum_t m l / sum_t m]`` (per-sequence token mean, then mean over sequences; GSPO's
      paper setting);
    * ``bnpo``: ``sum m l / sum m`` over this (micro-)batch;
    * ``dr_grpo``: ``sum m l / (B * max_completion_length)`` (Dr. GRPO, arXiv 2503.20783);
    * ``sapo``: as ``grpo``; ``luspo``: ``mean_i [sum_t m l]`` (LUSPO, sequence loss times its length);
      ``cispo`` and ``vespo``: as ``dapo``;
    * ``dapo``: ``sum m l / num_items_in_batch`` (DAPO token-level mean, arXiv 2503.14476), where the trainer
      passes the active-token count of the whole generation batch across processes (scaled as its
      gradient averaging requires; TRL passes ``num_items / num_processes * GA / steps_per_generation``);
      falls back to the local token count when ``None``.

    Returns ``(loss 0-dim, metrics)`` with detached metrics: ``clip_ratio/low_mean`` (fraction of valid
    tokens with ``A < 0`` and ``w < 1 - epsilon_low``), ``clip_ratio/high_mean`` (``A > 0`` and
    ``w > 1 + epsilon_high``), ``clip_ratio/region_mean`` (either), and ``kl`` (mean k3 over valid tokens,
    when ``beta > 0`` or ``ref_logps`` is given).
    """
    if epsilon_high is None:
        epsilon_high = epsilon_low
    if beta > 0 and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps for the KL penalty")
    if loss_type not in POLICY_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {list(POLICY_LOSS_TYPES)}")
    valid = mask.bool()
    mask = mask.to(logps.dtype)
    # Padding may hold anything (even -inf); neutralise it so 0 * inf never turns into NaN.
    logps = logps.masked_fill(~valid, 0.0)
    old_logps = old_logps.masked_fill(~valid, 0.0)
    if ref_logps is not None:
        ref_logps = ref_logps.masked_fill(~valid, 0.0)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # [B, 1]
    advantages = advantages.to(logps.dtype)

    ratio = importance_weights(logps, old_logps, mask, importance_sampling_level)  # [B, T]
    clipped_ratio = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)  # [B, T]
    if loss_type == "cispo":
        per_token_loss = variants.cispo_token_loss(ratio, logps, advantages, epsilon_high)
    elif loss_type == "sapo":
        per_token_loss = variants.sapo_token_loss(ratio, advantages, sapo_temperature_pos, sapo_temperature_neg)
    elif loss_type == "vespo":
        per_token_loss = variants.vespo_token_loss(logps, old_logps, mask, advantages, *vespo_params)
    else:
        unclipped_ratio = torch.clamp(ratio, max=delta) if delta is not None else ratio  # [B, T]
        per_token_loss = -torch.min(unclipped_ratio * advantages, clipped_ratio * advantages)  # [B, T]
    if sampling_weights is not None:  # truncated importance sampling (vLLM sampling vs training)
        per_token_loss = per_token_loss * sampling_weights.detach().to(per_token_loss.dtype)

    metrics: dict[str, Tensor] = {}
    if ref_logps is not None:
        kl = k3_kl(logps, ref_logps.detach())  # [B, T]
        if beta > 0:
            # TRL's use_bias_correction_kl: weight k3 by the importance ratio (equal to plain k3 on-policy)
            per_token_loss = per_token_loss + beta * (kl * ratio if kl_importance_correction else kl)
        metrics["kl"] = _masked_mean(kl.detach(), mask)

    loss = _aggregate(per_token_loss, mask, loss_type, max_completion_length, num_items_in_batch)
    metrics.update(_clip_metrics(ratio.detach(), advantages.detach(), mask, epsilon_low, epsilon_high))
    return loss, metrics


def _clip_metrics(
    ratio: Tensor,  # [B, T]
    advantages: Tensor,  # [B, 1] or [B, T]
    mask: Tensor,  # [B, T]
    epsilon_low: float,
    epsilon_high: float,
) -> dict[str, Tensor]:
    """Fractions of valid tokens whose update the clip switched off (same definitions as TRL)."""
    low = ((ratio < 1.0 - epsilon_low) & (advantages < 0)).to(mask.dtype)  # [B, T]
    high = ((ratio > 1.0 + epsilon_high) & (advantages > 0)).to(mask.dtype)  # [B, T]
    region = torch.maximum(low, high)
    return {
        "clip_ratio/low_mean": _masked_mean(low, mask),
        "clip_ratio/high_mean": _masked_mean(high, mask),
        "clip_ratio/region_mean": _masked_mean(region, mask),
    }
