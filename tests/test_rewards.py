"""Reward functions, their registry and compute_rewards."""

import asyncio
import math
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from vlmalign.rl.rewards import (
    REWARD_FUNCTIONS,
    RewardFunctionError,
    accuracy_reward,
    compute_rewards,
    format_reward,
    get_reward_function,
    reward_metrics,
    think_format_reward,
)

PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]


def batch(completions, **columns):
    """Arguments for compute_rewards with one prompt per completion."""
    n = len(completions)
    return dict(prompts=[PROMPT] * n, completions=completions, completion_ids=[[1, 2]] * n, columns=columns)


# ---- format rewards ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, fmt, think_fmt",
    [
        ("<think>red things</think><answer>red</answer>", 1.0, 1.0),
        ("  <think>\nline 1\nline 2\n</think>\n<answer>\nred\n</answer>\n", 1.0, 1.0),
        ("<answer>red</answer>", 1.0, 0.0),
        ("Sure! <answer>red</answer>", 0.0, 0.0),  # text before
        ("<answer>red</answer> hope that helps", 0.0, 0.0),  # text after
        ("<think>x</think> so <answer>red</answer>", 0.0, 0.0),  # text between
        ("<think>x</think><answer>red", 0.0, 0.0),  # missing close tag
        ("<think>x<answer>red</answer>", 0.0, 0.0),  # think never closed
        ("<answer>a</answer><answer>b</answer>", 0.0, 0.0),  # two answers
        ("<think>x</think>", 0.0, 0.0),  # no answer
        ("red", 0.0, 0.0),
    ],
)
def test_format_rewards(text, fmt, think_fmt):
    assert format_reward(prompts=[PROMPT], completions=[text]) == [fmt]
    assert think_format_reward(prompts=[PROMPT], completions=[text]) == [think_fmt]


# ---- accuracy ------------------------------------------------------------------------------------------------


def test_accuracy_exact_match_words():
    completions = ["<answer>Red </answer>", "<answer>  light\n BLUE</answer>", "<answer>blue</answer>", "red"]
    solutions = ["red", "Light blue", "red", "red"]
    assert accuracy_reward(completions=completions, solution=solutions) == [1.0, 1.0, 0.0, 1.0]


def test_accuracy_math():
    completions = ["<answer>\\frac{1}{2}</answer>", "<answer>\\frac{1}{2}</answer>", "<answer>0.6</answer>"]
    assert accuracy_reward(completions=completions, solution=["0.5", "1/2", "0.5"]) == [1.0, 1.0, 0.0]


def test_accuracy_uses_last_answer_block():
    text = "<answer>3</answer> wait, no: <answer>4</answer>"
    assert accuracy_reward(completions=[text, text], solution=["4", "3"]) == [1.0, 0.0]


def test_accuracy_without_solution_is_none():
    assert accuracy_reward(completions=["<answer>red</answer>", "x"], solution=[None, ""]) == [None, None]
    assert accuracy_reward(completions=["<answer>red</answer>"]) == [None]  # no solution column at all


def test_accuracy_works_off_the_main_thread():
    # math_verify's signal-based timeouts raise outside the main thread unless disabled
    with ThreadPoolExecutor(1) as pool:
        result = pool.submit(accuracy_reward, completions=["<answer>1/2</answer>"], solution=["0.5"]).result()
    assert result == [1.0]


# ---- registry ----------------------------------------------------------------------------------------------


def test_registry_and_names():
    assert set(REWARD_FUNCTIONS) == {"format", "think_format", "accuracy"}
    assert get_reward_function("accuracy") is accuracy_reward
    assert get_reward_function("think_format_reward") is think_format_reward  # TRL spelling
    assert get_reward_function(len) is len
    with pytest.raises(ValueError) as info:
        get_reward_function("acuracy")
    assert "accuracy" in str(info.value) and "format" in str(info.value) and "think_format" in str(info.value)


