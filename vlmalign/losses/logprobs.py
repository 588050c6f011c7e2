"""Memory-light per-token log-probabilities (and entropies).

The [batch, length, vocab] logits tensor is never built: callers pick the hidden states of the positions
that are scored (``gather_completion_positions``), and logits are computed for those rows only, a chunk of
rows at a time, under activation checkpointing so that backward keeps no chunk logits alive either.

Convention: ``hidden[n]`` is the hidden state that *predicts* ``targets[n]`` (for a causal LM the state at
position ``t`` predicts token ``t + 1``; shift before gathering).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

#: The label of a position that is not scored (transformers' and PyTorch's cross-entropy convention).
IGNORE_INDEX = -100

__all__ = [
    "IGNORE_INDEX",
    "gather_completion_positions",
    "scatter_completion_values",
    "selective_log_softmax",
    "token_logprobs_from_hidden",
]


def selective_log_softmax(
    logits: Tensor,  # [N, V] (or [..., V])
    targets: Tensor,  # [N] (or [...]) integer token ids
    *,
    chunk_size: int = 1024,
) -> Tensor:  # [N] (or [...]) float32
    """``log_softmax(logits)[n, targets[n]]`` computed as ``logit[target] - logsumexp(logits)`` in float32
    (after a per-row max shift, for precision), ``chunk_size`` rows at a time: at most one ``[chunk_size, V]``
    float32 temporary exists. Differentiable; with gradients each chunk is checkpointed, so backward keeps
    no temporaries beyond the caller's ``logits``.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])  # [N, V]
    flat_targets = targets.reshape(-1)  # [N]
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    pieces = []
    for start in range(0, flat_logits.shape[0], chunk_size):
        rows = flat_logits[start : start + chunk_size]  # [n, V]
        tgt = flat_targets[start : start + chunk_size]  # [n]
        if needs_grad:
            pieces.append(checkpoint(_target_logprobs, rows, tgt, use_reentrant=False))
        else:
            pieces.append(_target_logprobs(rows, tgt))
    if not pieces:
        return flat_logits.new_zeros(targets.shape, dtype=torch.float32)
    return torch.cat(pieces).reshape(targets.shape)


def _target_logprobs(logits: Tensor, targets: Tensor) -> Tensor:  # [n, V], [n] -> [n] float32
    rows = _shift_by_max(logits.float())  # [n, V]
    picked = rows.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [n]
    return picked - torch.logsumexp(rows, dim=-1)


def _shift_by_max(logits: Tensor) -> Tensor:  # [n, V] -> [n, V]
    """``logits - max(logits)`` per row. Softmax quantities are shift-invariant, and the shift keeps
    ``logit[target] - logsumexp`` precise in float32 when logits are large (no cancellation of two ~1e3
    numbers). The max is detached: the result's gradient is unchanged because of the invariance."""
    return logits - logits.detach().amax(dim=-1, keepdim=True)


