"""What a trainer wraps around every reward function: isolated inputs and an optional time limit.

* **Isolation**: the function receives deep copies of its arguments (prompts, completions, images, other columns).
  A function that edits an image or a message in place changes only its copy, never the rows the trainer goes on
  to train on.
* **Time limit** (``GRPOConfig.reward_timeout``, seconds, default None: no limit): a call that has not returned by
  then stops training with `RewardFunctionError` naming the function. Python cannot stop a running function: the
  call is abandoned on a daemon thread (it does not keep the interpreter alive), so a function holding external
  resources should enforce its own limits too.
"""

from __future__ import annotations

import copy
import functools
import threading

from .rewards import RewardFunction, RewardFunctionError, _call_sync_or_async, reward_function_name


def guard_reward_function(func: RewardFunction, timeout: float | None = None) -> RewardFunction:
    """`func` called on deep copies of its arguments, within `timeout` seconds if given."""
    name = reward_function_name(func)

    @functools.wraps(func)
    def guarded(**kwargs):
        kwargs = copy.deepcopy(kwargs)
        if timeout is None:
            return func(**kwargs)
        result: dict = {}

        def run():
            try:
                result["value"] = _call_sync_or_async(func, kwargs)
            except BaseException as exc:  # handed to the caller's thread
                result["error"] = exc

        worker = threading.Thread(target=run, name=f"vlmalign-reward-{name}", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            raise RewardFunctionError(
                f"reward function {name!r} did not return within reward_timeout={timeout:g}s on a batch of "
                f"{len(kwargs.get('completions') or [])} completions; the call was abandoned", name)
        if "error" in result:
            raise result["error"]
        return result["value"]

    guarded.__vlmalign_guarded__ = True
    return guarded
