"""Math-verified accuracy rewards of TRL 1.16 (`accuracy_reward`, `reasoning_accuracy_reward`,
`get_cosine_scaled_reward`), built on ``math_verify``.

The gold ``solution`` is parsed with math_verify's default extraction; if nothing parses the row is skipped
(None). The completion is parsed for LaTeX only, ``\\boxed{}`` first, no anchor-less extraction, first match, units
normalised; the reward is ``float(verify(gold, answer))``. Timeouts (10 s parse, 5 s verify) apply on the main
thread only, as math_verify enforces them with signals.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

from ._text import completion_text


def _timeouts() -> tuple[int | None, int | None]:
    if threading.current_thread() is threading.main_thread():
        return 10, 5
    import logging

    logging.getLogger("math_verify.parser").setLevel(logging.ERROR)
    logging.getLogger("math_verify.grader").setLevel(logging.ERROR)
    return None, None


def _score(text: str, sol: str, parse_timeout, verify_timeout) -> tuple[float | None, str, str]:
    """(reward or None, gold as parsed, answer as parsed) for one completion text."""
    try:
        from math_verify import LatexExtractionConfig, parse, verify
        from math_verify.parser import NormalizationConfig
    except ImportError as exc:  # pragma: no cover - math-verify is a dependency
        raise ImportError("vlmalign.rewards accuracy rewards need the math-verify package") from exc
    gold = parse(sol, parsing_timeout=parse_timeout)
    if len(gold) == 0:
        return None, "[unparseable]", "[skipped]"
    config = LatexExtractionConfig(normalization_config=NormalizationConfig(units=True), boxed_match_priority=0,
                                   try_extract_without_anchor=False)
    answer = parse(text, extraction_config=[config], extraction_mode="first_match", parsing_timeout=parse_timeout)
    reward = float(verify(gold, answer, timeout_seconds=verify_timeout))
    return reward, str(gold), str(answer) if answer else "[unparseable]"


def _log(log_extra, solution, golds, answers) -> None:
    if log_extra is not None:
        log_extra("solution", list(solution))
        log_extra("gold_parsed", golds)
        log_extra("answer_parsed", answers)


def accuracy_reward(completions: list, solution: list[str], log_extra: Callable | None = None,
                    **kwargs) -> list[float | None]:
    """1.0 / 0.0: does the completion's (first, boxed-preferred) LaTeX answer equal the gold ``solution``
    (math_verify)? None where the solution does not parse. ``len(solution)`` must equal ``len(completions)``."""
    if len(solution) != len(completions):
        raise ValueError(f"accuracy_reward: {len(completions)} completions but {len(solution)} solutions")
    parse_timeout, verify_timeout = _timeouts()
    rewards, golds, answers = [], [], []
    for completion, sol in zip(completions, solution):
        reward, gold, answer = _score(completion_text(completion), sol, parse_timeout, verify_timeout)
        rewards.append(reward)
        golds.append(gold)
        answers.append(answer)
    _log(log_extra, solution, golds, answers)
    return rewards


def reasoning_accuracy_reward(completions: list, solution: list[str], reasoning_delimiters: list[str] | None = None,
                              log_extra: Callable | None = None, **kwargs) -> list[float | None]:
    """`accuracy_reward` on the text after the reasoning: for the first delimiter of ``reasoning_delimiters``
    (default ``["</think>"]``) found in the completion, the part after its last occurrence. 0.0 when no delimiter
    occurs (reasoning not finished), None where the solution does not parse."""
    if len(solution) != len(completions):
        raise ValueError(f"reasoning_accuracy_reward: {len(completions)} completions but {len(solution)} solutions")
    delimiters = ["</think>"] if reasoning_delimiters is None else reasoning_delimiters
    parse_timeout, verify_timeout = _timeouts()
    rewards, golds, answers = [], [], []
    for completion, sol in zip(completions, solution):
        text = completion_text(completion)
        delimiter = next((d for d in delimiters if d in text), None)
        if delimiter is None:
            rewards.append(0.0)
            golds.append("[incomplete reasoning]")
            answers.append("[incomplete reasoning]")
            continue
        reward, gold, answer = _score(text.split(delimiter)[-1], sol, parse_timeout, verify_timeout)
        rewards.append(reward)
        golds.append(gold)
        answers.append(answer)
    _log(log_extra, solution, golds, answers)
    return rewards


class _CosineScaledReward:
    """Correctness (`accuracy_reward`) scaled by length on a cosine schedule ("Demystifying Long Chain-of-Thought
    Reasoning", arXiv 2502.03373, App. C.1): ``v_min + (v_max - v_min) * (1 + cos(pi * min(|y| / L, 1))) / 2``,
    with (v_min, v_max) = (min_value_correct, max_value_correct) when correct and (max_value_wrong,
    min_value_wrong) when wrong; None where the solution does not parse."""

    __name__ = "cosine_scaled_reward"

    def __init__(self, max_len, min_value_wrong, max_value_wrong, min_value_correct, max_value_correct):
        self.max_len = max_len
        self.min_value_wrong, self.max_value_wrong = min_value_wrong, max_value_wrong
        self.min_value_correct, self.max_value_correct = min_value_correct, max_value_correct

    def __call__(self, completions: list, solution: list[str], completion_ids: list[list[int]],
                 **kwargs) -> list[float | None]:
        correct = accuracy_reward(completions, solution)
        if len(completion_ids) != len(correct):
            raise ValueError(f"cosine_scaled_reward: {len(correct)} completions but {len(completion_ids)} id lists")
        out = []
        for ok, ids in zip(correct, completion_ids):
            if ok is None:
                out.append(None)
                continue
            lo, hi = ((self.min_value_correct, self.max_value_correct) if ok
                      else (self.max_value_wrong, self.min_value_wrong))
            progress = min(len(ids) / self.max_len, 1.0)
            out.append(float(lo + 0.5 * (hi - lo) * (1.0 + math.cos(math.pi * progress))))
        return out


def get_cosine_scaled_reward(max_len: int, min_value_wrong: float = -1.0, max_value_wrong: float = -0.5,
                             min_value_correct: float = 0.5, max_value_correct: float = 1.0):
    """Length-scaled correctness reward (see `_CosineScaledReward`)."""
    return _CosineScaledReward(max_len, min_value_wrong, max_value_wrong, min_value_correct, max_value_correct)
