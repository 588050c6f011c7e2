"""The text of one completion, in TRL's conversational form or as a plain string."""

from __future__ import annotations

from typing import Any


def completion_text(completion: Any) -> str:
    """``completion[0]["content"]`` (TRL's form: a list holding one assistant message), or the string itself."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[0], dict):
        content = completion[0].get("content", "")
        if isinstance(content, list):  # content parts
            return "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content
    raise TypeError(f"a completion must be a string or a list of chat messages, got {type(completion).__name__}")
