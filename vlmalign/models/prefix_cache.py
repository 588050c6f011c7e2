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

Linear-attention layers (Qwen3.5's gated DeltaNet) carry no keys/values but two states: the last
`conv_kernel_size` inputs of their causal convolution and the recurrent state at the end of the prompt. The two
caches treat them like keys/values: `PromptCache` hands every prompt layer an empty state (so a replay recomputes the
same one) and keeps the first forward's states, as differentiable tensors (no in-place copy into a buffer);
`ExpandedPrefixCache` gives the completion layers those states at rows `index` (the convolution's left context
concatenated in front of the completion inputs, the recurrent state as the initial state) and stores nothing.

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
        self.conv_states: dict[int, torch.Tensor] = {}       # linear-attention layers: [B, channels, kernel]
        self.recurrent_states: dict[int, torch.Tensor] = {}  # [B, heads, key dim, value dim]

    # Linear-attention states: every prompt layer starts from none (replays too); the first forward's are kept.
    def get_conv_state(self, layer_idx: int, state_idx: int = 0):
        return None

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0):
        return None

    def update_conv_state(self, conv_states: torch.Tensor, layer_idx: int, state_idx: int = 0,
                          conv_kernel_size: int | None = None, **kwargs) -> torch.Tensor:
        if layer_idx not in self.conv_states:
            kernel = conv_kernel_size or conv_states.shape[-1]
            tail = conv_states[..., -kernel:]
            self.conv_states[layer_idx] = torch.nn.functional.pad(tail, (kernel - tail.shape[-1], 0))
        return conv_states

    def update_recurrent_state(self, recurrent_states: torch.Tensor, layer_idx: int, state_idx: int = 0,
                               **kwargs) -> torch.Tensor:
        self.recurrent_states.setdefault(layer_idx, recurrent_states)
        return recurrent_states

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
        self.conv_states = dict(prompt_cache.conv_states)
        self.recurrent_states = dict(prompt_cache.recurrent_states)

    def _rows(self, state: torch.Tensor | None) -> torch.Tensor | None:
        return None if state is None else state.index_select(0, self.index.to(state.device))

    # Linear-attention states of the prompt at rows `index`; nothing is stored.
    def get_conv_state(self, layer_idx: int, state_idx: int = 0):
        return self._rows(self.conv_states.get(layer_idx))

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0):
        return self._rows(self.recurrent_states.get(layer_idx))

    def update_conv_state(self, conv_states: torch.Tensor, layer_idx: int, state_idx: int = 0, **kwargs) -> torch.Tensor:
        prompt = self.get_conv_state(layer_idx)
        return conv_states if prompt is None else torch.cat([prompt.to(conv_states.dtype), conv_states], dim=-1)

    def update_recurrent_state(self, recurrent_states: torch.Tensor, layer_idx: int, state_idx: int = 0,
                               **kwargs) -> torch.Tensor:
        return recurrent_states

    def is_recording_past(self, layer_idx: int) -> bool:
        # makes a one-token completion pass take the convolution over [prompt state, input] (as longer ones do)
        # rather than the in-place single-step update of the prompt's state
        return True

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
