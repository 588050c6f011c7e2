"""Per-token policy losses of TRL 1.16's other GRPO ``loss_type`` values, as pure functions.

Each returns the per-token loss ``[B, T]`` (or ``[B, 1]`` for a sequence-level weight, broadcast by the caller)
before masking and aggregation; `vlmalign.losses.policy.policy_loss` adds the KL term and aggregates. With
``r = pi/pi_old`` (per token, or the GSPO sequence ratio when ``importance_sampling_level='sequence'``), ``A`` the
advantage and ``logp`` the current log-prob (with gradient):

* CISPO (MiniMax-M1, arXiv 2506.13585, eq. 4): ``-sg(min(r, eps_max)) * A * logp``; the clipped ratio is a
  constant weight, so every token keeps a gradient (``eps_max`` is TRL's ``epsilon_high``; the paper uses no lower
  clip).
* SAPO (Soft Adaptive Policy Optimization, arXiv 2511.20347): a smooth gate replaces the hard clip,
  ``-(4 / tau) * sigmoid(tau * (r - 1)) * A`` with ``tau = tau_pos`` if ``A > 0`` else ``tau_neg``; its gradient in
  r is ``sigmoid'(tau (r - 1)) * 4 = 1`` at r = 1 and decays away from it.
* LUSPO (arXiv 2602.05261): GSPO's clipped objective, aggregated per sequence as a *sum* over tokens (the sequence
  loss scaled by its length) — the per-token loss is the clipped one; see ``policy_loss(loss_type='luspo')``.
* VESPO (arXiv 2602.10693): ``-sg(phi(w)) * A * logp`` with ``w = exp(sum_t log r_t)`` (the sequence ratio,
  not its mean; each log r clamped to [-20, 20], log w to [log 1e-8, 20]) and the Gamma weight
  ``phi(w) = exp(lambda + k log w - lambda w)`` (so phi(1) = 1), ``(k, lambda) = (k_pos, lambda_pos)`` for
  ``A >= 0`` else ``(k_neg, lambda_neg)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def cispo_token_loss(ratio: Tensor, logps: Tensor, advantages: Tensor, epsilon_max: float) -> Tensor:
    """``-sg(min(ratio, epsilon_max)) * A * logp`` ([B, T]; ``ratio`` [B, T] or [B, 1], ``advantages`` [B, 1])."""
    return -torch.clamp(ratio, max=epsilon_max).detach() * advantages * logps


def sapo_token_loss(ratio: Tensor, advantages: Tensor, temperature_pos: float, temperature_neg: float) -> Tensor:
    """``-(4 / tau) * sigmoid(tau * (ratio - 1)) * A``, ``tau = temperature_pos`` where ``A > 0`` else
    ``temperature_neg``."""
    tau = torch.where(advantages > 0, torch.as_tensor(temperature_pos, dtype=ratio.dtype, device=ratio.device),
                      torch.as_tensor(temperature_neg, dtype=ratio.dtype, device=ratio.device))
    return -torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau * advantages


@torch.no_grad()
def vespo_weights(log_ratio: Tensor, mask: Tensor, advantages: Tensor, k_pos: float, lambda_pos: float,
                  k_neg: float, lambda_neg: float) -> Tensor:
    """VESPO's Gamma weight ``phi(w)`` per sequence ([B, 1], no gradient); ``log_ratio`` [B, T] per token."""
    low = math.log(1e-8)
    log_w = (torch.clamp(log_ratio, -20.0, 20.0) * mask).sum(-1, keepdim=True).clamp(low, 20.0)  # [B, 1]
    positive = advantages >= 0
    k = torch.where(positive, torch.as_tensor(k_pos, dtype=log_w.dtype, device=log_w.device),
                    torch.as_tensor(k_neg, dtype=log_w.dtype, device=log_w.device))
    lam = torch.where(positive, torch.as_tensor(lambda_pos, dtype=log_w.dtype, device=log_w.device),
                      torch.as_tensor(lambda_neg, dtype=log_w.dtype, device=log_w.device)).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def vespo_token_loss(logps: Tensor, old_logps: Tensor, mask: Tensor, advantages: Tensor, k_pos: float,
                     lambda_pos: float, k_neg: float, lambda_neg: float) -> Tensor:
    """``-sg(phi(w)) * A * logp`` ([B, T])."""
    phi = vespo_weights(logps.detach() - old_logps, mask, advantages, k_pos, lambda_pos, k_neg, lambda_neg)
    return -phi * advantages * logps
