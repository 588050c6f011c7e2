"""Exact-resume check for any vlmalign trainer, in one call:

    losses_full, losses_resumed = run_and_resume(factory, steps=6, k=3, workdir=tmp_path)
    assert_same_losses(losses_full, losses_resumed)

`factory(output_dir=..., **overrides)` must build a *fresh* trainer (model re-loaded from its path, same data and
seed) whose config takes `overrides` (TrainingArguments fields: max_steps, logging_steps, save_strategy,
save_steps) on top of its own. Three trainers are built: an uninterrupted run of `steps` steps; a run of the same
schedule (same max_steps, so the same learning-rate schedule) interrupted right after saving its checkpoint at
step `k` (an exception from `on_save`, as a crash would); and a fresh trainer resuming from that checkpoint with
``resume_from_checkpoint=True``. Returns the per-step logged losses {step: loss} of the uninterrupted run and of
the interrupted + resumed run.
"""

from __future__ import annotations

import math
import os

from transformers import TrainerCallback


class Interrupted(Exception):
    """Raised by `InterruptAfterSave` to stop a run right after a checkpoint, as a crash would."""


class InterruptAfterSave(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupted(f"interrupted after saving step {self.step}")


def step_losses(log_history: list[dict]) -> dict[int, float]:
    """{step: loss} of the per-step training logs (logging_steps=1)."""
    return {h["step"]: h["loss"] for h in log_history if "loss" in h and "step" in h}


def run_and_resume(trainer_factory, steps: int, k: int, workdir, **overrides) -> tuple[dict, dict]:
    """Run `steps` steps uninterrupted, and `k` steps + resume to `steps`; return their per-step losses."""
    assert 0 < k < steps
    common = dict(max_steps=steps, logging_steps=1, **overrides)
    full = trainer_factory(output_dir=os.path.join(workdir, "full"), save_strategy="no", **common)
    full.train()
    losses_full = step_losses(full.state.log_history)

    out = os.path.join(workdir, "interrupted")
    first = trainer_factory(output_dir=out, save_strategy="steps", save_steps=k, **common)
    first.add_callback(InterruptAfterSave(k))
    try:
        first.train()
    except Interrupted:
        pass
    else:
        raise AssertionError(f"the run was not interrupted at step {k}")
    assert os.path.isdir(os.path.join(out, f"checkpoint-{k}"))

    resumed = trainer_factory(output_dir=out, save_strategy="steps", save_steps=k, **common)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == steps
    return losses_full, step_losses(resumed.state.log_history)


def assert_same_losses(losses_full: dict, losses_resumed: dict, tol: float = 1e-6) -> None:
    assert sorted(losses_full) == sorted(losses_resumed), (losses_full, losses_resumed)
    for step in losses_full:
        a, b = losses_full[step], losses_resumed[step]
        assert math.isclose(a, b, rel_tol=0, abs_tol=tol), f"step {step}: {a} (uninterrupted) != {b} (resumed)"
