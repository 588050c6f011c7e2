"""Correction for the gap between the engine that sampled the completions (vLLM) and the trainer's policy.

vLLM and the trainer compute the same policy with different kernels (and, in bf16, different rounding), so the
sampling distribution ``pi_vllm`` is not exactly the ``pi_old`` of the trainer's ratio. Truncated importance
sampling (TIS; Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training",
fengyao.notion.site/off-policy-rl; as in TRL's ``vllm_importance_sampling_*`` and verl) multiplies each token's
policy loss by ``rho = pi_old / pi_vllm``, truncated or masked to keep its variance bounded.

Inputs are per-token ``[B, T]`` over completion positions; ``mask`` 1 for tokens that count. With
``d_t = (old_logp_t - sampling_logp_t) * m_t`` (NaN -> 0):

* ``token_truncate``: ``rho_t = min(exp(d_t), clip_max)`` (and ``max(., clip_min)`` when given);
* ``token_mask``: ``rho_t = exp(d_t)`` where ``clip_min <= exp(d_t) <= clip_max``, else 0;
* ``sequence_truncate`` / ``sequence_mask``: the same on ``rho_i = exp(sum_t d_t)`` (the sequence's likelihood
  ratio, a sum over its tokens), broadcast to the row's tokens.

Weights are constants (no gradient flows through them).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SAMPLING_CORRECTION_MODES", "sampling_importance_weights", "sampling_logp_difference"]

SAMPLING_CORRECTION_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def sampling_importance_weights(
    old_logps: Tensor,       # [B, T] trainer's log-probs of the sampled tokens (the policy that sampled them)
    sampling_logps: Tensor,  # [B, T] the sampling engine's log-probs of the same tokens
    mask: Tensor,            # [B, T] 1 = valid completion token
    *,
    mode: str = "sequence_mask",
    clip_max: float = 3.0,
    clip_min: float | None = None,
) -> Tensor:  # [B, T]
    """Importance weights ``rho`` of the per-token policy loss (see the module docstring); 1 where masked out
    by ``mask`` is irrelevant (the loss ignores those positions), so padding gets weight 1."""
    if mode not in SAMPLING_CORRECTION_MODES:
        raise ValueError(f"unknown importance sampling mode {mode!r}; valid: {list(SAMPLING_CORRECTION_MODES)}")
    if clip_min is not None and clip_min > clip_max:
        raise ValueError(f"clip_min ({clip_min}) must be <= clip_max ({clip_max})")
    valid = mask.bool()
    diff = (old_logps.detach().float() - sampling_logps.detach().float())
    diff = torch.nan_to_num(diff, nan=0.0).masked_fill(~valid, 0.0)           # [B, T]
    if mode.startswith("token"):
        log_rho = diff
    else:
        log_rho = diff.sum(dim=-1, keepdim=True).expand_as(diff)              # [B, T], the row's sum
    rho = torch.exp(log_rho)
    if mode.endswith("truncate"):
        rho = rho.clamp(min=clip_min, max=clip_max) if clip_min is not None else rho.clamp(max=clip_max)
    else:
        keep = rho <= clip_max
        if clip_min is not None:
            keep &= rho >= clip_min
        rho = torch.where(keep, rho, torch.zeros_like(rho))
    return torch.where(valid, rho, torch.ones_like(rho))


def sampling_logp_difference(old_logps: Tensor, sampling_logps: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """``|old_logp - sampling_logp|`` over the valid tokens: mean and max (0 when there is none)."""
    valid = mask.bool()
    diff = (old_logps.detach().float() - sampling_logps.detach().float()).abs()[valid]
    if diff.numel() == 0:
        zero = torch.zeros((), device=old_logps.device)
        return {"mean": zero, "max": zero}
    return {"mean": diff.mean(), "max": diff.max()}
