"""Model forwards that never build a [batch, length, vocab] logits tensor.

`completion_logps` runs the wrapped model (DDP / FSDP / PEFT wrappers keep working: their forward is the one
called) with the LM head bypassed, so the forward returns hidden states, then projects only the scored positions
through the LM head in chunks (`vlmalign.losses.logprobs`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..losses.logprobs import token_logprobs_from_hidden
from .moe import model_router_loss_off, route_weights


def strip_engine_wrappers(model: nn.Module) -> nn.Module:
    """The module under DDP / FSDP / DeepSpeed `.module` wrappers (a PeftModel stays a PeftModel)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model under DDP/FSDP (`.module`) and PEFT (`.get_base_model()`) wrappers."""
    model = strip_engine_wrappers(model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def logit_softcap(model: nn.Module) -> float | None:
    """The model's final-logit soft-capping (``cap * tanh(logits / cap)``; Gemma 4), read from its text config:
    None when the forward applies none."""
    return getattr(unwrap_model(model).config.get_text_config(), "final_logit_softcapping", None)


@contextmanager
def lm_head_bypassed(model: nn.Module):
    """Within the block, the model's LM head returns its input: `outputs.logits` are the final hidden states.
    Yields the real head (to project chosen positions afterwards).

    The bypass adds `0 * weight[0, 0]` to its output, so the head's weight stays in the forward's autograd graph:
    DDP with `find_unused_parameters=True` (needed when a batch has no image and the vision tower gets no
    gradient) would otherwise mark the head unused, then fail when its gradient arrives ("marked ready twice")."""
    base = unwrap_model(model)
    head = base.get_output_embeddings()
    original = head.forward
    head.forward = lambda hidden: hidden + head.weight[0, 0] * 0.0
    # The model's final-logit soft-capping (Gemma 4) would squash the hidden states: off inside the block, applied
    # by the projection instead (`token_logprobs_from_hidden(softcap=...)`).
    text = base.config.get_text_config()
    cap = logit_softcap(base)
    if cap is not None:
        text.final_logit_softcapping = None
    try:
        yield head
    finally:
        head.forward = original
        if cap is not None:
            text.final_logit_softcapping = cap


def projection_head(head: nn.Module) -> tuple[nn.Module | torch.Tensor, torch.Tensor | None]:
    """What the chunked projection (`token_logprobs_from_hidden`) should use for `head`: the module itself, or,
    for a frozen head whose parameters ZeRO-3 partitions (LoRA), a gathered copy of its weight and bias. The
    projection recomputes each chunk in backward (activation checkpointing); by then ZeRO-3 has released the
    partition of a frozen module, so the recomputation would see an empty weight."""
    params = list(head.parameters())
    if not any(hasattr(p, "ds_id") for p in params) or any(p.requires_grad for p in params):
        return head, None
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        weight = head.weight.detach().clone()
        bias = head.bias.detach().clone() if getattr(head, "bias", None) is not None else None
    return weight, bias


def _model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def hidden_states(model: nn.Module, batch: dict, *, keep_last: int = 0):
    """Final hidden states [B, T, H] (or the last `keep_last` positions) and the LM head module (the model's
    soft-capping, if any, is left to the caller: `logit_softcap(model)`)."""
    mask = batch.get("attention_mask")  # router rows of an MoE aux-loss capture: the real tokens (packed: all)
    with lm_head_bypassed(model) as head, model_router_loss_off(model), route_weights(mask):
        out = model(**_model_inputs(batch), use_cache=False, logits_to_keep=keep_last)
    return out.logits, head


def token_logps(
    model: nn.Module,
    batch: dict,
    mask: torch.Tensor,           # [B, T] 1 where the *target* token at position t is scored
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int = 1024,
    keep_last: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per-token log p(input_ids[t] | < t) at the masked positions, as [B, T'] tensors (0 elsewhere), where
    T' = T (or `keep_last` when given: then `mask` covers only the last `keep_last` positions).

    Returns (logps [B, T'], entropy [B, T'] or None, argmax-hit [B, T'] bool: the greedy prediction was right)."""
    hidden, head = hidden_states(model, batch, keep_last=keep_last + 1 if keep_last else 0)
    ids = batch["input_ids"][:, -keep_last:] if keep_last else batch["input_ids"]
    # position t-1 predicts token t
    if keep_last:
        hidden = hidden[:, :-1]                    # [B, keep_last, H] predicting ids[:, -keep_last:]
    else:
        hidden = torch.cat([hidden[:, :1] * 0, hidden[:, :-1]], dim=1)  # [B, T, H]; position 0 is never scored
    mask = mask.bool()
    mask_flat_hidden = hidden[mask]                # [N, H]
    targets = ids[mask]                            # [N]
    projection, bias = projection_head(head)
    logps, entropy, hits = token_logprobs_from_hidden(
        mask_flat_hidden, projection, targets, bias=bias, chunk_size=chunk_size, temperature=temperature,
        with_entropy=with_entropy, with_hits=True, softcap=logit_softcap(model),
    )
    full = lambda values, fill=0.0: values.new_full(mask.shape, fill).masked_scatter(mask, values)  # noqa: E731
    return full(logps), (full(entropy) if entropy is not None else None), full(hits, False)


def rope_index_fn(model):
    """The model's `get_rope_index` (Qwen's 3-D rotary positions), on the model or its inner `.model`."""
    base = unwrap_model(model)
    for module in (base, getattr(base, "model", None)):
        if module is not None and hasattr(module, "get_rope_index"):
            return module.get_rope_index
    raise AttributeError(f"{type(base).__name__} has no get_rope_index (needed for 3-D rotary positions)")
