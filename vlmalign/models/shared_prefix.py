"""Shared-prefix forwards: a group's prompt (and its image) runs once, not once per completion.

In GRPO the G completions of a prompt share its image and text; DPO's chosen and rejected answers share theirs
(G = 2). The plain path (`vlmalign.models.forward.token_logps` over `append_completions(prompts repeated G times,
...)`) runs the vision tower and all P prompt tokens G times: G * (P + C) token-forwards per group. Here a group
costs P + G * C:

1. prompt pass: the B unique prompts [B, P] with their vision tensors and a cache, WITH gradients. It gives
   the KV cache of every layer (for linear-attention layers, Qwen3.5's gated DeltaNet: the conv and recurrent
   states at the prompt's end) and the final hidden state of the last prompt token (which predicts the first
   completion token);
2. the cache is expanded to the N = B * G completions along the batch (`ExpandedPrefixCache`: an indexing,
   differentiable, so each completion's gradient flows back into the shared prompt keys/values, the prompt tokens
   and the vision tower, summed over the group exactly as in the plain path);
3. completion pass: the completions [N, C - 1] (the last token's output predicts nothing) with the expanded cache
   and the attention mask [prompt mask, completion mask].

Positions continue exactly as in the plain path: 1-D rope models number the padded sequence 0..P+C-1 in a plain
forward, which is what they do by themselves with a cache of length P. Qwen's 3-D positions (`Family.mrope`) come
from the model's `get_rope_index` over the prompt, and the completions continue each row's text positions (what
`get_rope_index` gives over the concatenated sequence); both passes get them explicitly, because a cached Qwen
forward otherwise reads a `rope_deltas` stashed by an earlier call. Gemma3's token-type ids (bidirectional
attention inside an image) only concern the prompt pass; the completion pass is causal text.

Approach chosen over (b), one packed row [prompt, c_1 .. c_G] per prompt with a block attention mask and restarted
positions, by measurement (`benchmarks/bench_shared_prefix.py`: small Qwen2-VL, B=2, 256 image tokens, G=8, C=64,
CPU): forward+backward 4.3x less CPU time than the plain path here vs 4.0x for the packed row (peak memory 3.6x vs
4.4x less), and simpler: with dense (SDPA / eager) attention the packed row pays (P + G*C)^2 attention scores per
group against G*C*(P + C) here, and it needs a 4-D mask per family (Gemma3's bidirectional image blocks, sliding
windows) and restarted 3-D positions, while the cache path uses each model's own masks and caches unchanged.

Gradient checkpointing: the two passes pass their own caches (`vlmalign.models.prefix_cache`: `PromptCache`, then
`ExpandedPrefixCache`, whose `update` can be replayed) and run inside `cache_through_checkpoints`, so every layer
of both passes stays checkpointed (replayed in the backward) while the completion layers read the prompt's
keys/values; the prompt keys/values of the B unique prompts are the only extra activations kept per layer.
Reentrant checkpointing is switched to non-reentrant for these calls (same values and gradients).

Where the path cannot be used (the family's `shared_prefix` is False, or checkpointing runs through a custom
function whose reentrancy cannot be set) `shared_prefix_logps` falls back to the plain path on a repeated prompt
batch and logs the reason once.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.cache_utils import LinearAttentionCacheLayerMixin

from ..losses.logprobs import token_logprobs_from_hidden
from .families import Family, get_family
from .moe import model_router_loss_off, route_weights
from .forward import lm_head_bypassed, logit_softcap, projection_head, rope_index_fn, token_logps, unwrap_model
from .prefix_cache import ExpandedPrefixCache, PromptCache, cache_through_checkpoints, custom_checkpoint_function

logger = logging.getLogger(__name__)

_LOGGED: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.info(message)


# ------------------------------------------------------------------------------------------- prompt-row selection


def images_per_row(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Number of images in each row [B]: runs of consecutive image placeholders (each image is one run; the
    processors put a start/end marker or a separator between two images)."""
    is_image = input_ids == image_token_id                                    # [B, T]
    previous = torch.nn.functional.pad(is_image, (1, 0), value=False)[:, :-1]
    return (is_image & ~previous).sum(dim=1)


