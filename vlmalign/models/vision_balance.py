"""Zero-weighted vision-tower pass for forwards without an image, so every process runs the same collectives.

Under DDP, ZeRO-2, FSDP2 and ZeRO-3 the vision tower's parameters take part in collectives (gradient buckets,
all-gathers, reduce-scatters). A process whose batch has only text rows would skip them and the processes would
fall out of step: a "collective mismatch" crash on gloo, a hang on NCCL. As ms-swift, verl and LLaMA-Factory do,
such a process instead runs the vision tower on a small dummy image and adds ``0 * sum(features)`` to the input
embeddings of the language model: values are unchanged (exact zero), the tower's parameters get zero gradients
and every collective happens on every process, in the same order as a forward with images (token embeddings,
vision tower, language model; backward in reverse): ZeRO-3 checks that every process fetches modules in the same
order.

`install(model, dummy_inputs)` registers two hooks on the transformers model (not a wrapper): the outer forward
records whether the call carries vision tensors and starts a sequence (no cache or an empty one: decoding steps
never run the tower on any process), the input-embedding module runs the dummy pass after itself where needed and
the language model (`get_decoder()`) adds the zero to its input embeddings.
It acts only in a multi-process run (torch.distributed initialised with world size > 1) and not inside
`suspended(model)` (generation with gathered parameters runs no collective). Hooks refer to the modules they are
called on, so a deep copy of the model (a frozen reference) carries working hooks of its own.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
from torch import nn

_STATE = "_vlmalign_vision_balance"


def _distributed() -> bool:
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def _tensors(value):
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict) or hasattr(value, "values") and callable(value.values):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _merged_features(output):
    """The part of `get_image_features`' output that a forward merges into the embeddings (`pooler_output` of a
    ModelOutput, else its first field): only that may carry the gradient, as in a forward with images (ZeRO-3
    counts every output of a module that backward reaches)."""
    pooled = getattr(output, "pooler_output", None)
    if pooled is not None:
        # Qwen3-VL also merges DeepStack features (intermediate vision layers) into early decoder layers
        deepstack = getattr(output, "deepstack_features", None)
        return pooled if deepstack is None else (pooled, deepstack)
    if hasattr(output, "to_tuple"):
        return output.to_tuple()[0]
    return output


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


def _owner_state(module):
    owner = module.__dict__.get("_vlmalign_balance_owner")
    return owner, (owner.__dict__.get(_STATE) if owner is not None else None)


def _decoder_pre_hook(module, args, kwargs):
    """Before the language model (where a forward with images has just run the vision tower and merged its
    features into the input embeddings): the dummy pass, its zero added to the input embeddings."""
    owner, state = _owner_state(module)
    if not state or not state["pending"]:
        return None
    state["pending"] = False
    embeds = kwargs.get("inputs_embeds")
    device = embeds.device if embeds is not None else next(owner.parameters()).device
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in state["dummy"].items()}
    features = _merged_features(owner.get_image_features(**inputs))
    zero = sum(t.float().sum() for t in _tensors(features) if t.is_floating_point()) * 0.0
    if embeds is None:
        return None
    kwargs["inputs_embeds"] = embeds + zero.to(embeds.dtype)
    return args, kwargs


def vision_kwargs(batch: dict, model: nn.Module) -> dict:
    """The entries of an encoded batch that `model.get_image_features` takes (its vision tensors)."""
    accepted = inspect.signature(model.get_image_features).parameters
    return {k: v for k, v in batch.items() if k in accepted and k not in ("input_ids", "attention_mask")}


def install(model: nn.Module, dummy_inputs: dict) -> bool:
    """Register the hooks on `model` (a transformers VLM with `get_image_features`); returns whether installed."""
    if _STATE in model.__dict__:
        return True
    if not hasattr(model, "get_image_features") or "pixel_values" not in dummy_inputs:
        return False
    decoder = model.get_decoder()
    if decoder is None or decoder is model:
        return False
    model.__dict__[_STATE] = {"dummy": {k: v.detach().cpu() for k, v in dummy_inputs.items()},
                              "pending": False, "suspended": False}
    decoder.__dict__["_vlmalign_balance_owner"] = model   # plain attribute: not a submodule
    model.register_forward_pre_hook(_outer_pre_hook, with_kwargs=True)
    decoder.register_forward_pre_hook(_decoder_pre_hook, with_kwargs=True, prepend=True)  # before engine hooks
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
