"""Mixture-of-experts models: the router load-balancing loss as the model defines it, computed by vlmalign.

transformers adds `router_aux_loss_coef * aux_loss` to the loss it computes from `labels` when the text config has
`output_router_logits=True`, over the rows its `attention_mask` marks. vlmalign computes its losses from the hidden
states itself (no `labels` reach the model), so nothing is counted twice; and the model's own computation cannot
be used as is: its attention mask covers the cached prompt as well as the new tokens in the shared-prefix
completion pass and in generation (a shape error). So:

* `model_router_loss_off`: the model's own aux-loss computation is switched off around vlmalign's forwards and
  generation (the config flag is restored afterwards, so the saved config keeps the user's setting);
* `RouterCapture`: forward hooks on the model's router modules (found through the model's own output-recording
  table, `_can_record_outputs["router_logits"]`, the modules whose output transformers returns as
  `router_logits`) collect each layer's router logits of the policy forwards run inside it; the forwards say
  which rows are real (`route_weights`); the loss is `vlmalign.losses.router.load_balancing_loss`.

Rows counted: the tokens the forward runs with attention mask 1 (prompt, images and completion; padding never);
packed rows have no padding; in the shared-prefix path a prompt run once counts once per completion that shares
it, so the loss equals the plain path's, except that the last token of a completion as long as the batch's longest
is not run there (its output predicts nothing) and so is not counted.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..losses.router import load_balancing_loss

_ACTIVE: list["RouterCapture"] = []


def _text_config(model: nn.Module):
    from .forward import unwrap_model

    config = unwrap_model(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def is_moe(model: nn.Module) -> bool:
    """The model is a mixture of experts whose config has the transformers router-logits switch."""
    return hasattr(_text_config(model), "output_router_logits")


def router_aux_settings(model: nn.Module, coef: float | None) -> tuple[bool, float]:
    """(enabled, coefficient) of the load-balancing loss for a training run.

    `coef` None (default): as the model defines it: on when the text config has `output_router_logits=True`, with
    its `router_aux_loss_coef`. A number: that coefficient on a mixture-of-experts model (0 turns it off), as TRL's
    `router_aux_loss_coef`; refused on a model without routers."""
    text = _text_config(model)
    if coef is None:
        enabled = bool(getattr(text, "output_router_logits", False))
        value = float(getattr(text, "router_aux_loss_coef", 0.0) or 0.0)
        return enabled and value != 0.0, value
    if not hasattr(text, "output_router_logits"):
        raise ValueError(f"router_aux_loss_coef={coef} but {type(text).__name__} is not a mixture-of-experts model "
                         "that returns router logits: there is no load-balancing loss to weight")
    return float(coef) != 0.0, float(coef)


@contextmanager
def model_router_loss_off(model: nn.Module):
    """Within the block, the model does not compute its own aux loss (`output_router_logits` False)."""
    text = _text_config(model)
    if not getattr(text, "output_router_logits", False):
        yield
        return
    text.output_router_logits = False
    try:
        yield
    finally:
        text.output_router_logits = True


def router_modules(model: nn.Module) -> list[tuple[nn.Module, int]]:
    """(module, output index) of the modules whose output transformers records as `router_logits`, in layer
    order."""
    targets = []
    for module in model.modules():
        recorder = (getattr(module, "_can_record_outputs", None) or {}).get("router_logits")
        if recorder is not None and hasattr(recorder, "target_class"):
            targets.append((recorder.target_class, getattr(recorder, "index", 0) or 0))
    found = []
    for module in model.modules():
        match = next((index for cls, index in targets if isinstance(module, cls)), None)
        if match is not None:
            found.append((module, match))
    return found


class RouterCapture:
    """Collects the router logits of the forwards run inside `with RouterCapture(model) as capture:`;
    `capture.loss(top_k)` is then the load-balancing loss over them (rows weighted by `route_weights`)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.logits: list[torch.Tensor] = []
        self.weights: list[torch.Tensor | None] = []
        self._current: torch.Tensor | None = None
        self._handles = []

    def __enter__(self):
        modules = router_modules(self.model)
        if not modules:
            raise ValueError(f"{type(self.model).__name__}: no router module found (no router_logits recorder)")
        for module, index in modules:
            self._handles.append(module.register_forward_hook(self._hook(index)))
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        _ACTIVE.remove(self)
        return False

    def _hook(self, index: int):
        def hook(module, args, output):
            logits = output[index] if isinstance(output, (tuple, list)) else output
            self.logits.append(logits)
            self.weights.append(self._current)
        return hook

    def loss(self, top_k: int) -> torch.Tensor:
        return load_balancing_loss(self.logits, top_k, self.weights)


@contextmanager
def route_weights(weights: torch.Tensor | None):
    """Within the block, router rows of an active `RouterCapture` get these weights (flattened [batch * length];
    None: all 1). A no-op without a capture."""
    if not _ACTIVE:
        yield
        return
    capture = _ACTIVE[-1]
    previous = capture._current
    capture._current = None if weights is None else weights.reshape(-1)
    try:
        yield
    finally:
        capture._current = previous


def top_k(model: nn.Module) -> int:
    text = _text_config(model)
    return int(getattr(text, "num_experts_per_tok", None) or getattr(text, "top_k", None) or 1)