def _tiles_per_row(batch: dict, image_token_id: int) -> torch.Tensor:
    """[B] vision tiles of each row ("per_tile" layout: `pixel_values` [tiles, C, H, W]): every tile gives the same
    number of image tokens, so a row's tiles are its image tokens * tiles / all image tokens."""
    tokens = (batch["input_ids"] == image_token_id).sum(dim=1)               # [B]
    pixels = batch.get("pixel_values")
    total = int(tokens.sum())
    if pixels is None or total == 0:
        return torch.zeros_like(tokens)
    return tokens * pixels.shape[0] // total


def select_prompt_rows(batch: dict, index: torch.Tensor, family: Family, image_token_id: int) -> dict:
    """The processor batch made of rows `index` [N] of `batch` (rows may repeat: `arange(B).repeat_interleave(G)`
    is the plain path's prompts repeated G times), vision tensors included, laid out as the family's processor
    lays them out (`Family.vision_batch_layout`). Equal to running the processor on the selected rows (the padded
    length stays the batch's)."""
    ids = batch["input_ids"]
    rows, length = ids.shape
    index = index.to(ids.device)
    layout = family.vision_batch_layout
    out = {}
    if layout in ("per_image", "per_patch", "per_tile"):
        # [B] images (InternVL: tiles) of each row; a row's tiles are its image tokens / tokens per tile
        if layout == "per_tile":
            counts = _tiles_per_row(batch, image_token_id)
        elif batch.get("batch_num_images") is not None:  # OneVision: [rows with images] (adjacent images merge)
            counts = torch.zeros(rows, dtype=torch.long, device=ids.device)
            counts[(ids == image_token_id).any(dim=1)] = batch["batch_num_images"].to(ids.device).long()
        else:
            counts = images_per_row(ids, image_token_id)
        first = torch.cumsum(counts, 0) - counts                              # [B] index of each row's first image
        images = torch.cat([torch.arange(int(first[r]), int(first[r] + counts[r])) for r in index.tolist()]
                           + [torch.zeros(0, dtype=torch.long)]).to(ids.device)  # selected image indices, in order
    for key, value in batch.items():
        if not torch.is_tensor(value):
            out[key] = value
        elif value.dim() >= 2 and value.shape[:2] == (rows, length):          # ids, masks, token types, labels
            out[key] = value.index_select(0, index)
        elif key == "batch_num_images":                                       # OneVision: rows with images only
            selected = counts[index]
            out[key] = selected[selected > 0].to(value.device, value.dtype)
        elif layout == "per_row":
            out[key] = value.index_select(0, index.to(value.device))
        elif layout in ("per_image", "per_tile") or key == "image_grid_thw":
            out[key] = value.index_select(0, images.to(value.device))
        elif layout == "per_patch" and key == "pixel_values":
            grid = batch["image_grid_thw"]
            patches = grid.prod(dim=-1)                                       # [images]
            starts = torch.cumsum(patches, 0) - patches
            rows_of = [torch.arange(int(starts[i]), int(starts[i] + patches[i])) for i in images.tolist()]
            out[key] = value.index_select(0, torch.cat(rows_of + [torch.zeros(0, dtype=torch.long)]).to(value.device))
        else:
            raise ValueError(f"{family.name}: don't know how to select rows of batch key {key!r} {tuple(value.shape)}")
    return out


def group_index(num_prompts: int, num_generations: int, device=None) -> torch.Tensor:
    """[B * G]: completion i belongs to prompt i // G (the G completions of a prompt are contiguous)."""
    return torch.arange(num_prompts, device=device).repeat_interleave(num_generations)


def plain_batch(prompt_batch: dict, completion_ids: torch.Tensor, completion_mask: torch.Tensor, index: torch.Tensor,
                family: Family, image_token_id: int) -> dict:
    """The plain path's forward batch [N, P + C]: the prompts of `index` [N] (vision tensors repeated) followed by
    the completions, token-type ids rebuilt over the whole row (as `append_completions`)."""
    batch = select_prompt_rows(prompt_batch, index, family, image_token_id)
    batch.pop("labels", None)
    batch["input_ids"] = torch.cat([batch["input_ids"], completion_ids], dim=1)
    mask = batch["attention_mask"]
    batch["attention_mask"] = torch.cat([mask, completion_mask.to(mask.dtype)], dim=1)
    if family.token_type_key is not None:
        batch[family.token_type_key] = family.token_type_ids(batch["input_ids"], image_token_id)
    return batch


# ------------------------------------------------------------------------------------------------------ positions