def _logprobs_and_entropy(logits: Tensor, targets: Tensor, with_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """From float32 logits ``[n, V]``: ``(logp [n], entropy [n] or None)``."""
    logits = _shift_by_max(logits)
    log_z = torch.logsumexp(logits, dim=-1)  # [n]
    logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_z  # [n]
    if not with_entropy:
        return logps, None
    probs = torch.softmax(logits, dim=-1)  # [n, V]
    entropy = log_z - (probs * logits).sum(dim=-1)  # H = log Z - E_p[logit]
    return logps, entropy


def _make_head(lm_head: nn.Module | Tensor, bias: Tensor | None) -> tuple[Callable[..., Tensor], tuple]:
    """Return ``(project(hidden, *params), params)`` so the params are explicit checkpoint inputs."""
    if isinstance(lm_head, Tensor):  # weight [V, H]
        params = (lm_head,) if bias is None else (lm_head, bias)
        return (lambda h, *p: F.linear(h, *p)), params
    if bias is not None:
        raise ValueError("`bias` is only used with a weight tensor; a module carries its own bias")
    return (lambda h: lm_head(h)), ()


def token_logprobs_from_hidden(
    hidden: Tensor,  # [N, H] hidden states at the scored positions
    lm_head: nn.Module | Tensor,  # module (e.g. nn.Linear) or weight [V, H]
    targets: Tensor,  # [N] token ids
    *,
    bias: Tensor | None = None,  # [V], only with a weight tensor
    chunk_size: int = 1024,
    temperature: float = 1.0,
    with_entropy: bool = False,
    with_hits: bool = False,
    softcap: float | None = None,  # final-logit soft-capping (Gemma 2 / Gemma 4): cap * tanh(logits / cap)
) -> tuple[Tensor, ...]:  # ([N] float32, [N] float32 or None[, [N] bool])
    """Per-token ``log p(target)`` (and the entropy of the full next-token distribution) from hidden
    states, projecting ``chunk_size`` rows at a time through the LM head: logits are
    ``lm_head(hidden) / temperature`` (projected in the head's dtype, then cast to float32; soft-capped first when
    ``softcap`` is given, as the model's own forward does), computed only at the given positions. The entropy is
    that of the tempered distribution, and differentiable.

    When gradients are needed, each chunk runs under ``torch.utils.checkpoint`` (non-reentrant): forward
    keeps only the chunk's inputs and its ``[n]`` outputs, and backward recomputes one chunk's logits at a
    time. Peak extra memory is one ``[chunk_size, V]`` block instead of ``[N, V]``. Gradients flow to
    ``hidden`` and to the head parameters exactly as in the naive computation.

    ``with_hits``: a third result, [N] bool, whether the target is the most likely token (token accuracy), taken
    from the same chunk logits (no second pass through the head).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    project, params = _make_head(lm_head, bias)
    head_params = params if params else tuple(lm_head.parameters())
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head_params))

    def chunk_fn(h: Tensor, tgt: Tensor, *p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits = project(h, *p).float()  # [n, V]
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        hits = (logits.argmax(dim=-1) == tgt) if with_hits else tgt.new_empty(0, dtype=torch.bool)
        if temperature != 1.0:
            logits = logits / temperature
        logps, entropy = _logprobs_and_entropy(logits, tgt, with_entropy)
        return logps, (entropy if entropy is not None else logps.new_empty(0)), hits

    logps_parts, entropy_parts, hit_parts = [], [], []
    for start in range(0, hidden.shape[0], chunk_size):
        h = hidden[start : start + chunk_size]  # [n, H]
        tgt = targets[start : start + chunk_size]  # [n]
        if needs_grad:
            logps, entropy, hits = checkpoint(chunk_fn, h, tgt, *params, use_reentrant=False)
        else:
            logps, entropy, hits = chunk_fn(h, tgt, *params)
        logps_parts.append(logps)
        entropy_parts.append(entropy)
        hit_parts.append(hits)

    if not logps_parts:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        out = (empty, (empty if with_entropy else None))
        return out + (targets.new_zeros(0, dtype=torch.bool),) if with_hits else out
    out = (torch.cat(logps_parts), (torch.cat(entropy_parts) if with_entropy else None))
    return out + (torch.cat(hit_parts),) if with_hits else out


def gather_completion_positions(
    hidden: Tensor,  # [B, T, H]
    mask: Tensor,  # [B, T] 1 = scored position
) -> Tensor:  # [N, H], N = mask.sum(), row-major order
    """Hidden states at the scored positions, flattened in row-major order (differentiable)."""
    return hidden[mask.bool()]


def scatter_completion_values(
    values: Tensor,  # [N] per scored position, as produced from gather_completion_positions
    mask: Tensor,  # [B, T]
    fill: float = 0.0,
) -> Tensor:  # [B, T]
    """Inverse of :func:`gather_completion_positions` for per-token values: a padded ``[B, T]`` tensor
    holding ``values`` at the masked positions and ``fill`` elsewhere (differentiable w.r.t. ``values``)."""
    out = values.new_full(mask.shape, fill)
    return out.masked_scatter(mask.bool(), values)
