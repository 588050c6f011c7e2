"""Sampling completions from the policy: the model's own `generate`, no grad, eval mode.

Vision special tokens (placeholders, vision start/end, row/column markers, begin-of-image) are suppressed while
sampling: a sampled placeholder makes the next forward fail with "Image features and image tokens do not match".
Completions end at the family's end-of-turn token; everything after it is padding and masked out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from ..data.collate import Encoder
from ..models.forward import unwrap_model


@dataclass
class SamplingConfig:
    max_completion_length: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    do_sample: bool = True


@dataclass
class Rollout:
    prompt_inputs: dict[str, torch.Tensor]   # left-padded prompts, each repeated G times: [B*G, P] + vision tensors
    completion_ids: torch.Tensor             # [B*G, C] right-padded with pad_token_id
    completion_mask: torch.Tensor            # [B*G, C] 1 up to and including the end-of-turn token
    truncated: torch.Tensor                  # [B*G] bool: no end-of-turn token within max_completion_length
    texts: list[str]                         # decoded completions (special tokens skipped)


def repeat_rows(rows: list, times: int) -> list:
    """[a, b] -> [a]*times + [b]*times: the G completions of one prompt are contiguous (one group)."""
    return [row for row in rows for _ in range(times)]


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask [B, C] covering each completion up to and including its first end-of-turn token; and which rows never
    produced one (truncated)."""
    is_eos = completion_ids == eos_id
    has_eos = is_eos.any(dim=1)
    first = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, completion_ids.shape[1], dtype=torch.long))
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)
    mask = (positions[None, :] <= first[:, None]).long()
    return mask, ~has_eos


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    encoder: Encoder,
    prompt_rows: list[dict],
    *,
    num_generations: int = 1,
    sampling: SamplingConfig = SamplingConfig(),
    generator_seed: int | None = None,
) -> Rollout:
    """Sample `num_generations` completions for each normalised prompt row (`prompt` + `images`)."""
    rows = repeat_rows(prompt_rows, num_generations)
    inputs = encoder.encode(
        [r["prompt"] for r in rows], [r["images"] for r in rows],
        padding_side="left", add_generation_prompt=True, with_labels=False,
    )
    base = unwrap_model(model)
    device = next(base.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    tokenizer = encoder.processor.tokenizer
    eos_id = tokenizer.convert_tokens_to_ids(encoder.family.eos_token)
    config = GenerationConfig(
        max_new_tokens=sampling.max_completion_length,
        do_sample=sampling.do_sample,
        temperature=sampling.temperature if sampling.do_sample else None,
        top_p=sampling.top_p if sampling.do_sample else None,
        top_k=sampling.top_k if sampling.do_sample else None,
        min_p=sampling.min_p if sampling.do_sample else None,
        repetition_penalty=sampling.repetition_penalty,
        suppress_tokens=encoder.family.suppress_token_ids(tokenizer),
        eos_token_id=eos_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    was_training = base.training
    base.eval()
    try:
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        out = base.generate(**inputs, generation_config=config)
    finally:
        base.train(was_training)
    completion_ids = out[:, inputs["input_ids"].shape[1]:]
    if completion_ids.shape[1] == 0:
        completion_ids = torch.full((len(rows), 1), tokenizer.pad_token_id, device=device)
    mask, truncated = completion_mask_from_ids(completion_ids, eos_id)
    completion_ids = torch.where(mask.bool(), completion_ids, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(completion_ids * mask + tokenizer.pad_token_id * (1 - mask), skip_special_tokens=True)
    return Rollout(inputs, completion_ids, mask, truncated, texts)
