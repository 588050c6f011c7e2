"""Group-relative advantages for GRPO / GSPO / Dr. GRPO.

Layout convention: a reward vector of length ``N = num_prompts * G`` is ordered group by group, so rows
``k*G .. k*G+G-1`` are the ``G`` completions sampled for prompt ``k``.

The advantage of completion ``i`` in group ``g`` is ``A_i = r_i - mean_g(r)``, optionally divided by a standard
deviation (``scale_rewards``):

- ``"group"`` (GRPO, DeepSeekMath): ``A_i /= std_g(r) + eps``;
- ``"batch"`` (PPO-Lite, "Tricks or Traps"): group mean, but ``A_i /= std_batch(r) + eps``;
- ``"none"`` (Dr. GRPO, Liu et al. 2025): no division.

Standard deviations are NaN-aware and **unbiased** (Bessel's correction, divide by ``n - 1``), as in TRL 1.16's
``nanstd``. A NaN reward means "no reward function applied to this completion": it gets advantage 0 and is left
out of every mean and standard deviation. A group (or batch) with fewer than two valid rewards has std 0.

Multi-process training: these functions are process-agnostic. They must see *whole groups*, so the trainer gathers
the rewards of every process first (all ``G`` completions of a group are then present, whichever process sampled
them), computes advantages on the full vector, and keeps its own part with :func:`slice_for_process`.
"""

from __future__ import annotations

import torch
from torch import Tensor

SCALE_REWARDS = ("group", "batch", "none")


def nanstd(x: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """Unbiased (``n - 1``) standard deviation that ignores NaN entries.

    Returns NaN where there is no valid entry and 0 where there is exactly one.
    With ``dim=None`` the whole tensor is reduced to a scalar.
    """
    if dim is None:
        x, dim = x.reshape(-1), 0
    valid = ~torch.isnan(x)
    count = valid.sum(dim, keepdim=True)
    zeros = torch.zeros_like(x)
    mean = torch.where(valid, x, zeros).sum(dim, keepdim=True) / count.clamp(min=1)
    squares = torch.where(valid, (x - mean) ** 2, zeros).sum(dim, keepdim=True)
    std = torch.sqrt(squares / (count - 1).clamp(min=1))
    std = torch.where(count == 0, torch.full_like(std, float("nan")), std)
    return std if keepdim else std.squeeze(dim)


def _check_inputs(rewards: Tensor, num_generations: int, scale_rewards: str) -> None:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor [N], got shape {tuple(rewards.shape)}")
    if not isinstance(num_generations, int) or num_generations < 1:
        raise ValueError(f"num_generations must be a positive int, got {num_generations!r}")
    if rewards.numel() % num_generations != 0:
        raise ValueError(
            f"the number of rewards ({rewards.numel()}) is not a multiple of num_generations ({num_generations}); "
            "rewards must hold whole groups (gather them from every process first)"
        )
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")


def _scale(centered: Tensor, grouped: Tensor, group_std: Tensor, scale_rewards: str, eps: float) -> Tensor:
    """Divide the centred rewards by the std chosen by ``scale_rewards``."""
    if scale_rewards == "group":
        return centered / (group_std + eps)
    if scale_rewards == "batch":
        batch_std = nanstd(grouped).nan_to_num(0.0)
        return centered / (batch_std + eps)
    return centered


def group_advantages(
    rewards: Tensor,
    num_generations: int,
    scale_rewards: str = "group",
    eps: float = 1e-4,
) -> tuple[Tensor, dict[str, float]]:
    """Group-relative advantages of ``rewards`` ([N], ordered group by group, ``N % num_generations == 0``).

    Returns ``(advantages [N], metrics)``. Advantages have the dtype of ``rewards`` (float32 if it is not floating)
    and are 0 where the reward is NaN. Statistics are computed in float64.

    Metrics:
        ``frac_reward_zero_std``: share of groups whose reward std is 0 (no learning signal; groups with fewer than
        two valid rewards count as zero-std).
        ``reward_std``: mean over groups of the group reward std (as TRL logs it).

    See the module docstring for the scaling modes and the multi-process contract.
    """
    _check_inputs(rewards, num_generations, scale_rewards)
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    grouped = rewards.detach().to(torch.float64).reshape(-1, num_generations)
    if grouped.shape[0] == 0:
        return rewards.new_zeros(0, dtype=out_dtype), {"frac_reward_zero_std": 0.0, "reward_std": 0.0}

    valid = ~torch.isnan(grouped)
    group_mean = torch.nanmean(grouped, dim=1, keepdim=True)  # NaN for an all-NaN group, masked below
    group_std = nanstd(grouped, dim=1, keepdim=True).nan_to_num(0.0)
    advantages = _scale(grouped - group_mean, grouped, group_std, scale_rewards, eps)
    advantages = torch.where(valid, advantages, torch.zeros_like(advantages))

    zero_std = torch.isclose(group_std, torch.zeros_like(group_std), rtol=0.0, atol=1e-8)
    metrics = {
        "frac_reward_zero_std": zero_std.double().mean().item(),
        "reward_std": group_std.mean().item(),
    }
    return advantages.reshape(-1).to(out_dtype), metrics


def slice_for_process(tensor: Tensor, process_index: int, num_processes: int) -> Tensor:
    """The contiguous part of a gathered ``tensor`` (along dim 0) that belongs to ``process_index``.

    Process ``p`` of ``P`` gets rows ``p*n .. (p+1)*n - 1`` with ``n = len(tensor) // P``, matching the order in
    which ``gather`` concatenates per-process tensors.
    """
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index must be in [0, {num_processes}), got {process_index}")
    total = tensor.shape[0]
    if total % num_processes != 0:
        raise ValueError(f"cannot split {total} rows evenly over {num_processes} processes")
    size = total // num_processes
    return tensor[process_index * size : (process_index + 1) * size]
