"""Reward functions for GRPO / GSPO and the code that calls them.

Reward function protocol
------------------------
A reward function is called with keyword arguments::

    f(prompts=..., completions=..., completion_ids=..., **columns) -> list[float | None]

- ``prompts``: one entry per completion (the prompt repeated for each of its G completions), each a list of chat
  messages ``{"role": ..., "content": [{"type": "image"} | {"type": "text", "text": ...}]}``;
- ``completions``: the decoded completion strings;
- ``completion_ids``: the completion token ids (list of lists of ints);
- ``columns``: every other dataset column as a list aligned with the completions (``solution=[...]``,
  ``images=[...]``, ...).

It must accept ``**kwargs`` (ignoring columns it does not use) and return one value per completion: a float, or
``None`` when it does not apply to that sample (``None`` is excluded from the total and from the statistics).
It may be ``async def``; async functions of one call to :func:`compute_rewards` run concurrently.

Built-ins: :func:`format_reward`, :func:`think_format_reward`, :func:`accuracy_reward` (see
``REWARD_FUNCTIONS``); :func:`get_reward_function` resolves a name, a ``"module:function"`` path or a callable.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import math
import numbers
import re
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

from vlmalign.rl.advantages import nanstd

RewardFunction = Callable[..., Any]

# --------------------------------------------------------------------------------------------------------------
# Built-in reward functions
# --------------------------------------------------------------------------------------------------------------

_TAG = r"</?(?:think|answer)>"
_BODY = rf"(?:(?!{_TAG}).)*"  # any text, including newlines, that contains none of the four tags
_THINK_ANSWER_RE = re.compile(rf"\s*<think>{_BODY}</think>\s*<answer>{_BODY}</answer>\s*", re.DOTALL)
_ANSWER_ONLY_RE = re.compile(rf"\s*<answer>{_BODY}</answer>\s*", re.DOTALL)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _completion_text(completion: Any) -> str:
    """The text of a completion: a string, or (conversational form) the content of its last message."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        if isinstance(content, list):
            return "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return str(content)
    raise TypeError(f"a completion must be a string (or a list of chat messages), got {type(completion).__name__}")


def _require_completions(completions: Any) -> list:
    if completions is None:
        raise TypeError("reward functions need the `completions` argument")
    return list(completions)


def format_reward(prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float]:
    """1.0 if a completion is exactly a reasoning + answer block, else 0.0.

    Accepted shapes (``\\s*`` = optional whitespace, including newlines)::

        \\s* <think> ... </think> \\s* <answer> ... </answer> \\s*
        \\s* <answer> ... </answer> \\s*

    Anything else scores 0.0: text before, between or after the blocks, a missing closing tag, a second block,
    or a ``<think>``/``<answer>`` tag nested inside a block. Block contents may span several lines and may be empty.
    """
    texts = [_completion_text(c) for c in _require_completions(completions)]
    return [1.0 if (_THINK_ANSWER_RE.fullmatch(t) or _ANSWER_ONLY_RE.fullmatch(t)) else 0.0 for t in texts]


def think_format_reward(prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float]:
    """Stricter :func:`format_reward`: 1.0 only for ``<think>...</think><answer>...</answer>`` (whitespace allowed
    around and between the blocks); an answer block alone scores 0.0."""
    texts = [_completion_text(c) for c in _require_completions(completions)]
    return [1.0 if _THINK_ANSWER_RE.fullmatch(t) else 0.0 for t in texts]


def extract_answer(text: str) -> str:
    """Content of the last ``<answer>...</answer>`` block of ``text``, or the whole text if there is none."""
    matches = _ANSWER_RE.findall(text)
    return matches[-1] if matches else text


def normalize_text(text: str) -> str:
    """Exact-match normalisation: strip, casefold and collapse runs of whitespace to one space."""
    return " ".join(text.split()).casefold()


def _math_timeouts() -> tuple[int | None, int | None]:
    """(parsing_timeout, timeout_seconds) for math_verify.

    math_verify enforces timeouts with ``signal.alarm``, which only works on the main thread (elsewhere it raises
    ``ValueError``). On the main thread we keep the protection against pathological expressions (5 s each);
    on any other thread we disable it (``None``) so the reward still works.
    """
    if threading.current_thread() is threading.main_thread():
        return 5, 5
    return None, None


@functools.lru_cache(maxsize=4096)
def _parse_math(text: str, parsing_timeout: int | None) -> tuple:
    """``math_verify.parse`` (imported lazily: it pulls in sympy), cached because the G completions of a group
    share one solution. Returns an empty tuple when nothing parses."""
    from math_verify import parse

    return tuple(parse(text, parsing_timeout=parsing_timeout))


