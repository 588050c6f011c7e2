"""Non-finite loss / gradient guard, checked once per optimizer step, before the weights are touched.

`VLMTrainer` records the loss of every micro-batch (`record_loss`) and, at the optimizer step (before gradient
clipping, which would spread one NaN over every gradient), calls `check`: one device sync for the whole
accumulated step. Policies (`BaseConfig.nonfinite_policy`):

* ``"raise"`` (default): stop with `NonFiniteError`, naming the global step, whether the loss or the gradient norm
  is non-finite, and the first parameter with a non-finite gradient. The optimizer has not stepped: the weights
  are those after the previous step.
* ``"skip"``: drop the step's gradients (set to ``None``: optimizers leave parameters without a gradient
  untouched, moments and weight decay included), count it (metric ``nonfinite_skipped``) and go on.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

POLICIES = ("raise", "skip")


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient at `step` (the optimizer step in progress: `state.global_step + 1`)."""

    def __init__(self, message: str, step: int, kind: str, parameter: str | None = None):
        super().__init__(message)
        self.step, self.kind, self.parameter = step, kind, parameter


@dataclass
class Verdict:
    kind: str                   # "loss" or "gradient norm"
    value: float                # the non-finite loss, or the total gradient norm
    micro_batch: int | None     # which micro-batch's loss (kind == "loss")
    num_micro_batches: int
    parameter: str | None       # first parameter with a non-finite gradient (on this process)
    grad_norm: float            # total gradient norm of this process's gradients (logged as grad_norm)

    def describe(self, step: int) -> str:
        if self.kind == "loss":
            where = f" (micro-batch {self.micro_batch + 1} of {self.num_micro_batches})" if self.micro_batch is not None else ""
            text = f"non-finite loss ({self.value}) at global step {step}{where}"
        else:
            text = f"non-finite gradient norm ({self.value}) at global step {step}"
        if self.parameter:
            text += f"; first parameter with a non-finite gradient: {self.parameter}"
        return text


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # DTensor (FSDP2): this process's shard


