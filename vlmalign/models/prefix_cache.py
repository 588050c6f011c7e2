"""KV caches for the shared-prefix forwards that stay correct when a layer's forward is run twice.

Activation checkpointing (`gradient_checkpointing=True`) discards a layer's activations in the forward and runs the
layer again in the backward. A transformers `DynamicCache` appends on every `update`, so that replay would append
the same keys a second time, which is why transformers drops the cache of checkpointed layers (and why the
shared-prefix path used to switch itself off under gradient checkpointing). The two caches here make `update`
repeatable instead:

- `PromptCache` (prompt pass, B unique prompts): every `update` starts from an empty layer, so it returns the
  prompt's own keys/values whether it runs in the forward or in a replay; the layer is stored on the first call
  only (the forward's tensors, the ones the completion pass reads and sends gradients back into).
- `ExpandedPrefixCache` (completion pass, N completions): reads the prompt layers, rows `index` [N] (an index
  select inside the layer: replayed, it costs B x P keys per layer in memory instead of N x P), and returns
  [prompt rows, new keys] exactly as a `DynamicCache` holding the expanded prompt would, without storing anything.

`cache_through_checkpoints` lets checkpointed layers keep these caches (transformers' `_can_checkpoint_with_cache`
switch, meant for layers whose cache use can be replayed) and makes them checkpoint non-reentrantly for the duration
of the call: a reentrant checkpoint passes gradients only to the tensors given as arguments, and the completion
layers read the prompt keys/values through the cache, not as arguments. The two modes give the same values and
gradients; only which tensors are kept differs.
"""

from __future__ import annotations

import copy
import functools
from contextlib import contextmanager

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer

_MISSING = object()


class PromptCache(DynamicCache):
    """Cache of the prompt pass whose `update` can be replayed (see the module docstring)."""

    def __init__(self, config):
        super().__init__(config=config)
        self._empty = [copy.copy(layer) for layer in self.layers]
        self._stored: set[int] = set()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:            # a config without layer types: plain layers, made lazily
            self.layers.append(DynamicLayer())
        layer = copy.copy(self._empty[layer_idx]) if layer_idx < len(self._empty) else DynamicLayer()
        keys, values = layer.update(key_states, value_states, *args, **kwargs)
        if layer_idx not in self._stored:
            self.layers[layer_idx] = layer
            self._stored.add(layer_idx)
        return keys, values


class ExpandedPrefixCache(DynamicCache):
    """Cache of the completion pass: rows `index` [N] of a filled `PromptCache`, read-only (module docstring)."""

    def __init__(self, prompt_cache: PromptCache, index: torch.Tensor):
        super().__init__()
        self.layers = list(prompt_cache.layers)          # a snapshot: replays of the prompt pass cannot change it
        self.layer_class_to_replicate = None
        self.index = index

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = copy.copy(self.layers[layer_idx])
        if layer.is_initialized:
            layer.keys = layer.keys.index_select(0, self.index.to(layer.keys.device))
            layer.values = layer.values.index_select(0, self.index.to(layer.values.device))
        return layer.update(key_states, value_states, *args, **kwargs)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.index = self.index[indices.to(self.index.device)]


def checkpointed_layers(model: nn.Module) -> list[GradientCheckpointingLayer]:
    """The layers of `model` that activation checkpointing currently wraps."""
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]


def custom_checkpoint_function(model: nn.Module) -> str | None:
    """Name of a checkpoint function that `cache_through_checkpoints` cannot make non-reentrant (one that is not a
    `functools.partial` of a checkpoint function taking `use_reentrant`), None when there is none."""
    for layer in checkpointed_layers(model):
        func = getattr(layer, "_gradient_checkpointing_func", None)
        if not isinstance(func, functools.partial):
            return getattr(func, "__qualname__", repr(func))
    return None


@contextmanager
def cache_through_checkpoints(model: nn.Module):
    """Within the block, checkpointed layers keep their cache argument and checkpoint non-reentrantly (module
    docstring). Restores both settings afterwards; the replays in the backward use the functions bound at forward
    time, so they need nothing after the block."""
    changed = []
    for layer in checkpointed_layers(model):
        func = layer._gradient_checkpointing_func
        changed.append((layer, layer.__dict__.get("_can_checkpoint_with_cache", _MISSING), func))
        layer._can_checkpoint_with_cache = True
        if isinstance(func, functools.partial) and func.keywords.get("use_reentrant") is not False:
            layer._gradient_checkpointing_func = functools.partial(func.func, *func.args,
                                                                   **{**func.keywords, "use_reentrant": False})
    try:
        yield
    finally:
        for layer, flag, func in changed:
            if flag is _MISSING:
                del layer._can_checkpoint_with_cache
            else:
                layer._can_checkpoint_with_cache = flag
            layer._gradient_checkpointing_func = func