def test_module_function_loading(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text(
        "def length_reward(completions, **kwargs):\n    return [float(len(c)) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    func = get_reward_function("my_rewards_mod:length_reward", trust_reward_code=True)
    per_func, total = compute_rewards([func], **batch(["ab", "abcd"]))
    assert total.tolist() == [2.0, 4.0]
    assert get_reward_function("json:dumps", trust_reward_code=True) is sys.modules["json"].dumps
    with pytest.raises(ValueError, match="no attribute"):
        get_reward_function("my_rewards_mod:missing", trust_reward_code=True)
    with pytest.raises(ImportError, match="no_such_module_xyz"):
        get_reward_function("no_such_module_xyz:f", trust_reward_code=True)


# ---- compute_rewards -----------------------------------------------------------------------------------------


def half_or_none(completions, **kwargs):
    return [None if c == "skip" else 0.5 for c in completions]


def test_compute_rewards_weights_and_none():
    completions = ["<answer>red</answer>", "red blue", "skip", "<answer>blue</answer>"]
    args = batch(completions, solution=["red", "red", None, "red"], images=[[None]] * 4)
    per_func, total = compute_rewards(["format", "accuracy", half_or_none], reward_weights=[1.0, 2.0, -1.0], **args)
    nan = float("nan")
    expected = torch.tensor([[1.0, 1.0, 0.5], [0.0, 0.0, 0.5], [0.0, nan, nan], [1.0, 0.0, 0.5]])
    assert per_func.dtype == torch.float32 and per_func.shape == (4, 3)
    assert torch.equal(torch.isnan(per_func), torch.isnan(expected))
    assert torch.allclose(per_func.nan_to_num(-9), expected.nan_to_num(-9))
    # total = 1*format + 2*accuracy - 1*half, NaN terms skipped
    assert total[:2].tolist() == [1 + 2 - 0.5, 0 + 0 - 0.5]
    assert total[3].item() == 1 + 0 - 0.5
    assert total[2].item() == 0.0  # format returned 0.0 and the other two None: not an all-None row


def test_all_none_row_is_nan_with_warning():
    with pytest.warns(UserWarning, match=r"1 of 2 completions got no reward .* sample indices \[0\]"):
        per_func, total = compute_rewards([half_or_none], **batch(["skip", "x"]))
    assert math.isnan(total[0].item()) and total[1].item() == 0.5


def test_async_reward_functions_run_concurrently():
    ready = asyncio.Event()

    async def waiter(completions, **kwargs):
        await asyncio.wait_for(ready.wait(), timeout=2)  # only finishes if `setter` runs at the same time
        return [1.0] * len(completions)

    async def setter(completions, **kwargs):
        ready.set()
        return [2.0] * len(completions)

    per_func, total = compute_rewards([waiter, setter, "format"], **batch(["a", "b"]))
    assert per_func.tolist() == [[1.0, 2.0, 0.0], [1.0, 2.0, 0.0]]
    assert total.tolist() == [3.0, 3.0]


def test_compute_rewards_inside_running_event_loop():
    async def double(completions, **kwargs):
        await asyncio.sleep(0)
        return [2.0 * len(c) for c in completions]

    async def main():
        return compute_rewards([double], **batch(["abc"]))

    _, total = asyncio.run(main())
    assert total.tolist() == [6.0]


def test_reward_weights_length_must_match():
    with pytest.raises(ValueError, match="2 reward_weights for 1 reward functions"):
        compute_rewards(["format"], reward_weights=[1.0, 2.0], **batch(["a"]))


# ---- error cases -------------------------------------------------------------------------------------------


def fails_on_bad(completions, **kwargs):
    return [1.0 / 0 if c == "bad" else 1.0 for c in completions]


def test_raising_function_names_function_and_sample():
    with pytest.raises(RewardFunctionError) as info:
        compute_rewards([fails_on_bad], **batch(["ok", "fine", "bad"]))
    message = str(info.value)
    assert "'fails_on_bad'" in message and "batch call" in message and "ZeroDivisionError" in message
    assert "sample 2" in message and "'bad'" in message
    assert info.value.sample_index == 2 and info.value.function_name == "fails_on_bad"


def test_raising_async_function_names_function_and_sample():
    async def async_fails(completions, **kwargs):
        if "bad" in completions:
            raise KeyError("boom")
        return [0.0] * len(completions)

    with pytest.raises(RewardFunctionError, match="'async_fails'.*KeyError.*sample 1"):
        compute_rewards([async_fails], **batch(["ok", "bad"]))


def test_batch_only_failure_says_no_single_sample():
    def needs_two(completions, **kwargs):
        if len(completions) == 2:
            raise RuntimeError("batch too big")
        return [0.0] * len(completions)

    with pytest.raises(RewardFunctionError, match="'needs_two'.*batch call.*batch too big.*no single sample"):
        compute_rewards([needs_two], **batch(["a", "b"]))


def test_wrong_length_names_function_expected_and_got():
    def short(completions, **kwargs):
        return [1.0]

    with pytest.raises(RewardFunctionError, match="'short'.*expected 3, got 1"):
        compute_rewards([short], **batch(["a", "b", "c"]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_names_function_sample_and_completion(bad):
    def non_finite(completions, **kwargs):
        return [1.0, bad, bad]

    long_text = "x" * 500
    with pytest.raises(RewardFunctionError) as info:
        compute_rewards([non_finite], **batch(["a", long_text, "c"]))
    message = str(info.value)
    assert "'non_finite'" in message and "sample 1" in message
    assert "xxx..." in message and long_text not in message  # completion shown, shortened


def test_non_numeric_names_function_and_sample():
    def stringy(completions, **kwargs):
        return [1.0, "1.0"]

    with pytest.raises(RewardFunctionError, match="'stringy'.*non-numeric.*sample 1"):
        compute_rewards([stringy], **batch(["a", "b"]))

    def not_a_list(completions, **kwargs):
        return 1.0

    with pytest.raises(RewardFunctionError, match="'not_a_list'.*must return a list"):
        compute_rewards([not_a_list], **batch(["a"]))


# ---- metrics -----------------------------------------------------------------------------------------------


def test_reward_metrics_ignore_none():
    nan = float("nan")
    per_func = torch.tensor([[1.0, 2.0], [0.0, nan], [1.0, 4.0]])
    total = torch.tensor([3.0, 0.0, 5.0])
    metrics = reward_metrics(per_func, total, ["format", "accuracy"])
    assert metrics["reward"] == pytest.approx(8 / 3)
    assert metrics["reward_std"] == pytest.approx(math.sqrt(((1 / 3) ** 2 + (8 / 3) ** 2 + (7 / 3) ** 2) / 2))
    assert metrics["rewards/format/mean"] == pytest.approx(2 / 3)
    assert metrics["rewards/format/std"] == pytest.approx(math.sqrt(((1 / 3) ** 2 * 2 + (2 / 3) ** 2) / 2))
    assert metrics["rewards/accuracy/mean"] == pytest.approx(3.0)  # the None is left out
    assert metrics["rewards/accuracy/std"] == pytest.approx(math.sqrt(2.0))  # std of [2, 4]
