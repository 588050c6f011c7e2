"""Write tests/data/trl_rewards_table.json: TRL 1.16's own reward functions on the cases of
tests/trl_reward_cases.py. Run once in an environment with trl==1.16.* (never a vlmalign dependency):

    /work/venvs/trl/bin/python benchmarks/derive_trl_reward_table.py

tests/test_trl_rewards.py compares vlmalign.rewards with this table (and with TRL itself when it is installed)."""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import trl  # noqa: E402
from trl.rewards import (accuracy_reward, get_cosine_scaled_reward, get_repetition_penalty_reward,  # noqa: E402
                         get_soft_overlong_punishment, reasoning_accuracy_reward, think_format_reward)

import trl_reward_cases as cases  # noqa: E402


def conv(text):
    return [{"role": "assistant", "content": text}]


def table() -> dict:
    acc_c, acc_s = zip(*cases.ACCURACY_CASES)
    rea_c, rea_s = zip(*cases.REASONING_CASES)
    cos_c, cos_s, cos_n = zip(*cases.COSINE_CASES)
    return {
        "trl_version": trl.__version__,
        "accuracy_reward": accuracy_reward([conv(c) for c in acc_c], list(acc_s)),
        "reasoning_accuracy_reward": reasoning_accuracy_reward([conv(c) for c in rea_c], list(rea_s)),
        "think_format_reward": think_format_reward([conv(c) for c in cases.THINK_FORMAT_CASES]),
        "soft_overlong_punishment": get_soft_overlong_punishment(10, 4)(
            completion_ids=[[0] * n for n in cases.OVERLONG_LENGTHS]),
        "repetition_penalty": get_repetition_penalty_reward(3, -1.0)(completion_ids=cases.REPETITION_IDS),
        "cosine_scaled_reward": get_cosine_scaled_reward(100)(
            [conv(c) for c in cos_c], list(cos_s), [[0] * n for n in cos_n]),
    }


if __name__ == "__main__":
    out = os.path.join(HERE, "..", "tests", "data", "trl_rewards_table.json")
    with open(out, "w", encoding="utf-8") as f:
        json.dump(table(), f, indent=1)
    print("wrote", out)
