"""Reinforcement learning pieces for GRPO / GSPO: reward functions and group-relative advantages."""

from vlmalign.rl.advantages import SCALE_REWARDS, group_advantages, nanstd, slice_for_process
from vlmalign.rl.rewards import (
    REWARD_FUNCTIONS,
    RewardFunctionError,
    accuracy_reward,
    compute_rewards,
    extract_answer,
    format_reward,
    get_reward_function,
    normalize_text,
    reward_function_name,
    reward_metrics,
    think_format_reward,
)

__all__ = [
    "REWARD_FUNCTIONS",
    "SCALE_REWARDS",
    "RewardFunctionError",
    "accuracy_reward",
    "compute_rewards",
    "extract_answer",
    "format_reward",
    "get_reward_function",
    "group_advantages",
    "nanstd",
    "normalize_text",
    "reward_function_name",
    "reward_metrics",
    "slice_for_process",
    "think_format_reward",
]
