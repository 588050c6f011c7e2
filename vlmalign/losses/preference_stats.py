"""The stateful and the metric side of the preference losses (preference.py): BCO's running-mean reward shift
(`RunningMeanDelta`), DPO's implicit-reward metrics (`dpo_reward_metrics`), and the log-ratios both read."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps) -> tuple[Tensor, Tensor]:
    """Per-sequence log-ratios ``(lr_c [B], lr_r [B])`` against the reference policy."""
    return chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps


# --------------------------------------------------------------------------------------------------
# BCO reward shift
# --------------------------------------------------------------------------------------------------


class RunningMeanDelta:
    """Running mean of the implicit rewards, the reward shift ``delta`` of BCO.

    Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment", arXiv
    2404.04656: delta is the mean of all rewards ``beta * lr`` seen so far, chosen and rejected together.
    The update is the exact (Welford / parallel-combine) mean, as in TRL's ``RunningMoments`` (TRL <= 0.28):
    ``mean <- mean + (mean(x) - mean) * n_x / (count + n_x)``, ``count <- count + n_x``.

    Usage per training step (matching TRL <= 0.28, which updates *before* computing the loss)::

        rewards = torch.cat([beta * lr_c, beta * lr_r]).detach()   # [2B]
        running.update(rewards)                                   # or update(gathered rewards)
        loss = bco_pair_loss(..., delta=running.value)

    Weighting: every reward element counts once. TRL <= 0.28 fed the scalar batch mean (one observation
    per step and process); both give the same mean when batch sizes are constant. Pass
    ``rewards.mean()`` to reproduce TRL exactly.

    Distributed training: either gather the rewards across processes before ``update`` or give
    ``reduce_fn`` (e.g. ``accelerator.gather``), applied to the rewards first, so every process holds the
    same state.
    """

    def __init__(self, reduce_fn: Callable[[Tensor], Tensor] | None = None):
        self.reduce_fn = reduce_fn
        self.mean = 0.0
        self.count = 0

    @torch.no_grad()
    def update(self, rewards: Tensor) -> None:
        """Fold a batch of rewards (any shape; NaNs ignored) into the running mean."""
        rewards = rewards.detach()
        if self.reduce_fn is not None:
            rewards = self.reduce_fn(rewards)
        values = rewards.reshape(-1).double()
        values = values[~torch.isnan(values)]
        n = values.numel()
        if n == 0:
            return
        batch_mean = values.mean().item()
        total = self.count + n
        self.mean += (batch_mean - self.mean) * n / total
        self.count = total

    @property
    def value(self) -> float:
        """Current delta (0.0 before the first update)."""
        return float(self.mean)

    def state_dict(self) -> dict[str, float | int]:
        return {"mean": float(self.mean), "count": int(self.count)}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.mean = float(state["mean"])
        self.count = int(state["count"])

    def __repr__(self) -> str:
        return f"RunningMeanDelta(mean={self.mean:.6g}, count={self.count})"


# --------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def dpo_reward_metrics(
    chosen_logps: Tensor,  # [B]
    rejected_logps: Tensor,  # [B]
    ref_chosen_logps: Tensor,  # [B]
    ref_rejected_logps: Tensor,  # [B]
    beta: float,
) -> dict[str, Tensor]:
    """Implicit-reward metrics of DPO (Rafailov et al. 2023, arXiv 2305.18290), batch means as
    detached 0-dim tensors (gather them across processes before logging):

    ``rewards/chosen = beta*lr_c``, ``rewards/rejected = beta*lr_r``, ``rewards/accuracies =
    [beta*lr_c > beta*lr_r]``, ``rewards/margins = beta*(lr_c - lr_r)``, ``logps/chosen``, ``logps/rejected``
    (summed log-probs), same names as TRL.
    """
    lr_c, lr_r = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    dtype = torch.promote_types(lr_c.dtype, torch.float32)  # bf16 means would be too coarse to log
    r_c, r_r = beta * lr_c.detach().to(dtype), beta * lr_r.detach().to(dtype)  # [B]
    return {
        "rewards/chosen": r_c.mean(),
        "rewards/rejected": r_r.mean(),
        "rewards/accuracies": (r_c > r_r).to(r_c.dtype).mean(),
        "rewards/margins": (r_c - r_r).mean(),
        "logps/chosen": chosen_logps.detach().to(dtype).mean(),
        "logps/rejected": rejected_logps.detach().to(dtype).mean(),
    }
