"""Per-step metrics of a trainer, averaged over the logging window and merged into the Trainer's logs."""

from __future__ import annotations

from collections import defaultdict

import torch


class MetricsMixin:
    """Collect per-step metrics (averaged over the logging window) and merge them into the Trainer's logs."""

    def _init_metrics(self):
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def record(self, name: str, value: float | torch.Tensor) -> None:
        mode = "train" if self.model.training else "eval"
        if isinstance(value, torch.Tensor):
            value = value.detach().float().mean().item()
        self._metrics[mode][name].append(float(value))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if "loss" in logs or not any(k.startswith("eval_") for k in logs) else "eval"
        metrics = {k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v}
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        logs = {**logs, **metrics}
        self._metrics[mode].clear()
        super().log(logs, start_time)
