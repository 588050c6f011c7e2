"""Padding-free packing: the rows of a padded batch run as one sequence [1, L], L = their real tokens.

`pack_rows` takes a padded model batch (a collator's output: ids, attention mask, labels, token types, vision
tensors; either padding side) and returns its packed form:

* every [B, T] tensor (ids, labels, token types) keeps only the real tokens, row after row: [1, L];
* positions restart at 0 in each row. Qwen's 3-D rotary positions (`Family.mrope`) are the model's own
  `get_rope_index` over the padded batch (so per row, images included), gathered at the real tokens, with the
  per-row text positions in front ([4, 1, L], the layout transformers' Qwen models read as "packed");
* images are never split: rows stay whole and in order, so the vision tensors keep their order ("per_image" and
  "per_patch" layouts unchanged; "per_row" [B, images, ...] becomes [1, B * images, ...], padding images included,
  which the model drops as it does in a padded batch);
* `cu_seq_lens_q/k` and `max_length_q/k` (transformers' names, read by flash-attention varlen kernels where
  installed) give the row boundaries.

Attention stays inside each row: `packed_attention(model)` switches the language model to the attention function
registered here, which runs SDPA row by row on the [1, L] tensors (causal inside the row; no L x L mask is built,
so the attention costs sum(len_i^2) like a padded batch without its padding). Families whose attention inside a row
is more than causal (Gemma3's bidirectional image blocks) or that carry a recurrent state along the sequence
(Qwen3.5's linear-attention layers) are not packed (`Family.packing` False, `Family.packing_refusal` says why):
`packing_unsupported` says why, and the callers run the padded batch.

Log-probs of the packed batch equal the padded batch's (tests/test_packing.py): a row's first token is never scored
(the previous position belongs to another row). SFT packs its rows; DPO / MPO pack the chosen and rejected
sequences (`packed_sequence_logps`: per-sequence sums, each sequence with its own prompt copy).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface

from ..losses.logprobs import IGNORE_INDEX
from .families import get_family
from .forward import rope_index_fn, unwrap_model

PACKED_ATTENTION = "vlmalign_packed_sdpa"
_VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def rowwise_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, **kwargs):
    """SDPA over each row of a packed sequence (`cu_seq_lens_q` [R + 1]); query [1, heads, L, d] -> [1, L, heads, d].
    Without row boundaries: plain SDPA."""
    bounds = kwargs.pop("cu_seq_lens_q", None)
    for name in _VARLEN_KEYS:
        kwargs.pop(name, None)
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    bounds = bounds.tolist()
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    # split, not slices: the backward is one concatenation, not a zero-filled full-length gradient per row
    outputs = []
    for start, q, k, v in zip(bounds, query.split(lengths, dim=2), key.split(lengths, dim=2),
                              value.split(lengths, dim=2)):
        mask = attention_mask[..., start:start + q.shape[2], start:start + q.shape[2]] \
            if attention_mask is not None else None
        out, _ = sdpa_attention_forward(module, q, k, v, mask, **kwargs)
        outputs.append(out)
    return torch.cat(outputs, dim=1), None


AttentionInterface.register(PACKED_ATTENTION, rowwise_sdpa)           # no mask function registered: none is built


def packing_unsupported(model: nn.Module) -> str | None:
    """Why the rows of a batch cannot be packed for this model (None when they can)."""
    family = get_family(unwrap_model(model))
    if not family.packing:
        return f"family {family.name} {family.packing_refusal} (not packed)"
    return None


@contextmanager
def packed_attention(model: nn.Module):
    """Within the block the language model attends row by row (module docstring); the vision tower is untouched."""
    base = unwrap_model(model)
    config = base.config.get_text_config()
    previous = config._attn_implementation
    if previous not in (None, "sdpa", "eager"):              # e.g. flash_attention_2: varlen by itself
        yield
        return
    config._attn_implementation = PACKED_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous


def pack_rows(model: nn.Module, batch: dict) -> dict:
    """The packed form [1, L] of a padded batch [B, T] (module docstring). Raises on a batch key whose layout is
    unknown (so nothing is dropped silently)."""
    base = unwrap_model(model)
    family = get_family(base)
    reason = packing_unsupported(base)
    if reason is not None:
        raise ValueError(reason)
    ids, real = batch["input_ids"], batch["attention_mask"].bool()
    rows, length = ids.shape
    lengths = real.sum(dim=1)
    if (lengths == 0).any():
        raise ValueError(f"row {int((lengths == 0).nonzero()[0])} has no token (attention_mask all 0)")
    bounds = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)   # [B + 1]
    total = int(bounds[-1])
    row_of = torch.repeat_interleave(torch.arange(rows, device=ids.device), lengths)
    text_positions = (torch.arange(total, device=ids.device) - bounds.to(ids.device)[row_of].long()).unsqueeze(0)
    out = {}
    for key, value in batch.items():
        if key == "attention_mask":
            continue
        if not torch.is_tensor(value):
            out[key] = value
        elif value.dim() >= 2 and value.shape[:2] == (rows, length):          # ids, labels, token types
            out[key] = value[real].unsqueeze(0)
        elif family.vision_batch_layout == "per_row":
            out[key] = value.reshape(1, rows * value.shape[1], *value.shape[2:])
        elif family.vision_batch_layout in ("per_image", "per_patch", "per_tile"):
            out[key] = value                                                  # images in row order already
        else:
            raise ValueError(f"{family.name}: don't know how to pack batch key {key!r} {tuple(value.shape)}")
    if family.mrope:
        if batch.get("image_grid_thw") is None and batch.get("video_grid_thw") is None:
            spatial = text_positions.unsqueeze(0).expand(3, -1, -1)
        else:
            extra = {k: batch[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
                     if batch.get(k) is not None}
            positions, _ = rope_index_fn(model)(ids, mm_token_type_ids=batch[family.token_type_key],
                                                 attention_mask=batch["attention_mask"], **extra)  # [3, B, T]
            spatial = positions[:, real].unsqueeze(1)                          # [3, 1, L]
        out["position_ids"] = torch.cat([text_positions.unsqueeze(0), spatial.to(text_positions.device)], dim=0)
    else:
        out["position_ids"] = text_positions
    out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = bounds.to(ids.device)
    out["max_length_q"] = out["max_length_k"] = int(lengths.max())
    return out


def packed_score_mask(packed: dict) -> torch.Tensor:
    """[1, L] scored target positions of a packed batch: labels != -100, never a row's first token."""
    mask = packed["labels"] != IGNORE_INDEX
    mask[0, packed["cu_seq_lens_q"][:-1].long()] = False
    return mask


def packed_sequence_logps(model: nn.Module, batch: dict, *, chunk_size: int = 1024
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sums of the labelled tokens' log-probs [B] and their counts [B] of a padded batch with `labels`,
    computed on its packed form (`pack_rows`: every row, e.g. DPO's chosen and rejected sequences, one after the
    other without padding, each with its own positions and images). Equal to the padded batch's sums."""
    from .forward import token_logps

    packed = pack_rows(model, batch)
    mask = packed_score_mask(packed)
    with packed_attention(model):
        logps, _, _ = token_logps(model, packed, mask, chunk_size=chunk_size)     # [1, L]
    bounds = packed["cu_seq_lens_q"].long()
    rows = len(bounds) - 1
    row_of = torch.repeat_interleave(torch.arange(rows, device=logps.device), (bounds[1:] - bounds[:-1]).to(logps.device))
    sums = logps.new_zeros(rows).index_add(0, row_of, logps[0])
    counts = torch.zeros(rows, dtype=torch.long, device=logps.device).index_add(0, row_of, mask[0].long().to(logps.device))
    return sums, counts
