"""Zero-weighted vision-tower pass for forwards without an image, so every process runs the same collectives.

Under DDP, ZeRO-2, FSDP2 and ZeRO-3 the vision tower's parameters take part in collectives (gradient buckets,
all-gathers, reduce-scatters). A process whose batch has only text rows would skip them and the processes would
fall out of step: a "collective mismatch" crash on gloo, a hang on NCCL. As ms-swift, verl and LLaMA-Factory do,
such a process instead runs the vision tower on a small dummy image and adds ``0 * sum(features)`` to the input
embeddings of the language model: values are unchanged (exact zero), the tower's parameters get zero gradients
and every collective happens on every process.

`install(model, dummy_inputs, family)` registers two hooks on the transformers model (not a wrapper): the outer
forward records whether the call carries vision tensors and starts a sequence (no cache or an empty one: decoding
steps never run the tower on any process), and the language model's forward adds the dummy pass where needed.
It acts only in a multi-process run (torch.distributed initialised with world size > 1) and not inside
`suspended(model)` (generation with gathered parameters runs no collective). Hooks refer to the modules they are
called on, so a deep copy of the model (a frozen reference) carries working hooks of its own.
"""

from __future__ import annotations

import inspect
import re
from contextlib import contextmanager

import torch
from torch import nn

_STATE = "_vlmalign_vision_balance"


def _distributed() -> bool:
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def _language_model(model: nn.Module, pattern: str) -> nn.Module | None:
    """The outermost module whose name matches the family's language-model pattern."""
    for name, module in model.named_modules():
        if name and re.search(pattern, name + "."):
            return module
    return None


def _tensors(value):
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict) or hasattr(value, "values") and callable(value.values):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _starts_sequence(kwargs: dict) -> bool:
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    if cache is None:
        return True
    length = getattr(cache, "get_seq_length", None)
    return length is not None and length() == 0


def _outer_pre_hook(module, args, kwargs):
    state = module.__dict__.get(_STATE)
    if state is not None:
        state["pending"] = (kwargs.get("pixel_values") is None and _starts_sequence(kwargs)
                            and not state["suspended"] and _distributed())


def _language_pre_hook(module, args, kwargs):
    owner = module.__dict__.get("_vlmalign_balance_owner")
    state = owner.__dict__.get(_STATE) if owner is not None else None
    if not state or not state["pending"]:
        return None
    state["pending"] = False
    inputs = {k: v.to(next(owner.parameters()).device) if torch.is_tensor(v) else v
              for k, v in state["dummy"].items()}
    features = owner.get_image_features(**inputs)
    zero = sum(t.float().sum() for t in _tensors(features) if t.is_floating_point()) * 0.0
    embeds = kwargs.get("inputs_embeds")
    if embeds is not None:
        kwargs["inputs_embeds"] = embeds + zero.to(embeds.dtype)
    return args, kwargs


def vision_kwargs(batch: dict, model: nn.Module) -> dict:
    """The entries of an encoded batch that `model.get_image_features` takes (its vision tensors)."""
    accepted = inspect.signature(model.get_image_features).parameters
    return {k: v for k, v in batch.items() if k in accepted and k not in ("input_ids", "attention_mask")}


def install(model: nn.Module, dummy_inputs: dict, language_model_pattern: str) -> bool:
    """Register the hooks on `model` (a transformers VLM with `get_image_features`); returns whether installed."""
    if not hasattr(model, "get_image_features") or _STATE in model.__dict__:
        return _STATE in model.__dict__
    language = _language_model(model, language_model_pattern)
    if language is None or "pixel_values" not in dummy_inputs:
        return False
    model.__dict__[_STATE] = {"dummy": {k: v.detach().cpu() for k, v in dummy_inputs.items()},
                              "pending": False, "suspended": False}
    language.__dict__["_vlmalign_balance_owner"] = model   # plain attribute: not a submodule
    model.register_forward_pre_hook(_outer_pre_hook, with_kwargs=True)
    language.register_forward_pre_hook(_language_pre_hook, with_kwargs=True)
    return True


@contextmanager
def suspended(model: nn.Module):
    """No dummy pass inside the block (e.g. generation with gathered parameters, which runs no collective)."""
    state = model.__dict__.get(_STATE)
    if state is None:
        yield
        return
    before, state["suspended"] = state["suspended"], True
    try:
        yield
    finally:
        state["suspended"] = before