def mrope_positions(model: nn.Module, family: Family, prompt_batch: dict, completion_mask: torch.Tensor,
                    index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D rotary positions of the plain path, split: prompt positions [3, B, P] and completion positions
    [3, N, C'] (completions of prompt `index[i]`, mask [N, C']).

    A plain forward computes `get_rope_index` over [prompt, completion] (padding at 0). Completion tokens are text,
    so they continue the prompt's text positions: token j (of the valid ones) sits at n_prompt + j + delta, where
    delta (`rope_deltas`) = max prompt position + 1 - n_prompt. Without images the model uses 0..T-1 for the padded
    row (its own default), which is what is returned then."""
    ids, mask = prompt_batch["input_ids"], prompt_batch["attention_mask"]
    rows, length = ids.shape
    width = completion_mask.shape[1]
    if prompt_batch.get("image_grid_thw") is None and prompt_batch.get("video_grid_thw") is None:
        prompt = torch.arange(length, device=ids.device).view(1, 1, -1).expand(3, rows, -1)
        completion = torch.arange(length, length + width, device=ids.device).view(1, 1, -1)
        return prompt, completion.expand(3, index.numel(), -1)
    extra = {k: prompt_batch[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
             if prompt_batch.get(k) is not None}
    prompt, deltas = rope_index_fn(model)(ids, mm_token_type_ids=prompt_batch[family.token_type_key],
                                           attention_mask=mask, **extra)          # [3, B, P], [B, 1]
    n_prompt = mask.sum(dim=1, keepdim=True)                                       # [B, 1]
    cmask = completion_mask.long()
    completion = (n_prompt[index] + deltas.to(ids.device)[index] + cmask.cumsum(dim=1) - 1) * cmask  # [N, C']
    return prompt, completion.unsqueeze(0).expand(3, -1, -1)


# ------------------------------------------------------------------------------------------------------ log-probs


def shared_prefix_unsupported(model: nn.Module) -> str | None:
    """Why the shared-prefix path cannot run on this model now (None when it can)."""
    base = unwrap_model(model)
    custom = custom_checkpoint_function(base)
    if custom is not None and base.training and torch.is_grad_enabled():
        return f"gradient checkpointing runs through a custom function ({custom}) that may be reentrant"
    return None


def shared_prefix_logps(
    model: nn.Module,
    prompt_batch: dict[str, torch.Tensor],   # B unique prompts [B, P], left-padded, with vision tensors
    completion_ids: torch.Tensor,            # [B * G, C] right-padded, rows k*G .. k*G+G-1 complete prompt k
    completion_mask: torch.Tensor,           # [B * G, C] 1 on scored completion tokens
    num_generations: int | None = None,
    *,
    prompt_index: torch.Tensor | None = None,  # [N] instead of num_generations: completion i completes prompt i
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs [B*G, C] of the completions (0 where `completion_mask` is 0) and, with `with_entropy`,
    the entropies [B*G, C]; the prompts are run once per group. Values and gradients equal the plain path's
    (`token_logps(model, append_completions(prompts repeated G times, ...), completion_mask, keep_last=C)`).

    Groups of unequal sizes (e.g. a micro-batch holding part of a group): pass `prompt_index` [N] (long, values in
    0..B-1, completion i continues prompt `prompt_index[i]`) instead of `num_generations`.

    The model may be wrapped (DDP / PEFT): its own forward is called, twice (prompt pass, completion pass)."""
    ids = prompt_batch["input_ids"]
    rows, length = ids.shape
    n, width = completion_ids.shape
    if prompt_index is None:
        if num_generations is None:
            raise ValueError("give num_generations or prompt_index")
        if n != rows * num_generations:
            raise ValueError(f"{n} completions for {rows} prompts x {num_generations} generations")
        index = group_index(rows, num_generations, ids.device)
    else:
        index = torch.as_tensor(prompt_index, dtype=torch.long, device=ids.device)
        if index.shape != (n,) or (n and (int(index.min()) < 0 or int(index.max()) >= rows)):
            raise ValueError(f"prompt_index must be [{n}] with values in 0..{rows - 1}, got {tuple(index.shape)}")
    base = unwrap_model(model)
    family = get_family(base)
    reason = shared_prefix_unsupported(model)
    if reason is not None:
        _log_once(f"shared-prefix forward unavailable ({reason}); repeating the prompt instead")
        batch = plain_batch(prompt_batch, completion_ids, completion_mask, index, family, family.image_token_id(base))
        logps, entropy, _ = token_logps(model, batch, completion_mask, keep_last=width, temperature=temperature,
                                        with_entropy=with_entropy, chunk_size=chunk_size)
        return logps, entropy

    prompt_inputs = {k: v for k, v in prompt_batch.items() if k != "labels"}
    completion_inputs = {}
    if family.mrope:
        prompt_inputs["position_ids"], completion_inputs["position_ids"] = mrope_positions(
            model, family, prompt_batch, completion_mask[:, :-1], index)
    # MoE aux-loss capture (models/moe.py): a prompt row counts once per completion that shares it
    shares = torch.bincount(index, minlength=rows).to(prompt_batch["attention_mask"].dtype)
    with lm_head_bypassed(model) as head, cache_through_checkpoints(base), model_router_loss_off(model):
        prompt_cache = PromptCache(base.config)
        with route_weights(prompt_batch["attention_mask"] * shares[:, None]):
            out = model(**prompt_inputs, past_key_values=prompt_cache, use_cache=False, logits_to_keep=1)
        hidden = out.logits[index]                                   # [N, 1, H] last prompt token: predicts token 0
        if width > 1:
            if prompt_cache.get_seq_length() != length:
                raise RuntimeError(f"{type(base).__name__} filled no usable KV cache in the prompt pass")
            cache = ExpandedPrefixCache(prompt_cache, index)         # [B, ...] read as [N, ...], differentiable
            mask = prompt_batch["attention_mask"]
            attention_mask = torch.cat([mask[index], completion_mask[:, :-1].to(mask.dtype)], dim=1)  # [N, P + C - 1]
            with route_weights(completion_mask[:, :-1]):
                rest = model(input_ids=completion_ids[:, :-1], attention_mask=attention_mask, past_key_values=cache,
                             use_cache=False, **completion_inputs).logits  # [N, C - 1, H]
            hidden = torch.cat([hidden, rest], dim=1)                # [N, C, H]: position j predicts token j
    scored = completion_mask.bool()
    projection, bias = projection_head(head)
    logps, entropy = token_logprobs_from_hidden(hidden[scored], projection, completion_ids[scored], bias=bias,
                                                chunk_size=chunk_size, temperature=temperature,
                                                with_entropy=with_entropy, softcap=logit_softcap(model))
    full = lambda values: values.new_zeros(scored.shape).masked_scatter(scored, values)  # noqa: E731
    return full(logps), (full(entropy) if entropy is not None else None)


