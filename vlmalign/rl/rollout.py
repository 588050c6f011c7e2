"""Sampling completions from the policy: the model's own `generate`, no grad, eval mode.

Vision special tokens (placeholders, vision start/end, row/column markers, begin-of-image) are suppressed while
sampling: a sampled placeholder makes the next forward fail with "Image features and image tokens do not match".
Completions end at the family's end-of-turn token; everything after it is padding and masked out.

Shared prefix (`shared_prefix=True`, the default): consecutive equal prompt rows (the G rows of a group, whether
`num_generations` repeats them here or the caller passed them repeated) are encoded and prefilled once, image
included (`vlmalign.models.shared_prefix.prefill_shared_cache`); the cache is expanded to the group's rows and
`generate` continues from it. Same `generate` call, logits processors and random stream as the plain path: greedy
decoding gives the plain path's tokens, and sampling under the same seed draws from the same stream (a token can
only differ where float rounding of the logits, ~1e-6, moves a draw across a probability boundary).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import GenerationConfig

from ..data.collate import Encoder
from ..models.forward import unwrap_model
from ..models.moe import model_router_loss_off
from ..models.shared_prefix import prefill_shared_cache, select_prompt_rows, shared_prefix_unsupported
from .rewards import compute_rewards


@dataclass
class SamplingConfig:
    max_completion_length: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    do_sample: bool = True

    @classmethod
    def from_config(cls, config, **overrides) -> "SamplingConfig":
        """The sampling settings of a config that has fields of the same names (GRPOConfig): one list of fields."""
        names = [f.name for f in dataclasses.fields(cls) if hasattr(config, f.name)]
        return cls(**{**{name: getattr(config, name) for name in names}, **overrides})


@dataclass
class Rollout:
    """Sampled completions; N = B * G rows, the G completions of a prompt contiguous.

    `unique_prompt_inputs` holds each distinct prompt once (U <= B rows: consecutive equal prompt rows are one
    group) and `group_index` maps completions to them: the inputs of `shared_prefix_logps`. `prompt_inputs` (as
    before: the prompts repeated, one row per completion) is built from them on first access (a tensor gather, no
    processor run) when generation shared the prefix."""

    completion_ids: torch.Tensor             # [N, C] right-padded with pad_token_id
    completion_mask: torch.Tensor            # [N, C] 1 up to and including the end-of-turn token
    truncated: torch.Tensor                  # [N] bool: no end-of-turn token within max_completion_length
    texts: list[str]                         # decoded completions (special tokens skipped)
    unique_prompt_inputs: dict[str, torch.Tensor]  # [U, P] left-padded distinct prompts + their vision tensors
    group_index: torch.Tensor                # [N] long: completion i continues unique prompt group_index[i]
    _prompt_inputs: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    _expand: Callable[[], dict] | None = field(default=None, repr=False)

    @property
    def prompt_inputs(self) -> dict[str, torch.Tensor]:
        """Left-padded prompts, one row per completion: [N, P] + vision tensors."""
        if self._prompt_inputs is None:
            self._prompt_inputs = self._expand()
        return self._prompt_inputs


def repeat_rows(rows: list, times: int) -> list:
    """[a, b] -> [a]*times + [b]*times: the G completions of one prompt are contiguous (one group)."""
    return [row for row in rows for _ in range(times)]


def _same_prompt(a: dict, b: dict) -> bool:
    return a is b or (a["prompt"] == b["prompt"] and list(a["images"]) == list(b["images"]))


def group_consecutive(rows: list[dict]) -> tuple[list[dict], torch.Tensor]:
    """Consecutive rows with the same prompt and images -> (distinct rows [U], index [N] of each row's group)."""
    unique, index = [], []
    for row in rows:
        if not unique or not _same_prompt(unique[-1], row):
            unique.append(row)
        index.append(len(unique) - 1)
    return unique, torch.tensor(index, dtype=torch.long)


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
    shared_prefix: bool = True,
) -> Rollout:
    """Sample `num_generations` completions for each normalised prompt row (`prompt` + `images`).

    `shared_prefix`: prefill each group of equal consecutive prompts once (see the module docstring); falls back to
    the plain path when no two consecutive rows share a prompt or the model does not support it."""
    rows = repeat_rows(prompt_rows, num_generations)
    unique, index = group_consecutive(rows)
    base = unwrap_model(model)
    device = next(base.parameters()).device
    index = index.to(device)
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
        share = shared_prefix and len(unique) < len(rows) and shared_prefix_unsupported(base) is None
        if share:
            unique_inputs = encoder.encode_prompts(unique, device)
            inputs, repeated = prefill_shared_cache(base, unique_inputs, index), None
        else:
            inputs = repeated = encoder.encode_prompts(rows, device)
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        with model_router_loss_off(base):  # its aux loss would fail on the cached prompt's mask
            out = base.generate(**inputs, generation_config=config)
    finally:
        base.train(was_training)
    if not share:
        counts = torch.unique_consecutive(index, return_counts=True)[1]
        firsts = counts.cumsum(0) - counts                                       # first row of each group
        unique_inputs = select_prompt_rows(repeated, firsts, encoder.family, encoder.image_token_id)
    completion_ids = out[:, inputs["input_ids"].shape[1]:]
    if completion_ids.shape[1] == 0:
        completion_ids = torch.full((len(rows), 1), tokenizer.pad_token_id, device=device)
    mask, truncated = completion_mask_from_ids(completion_ids, eos_id)
    completion_ids = torch.where(mask.bool(), completion_ids, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(completion_ids * mask + tokenizer.pad_token_id * (1 - mask), skip_special_tokens=True)
    expand = lambda: select_prompt_rows(unique_inputs, index, encoder.family, encoder.image_token_id)  # noqa: E731
    return Rollout(completion_ids, mask, truncated, texts, unique_prompt_inputs=unique_inputs, group_index=index,
                   _prompt_inputs=repeated, _expand=expand)


def sample_and_score(model: torch.nn.Module, encoder: Encoder, rows: list[dict], reward_funcs: list, *, samples: int,
                     sampling: SamplingConfig) -> tuple[Rollout, torch.Tensor, torch.Tensor]:
    """`samples` completions per normalised prompt row, each scored by every reward function (the row's other
    columns passed along): ``(rollout, per_func [N, F], total [N])`` as `compute_rewards` returns them, N = rows x
    samples. The one sample-and-score loop of evaluation and preference-pair sampling (GRPO scores its rollouts
    itself: rewards on local rows, gathered across processes)."""
    out = generate(model, encoder, rows, num_generations=samples, sampling=sampling)
    ids = [c[m.bool()].tolist() for c, m in zip(out.completion_ids, out.completion_mask)]
    columns = {k: [r.get(k) for r in rows for _ in range(samples)] for k in rows[0] if k != "prompt"}
    prompts = [r["prompt"] for r in rows for _ in range(samples)]
    per_func, total = compute_rewards(reward_funcs, prompts, out.texts, ids, columns)
    return out, per_func, total