def _accuracy(completion: Any, solution: Any) -> float | None:
    if solution is None or not str(solution).strip():
        return None
    gold_text = extract_answer(str(solution)).strip()  # tagged solutions ("<answer> 7 </answer>") compare by content
    answer = extract_answer(_completion_text(completion))
    parsing_timeout, verify_timeout = _math_timeouts()
    gold = _parse_math(gold_text, parsing_timeout)
    if not gold:
        return float(normalize_text(answer) == normalize_text(gold_text))
    predicted = _parse_math(answer, parsing_timeout)
    if not predicted:
        return 0.0
    from math_verify import verify

    return float(verify(list(gold), list(predicted), timeout_seconds=verify_timeout))


def accuracy_reward(prompts=None, completions=None, completion_ids=None, solution=None, **kwargs) -> list:
    """1.0 if the answer matches the ``solution`` column, 0.0 if not, None if the row has no solution.

    The answer is the content of the last ``<answer>...</answer>`` block, or the whole completion if there is
    none; the same holds for the solution (datasets such as multimodal-open-r1 tag it). If the solution parses as math with ``math_verify.parse`` (``"0.5"``, ``"\\frac{1}{2}"``, ``"x = 3"``),
    the answer is parsed too and compared with ``math_verify.verify`` (so ``"1/2"`` matches ``"0.5"``). Otherwise
    (``"red"``, ``"(B)"``) the two are compared exactly after strip + casefold + whitespace collapsing.
    Works on any thread (see ``_math_timeouts``).
    """
    completions = _require_completions(completions)
    if solution is None:
        return [None] * len(completions)
    if len(solution) != len(completions):
        raise ValueError(f"got {len(solution)} solutions for {len(completions)} completions")
    return [_accuracy(c, s) for c, s in zip(completions, solution)]


REWARD_FUNCTIONS: dict[str, RewardFunction] = {
    "format": format_reward,
    "think_format": think_format_reward,
    "accuracy": accuracy_reward,
}