def _norms(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    try:
        norms = torch._foreach_norm(grads)
    except (RuntimeError, TypeError, NotImplementedError):  # e.g. sparse gradients
        norms = [torch.linalg.vector_norm(g.coalesce().values() if g.is_sparse else g) for g in grads]
    return torch.stack([n.to(device=device, dtype=torch.float32) for n in norms])


class NonFiniteGuard:
    def __init__(self, policy: str = "raise"):
        if policy not in POLICIES:
            raise ValueError(f"nonfinite_policy must be one of {POLICIES}, got {policy!r}")
        self.policy = policy
        self.skipped = 0
        self._losses: list[torch.Tensor] = []

    def record_loss(self, loss: torch.Tensor) -> None:
        """Keep a micro-batch's (detached) loss until the optimizer step; no device sync."""
        if isinstance(loss, torch.Tensor):
            self._losses.append(loss.detach().float().reshape(-1)[:1])

    def reset(self) -> None:
        self._losses = []

    def check(self, named_parameters, check_grads: bool = True, reduce=None, device=None) -> Verdict | None:
        """Inspect the recorded losses and the accumulated gradients; None when all are finite.

        `reduce(tensor) -> tensor` sums a flag tensor over processes (so that every process takes the same
        decision; every process must call `check` then); None in a single process. `device`: where the flags
        live (the process's device, for the collective)."""
        losses, self._losses = self._losses, []
        named = [(n, _local(p.grad)) for n, p in named_parameters if check_grads and p.grad is not None]
        if device is None:
            if losses:
                device = losses[0].device
            elif named:
                device = named[0][1].device
            else:
                return None
        loss_values = torch.cat([l.to(device) for l in losses]) if losses else torch.zeros(0, device=device)
        norms = _norms([g for _, g in named], device) if named else torch.zeros(0, device=device)
        flags = torch.stack([(~torch.isfinite(loss_values)).any(), (~torch.isfinite(norms)).any()]).float()
        if reduce is not None:
            flags = reduce(flags)
        loss_bad, grad_bad = (bool(v > 0) for v in flags.tolist())  # the one sync per optimizer step
        if not (loss_bad or grad_bad):
            return None
        parameter = None
        norm_values = norms.tolist()
        for (name, grad), norm in zip(named, norm_values):
            if not math.isfinite(norm) and not bool(torch.isfinite(grad).all()):
                parameter = name
                break
        if parameter is None:  # a norm overflowed although every entry is finite
            parameter = next((n for (n, _), v in zip(named, norm_values) if not math.isfinite(v)), None)
        total = float(torch.linalg.vector_norm(norms)) if norms.numel() else float("nan")
        if loss_bad:
            bad = (~torch.isfinite(loss_values)).nonzero()
            if len(bad):
                micro = int(bad[0])
                return Verdict("loss", float(loss_values[micro]), micro, len(loss_values), parameter, total)
            return Verdict("loss", float("nan"), None, len(loss_values), parameter, total)  # on another process
        if math.isfinite(total):  # the non-finite gradient is on another process
            total = float("nan")
        return Verdict("gradient norm", total, None, len(loss_values), parameter, total)


class GuardMixin:
    """The guard's hooks in `VLMTrainer`, on public seams: `training_step` records the loss of every micro-batch
    and, after the backward of the accumulation's last one (``accelerator.sync_gradients``, which Trainer sets per
    micro-batch; fenced in vlmalign/compat.py), runs the check: the gradients are complete there, and Trainer has
    neither clipped them nor stepped the optimizer. `log` reports a skipped step's non-finite gradient norm."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._guard.record_loss(loss)  # checked at the optimizer step (one sync per step)
        if self.accelerator.sync_gradients:  # the last micro-batch before clipping and optimizer.step()
            self._check_before_optimizer_step()
        return loss

    def _check_before_optimizer_step(self) -> None:
        """Run the non-finite guard once per optimizer step, before clipping; raise or drop the step's gradients."""
        # Under fp16 a GradScaler skips steps with inf/NaN gradients (and lowers its scale) by design: only the
        # loss is checked then.
        check_grads = getattr(self.accelerator, "scaler", None) is None
        reduce = None
        if self.accelerator.num_processes > 1:
            reduce = functools.partial(self.accelerator.reduce, reduction="sum")
        verdict = self._guard.check(self.model.named_parameters(), check_grads=check_grads, reduce=reduce,
                                    device=self.args.device if reduce is not None else None)
        self._guard_verdict = verdict
        if verdict is None:
            return
        step = self.state.global_step + 1
        what = verdict.describe(step)
        if self._guard.policy == "raise":
            raise NonFiniteError(
                f"{what[0].upper()}{what[1:]}. The optimizer step was not taken: the weights are those after step "
                f"{step - 1}. Set nonfinite_policy='skip' to skip such steps instead.",
                step=step, kind=verdict.kind, parameter=verdict.parameter)
        self._drop_gradients()
        self._guard.skipped += 1
        logger.warning("%s: optimizer step skipped (%d so far)", what, self._guard.skipped)

    def _drop_gradients(self) -> None:
        """Make the coming optimizer.step() a no-op: optimizers leave parameters without a gradient untouched
        (moments, step counts and weight decay included); Trainer's clipping then sees no gradient. Under a
        GradScaler, fill them with NaN instead: the scaler then skips the step itself (it asserts that it saw
        gradients)."""
        scaler = getattr(self.accelerator, "scaler", None)
        params = list(self.model.parameters())
        if self.optimizer is not None:
            params += [p for group in self.optimizer.param_groups for p in group["params"]]
        for param in params:
            if param.grad is not None:
                if scaler is not None:
                    param.grad.fill_(float("nan"))
                else:
                    param.grad = None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._guard_verdict is not None and "grad_norm" in logs:
            # The last step was skipped: Trainer measured the dropped gradients; report the non-finite norm.
            logs = {**logs, "grad_norm": self._guard_verdict.grad_norm}
        if self._guard.policy == "skip" and ("loss" in logs or "train_loss" in logs):
            logs = {**logs, "nonfinite_skipped": self._guard.skipped}
        super().log(logs, start_time)
