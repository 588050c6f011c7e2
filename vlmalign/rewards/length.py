"""Length-shaped rewards of TRL 1.16: DAPO's soft overlong punishment and the n-gram repetition penalty.

Both are factories returning picklable callables (TRL's design: they cross process boundaries) that read
``completion_ids``.
"""

from __future__ import annotations


class _SoftOverlongPunishment:
    """DAPO (arXiv 2503.14476) eq. 13 on the token length |y|, with L_max = max_completion_len and
    L_cache = soft_punish_cache: 0 if |y| <= L_max - L_cache; (L_max - L_cache - |y|) / L_cache on
    (L_max - L_cache, L_max]; -1 beyond L_max."""

    __name__ = "soft_overlong_punishment_reward"

    def __init__(self, max_completion_len: int, soft_punish_cache: int):
        self.max_completion_len = max_completion_len
        self.soft_punish_cache = soft_punish_cache

    def __call__(self, completion_ids: list[list[int]], **kwargs) -> list[float]:
        free = self.max_completion_len - self.soft_punish_cache
        out = []
        for ids in completion_ids:
            n = len(ids)
            if n <= free:
                out.append(0.0)
            elif n <= self.max_completion_len:
                out.append((free - n) / self.soft_punish_cache)
            else:
                out.append(-1.0)
        return out


def get_soft_overlong_punishment(max_completion_len: int, soft_punish_cache: int):
    """DAPO's soft overlong punishment (see `_SoftOverlongPunishment`)."""
    return _SoftOverlongPunishment(max_completion_len, soft_punish_cache)


class _RepetitionPenalty:
    """(1 - distinct n-grams / n-grams) * max_penalty over the completion's token ids; 0.0 below n tokens
    ("Demystifying Long Chain-of-Thought Reasoning", arXiv 2502.03373, App. C.2)."""

    __name__ = "repetition_penalty_reward"

    def __init__(self, ngram_size: int, max_penalty: float):
        self.ngram_size = ngram_size
        self.max_penalty = max_penalty

    def __call__(self, completion_ids: list[list[int]], **kwargs) -> list[float]:
        out = []
        n = self.ngram_size
        for ids in completion_ids:
            ids = list(ids)
            if len(ids) < n:
                out.append(0.0)
                continue
            grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
            repeated = 1.0 - len(set(grams)) / len(grams)
            out.append(repeated * self.max_penalty if repeated else 0.0)
        return out


def get_repetition_penalty_reward(ngram_size: int = 3, max_penalty: float = -1.0):
    """N-gram repetition penalty (see `_RepetitionPenalty`); ``max_penalty`` must be <= 0."""
    if max_penalty > 0:
        raise ValueError(f"max_penalty must not be positive, got {max_penalty}")
    return _RepetitionPenalty(ngram_size, max_penalty)
