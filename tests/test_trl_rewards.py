"""vlmalign.rewards returns TRL 1.16's values on a shared table of completions (tests/trl_reward_cases.py).

Expected values: TRL itself when `trl` is importable in this environment, otherwise the table TRL 1.16.0 wrote
(tests/data/trl_rewards_table.json, by benchmarks/derive_trl_reward_table.py). Each value is TRL's output, not a
value chosen here."""

import importlib.util
import json
import os
import pickle

import pytest

import trl_reward_cases as cases
from vlmalign.rewards import (accuracy_reward, get_cosine_scaled_reward, get_repetition_penalty_reward,
                              get_soft_overlong_punishment, reasoning_accuracy_reward, think_format_reward)

TABLE = os.path.join(os.path.dirname(__file__), "data", "trl_rewards_table.json")


def conv(text):
    return [{"role": "assistant", "content": text}]


def _ours(form) -> dict:
    wrap = conv if form == "conversational" else (lambda t: t)
    acc_c, acc_s = zip(*cases.ACCURACY_CASES)
    rea_c, rea_s = zip(*cases.REASONING_CASES)
    cos_c, cos_s, cos_n = zip(*cases.COSINE_CASES)
    return {
        "accuracy_reward": accuracy_reward([wrap(c) for c in acc_c], list(acc_s)),
        "reasoning_accuracy_reward": reasoning_accuracy_reward([wrap(c) for c in rea_c], list(rea_s)),
        "think_format_reward": think_format_reward([wrap(c) for c in cases.THINK_FORMAT_CASES]),
        "soft_overlong_punishment": get_soft_overlong_punishment(10, 4)(
            completion_ids=[[0] * n for n in cases.OVERLONG_LENGTHS]),
        "repetition_penalty": get_repetition_penalty_reward(3, -1.0)(completion_ids=cases.REPETITION_IDS),
        "cosine_scaled_reward": get_cosine_scaled_reward(100)(
            [wrap(c) for c in cos_c], list(cos_s), [[0] * n for n in cos_n]),
    }


def _expected() -> tuple[str, dict]:
    if importlib.util.find_spec("trl") is not None:
        import sys
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
        from derive_trl_reward_table import table
        return "trl (live)", table()
    with open(TABLE, encoding="utf-8") as f:
        return "stored table", json.load(f)


@pytest.mark.parametrize("form", ["conversational", "string"])
def test_rewards_equal_trl_on_shared_table(form):
    source, expected = _expected()
    ours = _ours(form)
    total = 0
    for name, values in ours.items():
        assert len(values) == len(expected[name]), name
        for i, (got, want) in enumerate(zip(values, expected[name])):
            assert (got is None) == (want is None) and (want is None or got == pytest.approx(want)), (
                f"{name}[{i}]: vlmalign {got} != TRL {want} ({source})")
        total += len(values)
    assert total >= 60
    # the table covers every kind of outcome: None (unparseable gold), 0, 1, and partial scores
    flat = [v for vs in expected.values() if isinstance(vs, list) for v in vs]
    assert None in flat and 0.0 in flat and 1.0 in flat and -0.25 in flat


def test_trl_script_format_and_tagged_solutions():
    # the format the GRPO script's own system prompt asks for scores 1.0 (vlmalign's built-in gives 0.0 here)
    from vlmalign.rl.rewards import think_format_reward as builtin_think
    text = "<think>\nThis is my reasoning.\n</think>\nThis is my answer."
    assert think_format_reward([conv(text)]) == [1.0]
    assert builtin_think(completions=[text]) == [0.0]
    # an <answer>-tagged solution that math_verify cannot parse is skipped (None), never scored 0.0
    assert accuracy_reward([conv("<answer>7</answer>")], ["<answer>7</answer>"]) == [None]


def test_factories_pickle_and_validate():
    for func in (get_soft_overlong_punishment(10, 4), get_repetition_penalty_reward(), get_cosine_scaled_reward(5)):
        assert pickle.loads(pickle.dumps(func)).__name__ == func.__name__
    with pytest.raises(ValueError, match="max_penalty"):
        get_repetition_penalty_reward(max_penalty=0.5)
    with pytest.raises(ValueError, match="2 completions but 1 solutions"):
        accuracy_reward([conv("1"), conv("2")], ["1"])


def test_log_extra_columns():
    logged = {}
    accuracy_reward([conv(r"\boxed{1}"), conv("x")], ["1", "no math"], log_extra=logged.__setitem__)
    assert logged["solution"] == ["1", "no math"]
    assert logged["answer_parsed"][1] == "[skipped]" and logged["gold_parsed"][1] == "[unparseable]"
