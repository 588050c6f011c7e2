"""TRL 1.16's reward functions (`trl.rewards`) under their names, signatures and scores.

A TRL script's ``from trl.rewards import accuracy_reward, think_format_reward`` becomes
``from vlmalign.rewards import ...`` and scores every completion as TRL does (tests/test_trl_rewards.py checks a
shared table against TRL). They differ from vlmalign's own built-ins (`vlmalign.rl.rewards`, used by the names
``"accuracy"``, ``"format"``, ``"think_format"``), which read ``<answer>`` blocks:

================================  ========================================  =============================================
function                          TRL (this module)                         vlmalign built-in (vlmalign.rl.rewards)
================================  ========================================  =============================================
``think_format_reward``           ``<think>..</think>`` then anything       ``<think>..</think><answer>..</answer>`` only
``accuracy_reward``               LaTeX answer (boxed first) vs gold;       last ``<answer>`` block (or the text) vs
                                  None if the gold does not parse           gold; text match when the gold does not parse
================================  ========================================  =============================================

One difference from TRL everywhere: a completion may be a plain string as well as TRL's conversational form
``[{"role": "assistant", "content": ...}]`` (vlmalign's GRPOTrainer passes strings).
"""

from .accuracy import accuracy_reward, get_cosine_scaled_reward, reasoning_accuracy_reward
from .format import think_format_reward
from .length import get_repetition_penalty_reward, get_soft_overlong_punishment

__all__ = ["accuracy_reward", "get_cosine_scaled_reward", "get_repetition_penalty_reward",
           "get_soft_overlong_punishment", "reasoning_accuracy_reward", "think_format_reward"]
