"""`think_format_reward` (TRL 1.16): 1.0 when a completion starts with one ``<think>...</think>`` block."""

from __future__ import annotations

import re

from ._text import completion_text

# The completion must open with <think>, contain no second <think>, and close the block; anything may follow
# (TRL's pattern, matched with DOTALL | MULTILINE from the start of the text).
_THINK_FIRST = re.compile(r"^<think>(?!.*<think>)(.*?)</think>.*$", re.DOTALL | re.MULTILINE)


def think_format_reward(completions: list, **kwargs) -> list[float]:
    """1.0 if the completion is ``<think>reasoning</think>`` followed by anything (no second ``<think>``), else
    0.0. Nothing may precede ``<think>``, not even whitespace."""
    return [1.0 if _THINK_FIRST.match(completion_text(c)) else 0.0 for c in completions]