# ----------------------------------------------------------------------------------------------------- generation


@torch.no_grad()
def prefill_shared_cache(model: nn.Module, prompt_batch: dict, index: torch.Tensor) -> dict:
    """Prefill for `generate`: runs the unique prompts [U, P] without their last token, once, and expands the cache
    to the N = len(index) rows of the generation batch (row i continues prompt `index[i]`).

    Returns the keyword arguments of a `model.generate` call that continues from that cache: the repeated
    `input_ids` / `attention_mask` [N, P], the plain path's generation `position_ids` ([N, P], or [4, N, P] for
    Qwen) and `past_key_values` (P - 1 tokens). `generate` then runs the last prompt token and samples; no vision
    tensor is passed to it (the image is in the cache)."""
    base = unwrap_model(model)
    ids, mask = prompt_batch["input_ids"], prompt_batch["attention_mask"]
    # The positions `generate` would compute for these prompts (its own rule: from the attention mask, or Qwen's
    # get_rope_index), computed on the unique rows and repeated.
    kwargs = {k: v for k, v in prompt_batch.items() if k not in ("input_ids", "labels")}
    positions = base._prepare_position_ids_for_generation(ids, dict(kwargs))      # [U, P] or [4, U, P]
    batch_dim = positions.dim() - 2
    inputs = {k: (v[:, :-1] if torch.is_tensor(v) and v.dim() == 2 and v.shape == ids.shape else v)
              for k, v in prompt_batch.items() if k != "labels"}
    inputs["position_ids"] = positions[..., :-1]
    with model_router_loss_off(base):
        out = base(**inputs, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    for layer in cache.layers:
        if hasattr(layer, "batch_select_indices"):
            layer.batch_select_indices(index)                       # keys / values
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            LinearAttentionCacheLayerMixin.reorder_cache(layer, index)  # conv / recurrent states (Qwen3.5)
    return {
        "input_ids": ids[index],
        "attention_mask": mask[index],
        "position_ids": positions.index_select(batch_dim, index),
        "past_key_values": cache,
    }