def _import_function(spec: str) -> RewardFunction:
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise ValueError(f"reward function path {spec!r} must look like 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"cannot import module {module_name!r} for reward function {spec!r}: {exc}") from exc
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise ValueError(f"reward function {spec!r}: {obj.__name__!r} has no attribute {attr!r}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise TypeError(f"reward function {spec!r} is not callable (got {type(obj).__name__})")
    return obj


def get_reward_function(spec: str | RewardFunction, *, trust_reward_code: bool = False) -> RewardFunction:
    """Resolve a reward function.

    - a callable is returned unchanged;
    - a name from ``REWARD_FUNCTIONS`` (``"format"``, ``"think_format"``, ``"accuracy"``; the TRL-style
      ``"<name>_reward"`` spellings are accepted too);
    - ``"package.module:function"`` (or ``"module:Class.method"``) imports that module and returns the function.
      **This runs the user's code**: importing executes the module's top-level code, and the trainer then calls
      the function on every batch. So it needs ``trust_reward_code=True`` (``GRPOConfig.trust_reward_code``, CLI
      ``--trust_reward_code true`` / ``--trust-reward-code``): a name in a YAML file alone never imports code.
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"a reward function must be a name, a 'module:function' string or a callable, got {spec!r}")
    if ":" in spec:
        if not trust_reward_code:
            raise ValueError(
                f"reward function {spec!r} names code to import and run; this needs an explicit opt-in: "
                f"trust_reward_code=True (GRPOConfig / CLI --trust_reward_code true; eval and make-preferences: "
                f"--trust-reward-code). Only do this for modules you trust.")
        return _import_function(spec)
    name = spec.strip()
    if name not in REWARD_FUNCTIONS and name.endswith("_reward"):
        name = name[: -len("_reward")]
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    raise ValueError(
        f"unknown reward function {spec!r}; available: {', '.join(sorted(REWARD_FUNCTIONS))} "
        "(or 'package.module:function' for your own)"
    )


def reward_function_name(func: RewardFunction) -> str:
    """A readable name for a reward function (its ``__name__``; unwraps ``functools.partial``)."""
    while isinstance(func, functools.partial):
        func = func.func
    return getattr(func, "__name__", None) or type(func).__name__


# --------------------------------------------------------------------------------------------------------------
# Calling reward functions
# --------------------------------------------------------------------------------------------------------------


class RewardFunctionError(RuntimeError):
    """A reward function raised or returned something unusable.

    Attributes: ``function_name`` and ``sample_index`` (None when no single sample could be blamed).
    """

    def __init__(self, message: str, function_name: str, sample_index: int | None = None):
        super().__init__(message)
        self.function_name = function_name
        self.sample_index = sample_index


_RESERVED = ("prompts", "completions", "completion_ids")


def _shorten(text: Any, limit: int = 80) -> str:
    text = text if isinstance(text, str) else repr(text)
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _run_coroutine(coro) -> Any:
    """Run ``coro`` to completion from synchronous code, whether or not an event loop is running here.

    With no running loop it uses ``asyncio.run``; inside a running loop (a notebook, an async app) it runs a fresh
    loop on a helper thread and blocks until it is done.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmalign-rewards") as pool:
        return pool.submit(asyncio.run, coro).result()


async def _await(awaitable) -> Any:
    return await awaitable


async def _gather(awaitables: list) -> list:
    return await asyncio.gather(*awaitables, return_exceptions=True)


def _call_sync_or_async(func: RewardFunction, kwargs: dict) -> Any:
    out = func(**kwargs)
    return _run_coroutine(_await(out)) if inspect.isawaitable(out) else out


def _row_kwargs(kwargs: dict, index: int, n: int) -> dict:
    """The call arguments restricted to sample ``index`` (aligned lists sliced, anything else passed as is)."""
    return {
        key: [value[index]] if isinstance(value, (list, tuple)) and len(value) == n else value
        for key, value in kwargs.items()
    }


def _find_failing_sample(func: RewardFunction, kwargs: dict, n: int) -> int | None:
    """Index of the first sample on which ``func`` raises when called on that sample alone, or None."""
    for index in range(n):
        try:
            _call_sync_or_async(func, _row_kwargs(kwargs, index, n))
        except Exception:
            return index
    return None


def _raised_error(func: RewardFunction, exc: BaseException, kwargs: dict) -> RewardFunctionError:
    """Build the error for a reward function that raised on the batch call, blaming a sample if one reproduces it.

    To find the sample the function is called again on each sample alone (error path only).
    """
    if isinstance(exc, RewardFunctionError):  # already explained (e.g. a timeout): calling it again would repeat it
        return exc
    name = reward_function_name(func)
    completions = kwargs["completions"]
    n = len(completions)
    message = f"reward function {name!r} raised on the batch call ({n} completions): {type(exc).__name__}: {exc}"
    index = _find_failing_sample(func, kwargs, n)
    if index is None:
        message += "; no single sample reproduces the error when called alone"
    else:
        message += f"; it also raises on sample {index} alone (completion: {_shorten(completions[index])})"
    return RewardFunctionError(message, name, index)


def _close_pending(pending: dict) -> None:
    for awaitable in pending.values():
        if inspect.iscoroutine(awaitable):
            awaitable.close()


def _call_all(funcs: list[RewardFunction], kwargs: dict) -> list[Any]:
    """Call every function; sync ones in order, then all async ones concurrently in one ``asyncio.gather``."""
    results: list[Any] = [None] * len(funcs)
    pending: dict[int, Any] = {}
    try:
        for j, func in enumerate(funcs):
            try:
                out = func(**kwargs)
            except Exception as exc:
                raise _raised_error(func, exc, kwargs) from exc
            if inspect.isawaitable(out):
                pending[j] = out
            else:
                results[j] = out
    except BaseException:
        _close_pending(pending)
        raise
    if pending:
        outs = _run_coroutine(_gather(list(pending.values())))
        for j, out in zip(pending, outs):
            if isinstance(out, Exception):
                raise _raised_error(funcs[j], out, kwargs) from out
            if isinstance(out, BaseException):
                raise out
            results[j] = out
    return results


def _to_float(name: str, value: Any, index: int, completions: Sequence) -> float:
    """One returned value as a float (None -> NaN); raises RewardFunctionError for non-numeric or non-finite."""
    if value is None:
        return math.nan
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise RewardFunctionError(
            f"reward function {name!r} returned a non-numeric value for sample {index}: {value!r} "
            f"({type(value).__name__}); expected a float or None",
            name,
            index,
        )
    result = float(value)
    if not math.isfinite(result):
        raise RewardFunctionError(
            f"reward function {name!r} returned {result} for sample {index} "
            f"(completion: {_shorten(completions[index])}); return None to skip a sample instead",
            name,
            index,
        )
    return result


def _to_column(name: str, output: Any, completions: Sequence) -> list[float]:
    """Validate one function's output and convert it to floats (NaN for None)."""
    if hasattr(output, "tolist") and not isinstance(output, (list, tuple)):
        output = output.tolist()  # torch / numpy arrays
    if not isinstance(output, (list, tuple)):
        raise RewardFunctionError(
            f"reward function {name!r} must return a list with one float or None per completion, "
            f"got {type(output).__name__}",
            name,
        )
    if len(output) != len(completions):
        raise RewardFunctionError(
            f"reward function {name!r} returned the wrong number of rewards: "
            f"expected {len(completions)}, got {len(output)}",
            name,
        )
    return [_to_float(name, value, i, completions) for i, value in enumerate(output)]


def _check_batch(prompts: Sequence, completions: Sequence, completion_ids: Sequence, columns: dict) -> None:
    n = len(completions)
    for label, values in (("prompts", prompts), ("completion_ids", completion_ids)):
        if values is not None and len(values) != n:
            raise ValueError(f"{label} has {len(values)} entries for {n} completions")
    for key, values in columns.items():
        if key in _RESERVED:
            raise ValueError(f"column {key!r} clashes with a reward function argument; rename it")
        if isinstance(values, (list, tuple)) and len(values) != n:
            raise ValueError(f"column {key!r} has {len(values)} entries for {n} completions")


def _check_weights(reward_weights: Sequence[float] | Tensor | None, num_funcs: int) -> Tensor:
    if reward_weights is None:
        return torch.ones(num_funcs, dtype=torch.float32)
    weights = torch.as_tensor(reward_weights, dtype=torch.float32).reshape(-1)
    if weights.numel() != num_funcs:
        raise ValueError(f"got {weights.numel()} reward_weights for {num_funcs} reward functions")
    if not torch.isfinite(weights).all():
        raise ValueError(f"reward_weights must be finite, got {weights.tolist()}")
    return weights


def _weighted_total(per_func: Tensor, weights: Tensor) -> Tensor:
    """nansum_f w_f * r_f per row; NaN (with a warning) for rows where every function returned None."""
    no_reward = torch.isnan(per_func).all(dim=1)
    total = torch.nansum(per_func * weights, dim=1)
    if no_reward.any():
        rows = no_reward.nonzero().flatten().tolist()
        shown = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
        warnings.warn(
            f"{len(rows)} of {per_func.shape[0]} completions got no reward (every reward function returned None) "
            f"at sample indices [{shown}]; their total reward is NaN and their advantage will be 0",
            stacklevel=3,
        )
        total = torch.where(no_reward, torch.full_like(total, math.nan), total)
    return total


def compute_rewards(
    reward_funcs: Sequence[str | RewardFunction],
    prompts: Sequence,
    completions: Sequence,
    completion_ids: Sequence | None,
    columns: dict[str, Sequence] | None = None,
    reward_weights: Sequence[float] | Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Call every reward function on the batch and combine the results.

    ``reward_funcs`` may hold callables or anything :func:`get_reward_function` accepts. ``columns`` holds the other
    dataset columns (lists aligned with ``completions``; non-list values are passed through unchanged).

    Returns ``(per_func, total)``:
        ``per_func``: float32 [N, F], the unweighted reward of each function, NaN where it returned None;
        ``total``: float32 [N], ``nansum_f w_f * r_f`` (``reward_weights`` default to 1); NaN, with a warning,
        for a row where every function returned None.

    Raises :class:`RewardFunctionError` naming the function when one raises (with the sample index when calling it
    on single samples reproduces the error), returns the wrong number of values, a non-numeric value, or NaN/inf
    (naming the first bad sample and its completion). Raises ValueError for misaligned inputs or weights.
    """
    funcs = [get_reward_function(f) for f in reward_funcs]
    if not funcs:
        raise ValueError("compute_rewards needs at least one reward function")
    columns = dict(columns or {})
    completions = list(completions)
    _check_batch(prompts, completions, completion_ids, columns)
    weights = _check_weights(reward_weights, len(funcs))

    kwargs = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **columns}
    outputs = _call_all(funcs, kwargs)
    table = [_to_column(reward_function_name(f), out, completions) for f, out in zip(funcs, outputs)]
    per_func = torch.tensor(table, dtype=torch.float32).reshape(len(funcs), len(completions)).T.contiguous()
    return per_func, _weighted_total(per_func, weights)


def _nan_mean(x: Tensor) -> float:
    return torch.nanmean(x.double()).item() if x.numel() else math.nan


def _nan_std(x: Tensor) -> float:
    return nanstd(x.double()).item() if x.numel() else math.nan


def reward_metrics(per_func: Tensor, total: Tensor, names: Sequence[str]) -> dict[str, float]:
    """Batch statistics of the rewards, ignoring NaN (None) entries.

    Keys: ``reward`` / ``reward_std`` (mean / unbiased std of ``total`` over the batch) and, per function,
    ``rewards/<name>/mean`` / ``rewards/<name>/std``. A statistic with no valid sample is NaN; a std over one
    sample is 0. (:func:`vlmalign.rl.advantages.group_advantages` also reports a ``reward_std``: the mean *group*
    std, which is what TRL logs under that key.)
    """
    if per_func.dim() != 2 or per_func.shape[1] != len(names):
        raise ValueError(f"per_func has shape {tuple(per_func.shape)} but {len(names)} names were given")
    metrics = {"reward": _nan_mean(total), "reward_std": _nan_std(total)}
    for j, name in enumerate(names):
        metrics[f"rewards/{name}/mean"] = _nan_mean(per_func[:, j])
        metrics[f"rewards/{name}/std"] = _nan_std(per_func[:, j])
    return metrics
