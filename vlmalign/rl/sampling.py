"""Sampling whose randomness belongs to each completion, not to the batch it happens to be generated in.

`model.generate(do_sample=True)` draws every row's next token from one shared random stream, so what row ``i``
samples depends on how many rows came before it: on which process it was generated and with which batch size.
Here each completion owns a random stream seeded from ``(seed, generation round, global completion index)``, and
sampling is done with the Gumbel-max trick (``argmax(logits' + Gumbel noise)`` is an exact sample from
``softmax(logits')``, where ``logits'`` are the logits after repetition penalty, vision-token suppression,
temperature, top-k, top-p and min-p). So completion ``k`` of round ``r`` depends only on the weights, its prompt,
``(seed, r, k)`` and the sampling settings: the same with 1 process or N, and with any per-device batch size.

The generation itself is `vlmalign.rl.rollout.generate` (vision special tokens suppressed, completions cut at the
end-of-turn token) run in greedy mode with the sampler added as the last logits processor.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import replace

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ..data.collate import Encoder
from ..models.forward import unwrap_model
from .rollout import Rollout, SamplingConfig, generate

_MASK64 = (1 << 63) - 1


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (splitmix64 on each part): distinct inputs give unrelated streams."""
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = (state ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 31
        state = state * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 29
    return state & _MASK64


class RowSeededSampler(LogitsProcessor):
    """Last logits processor of a *greedy* `generate`: applies the sampling warpers, then adds Gumbel noise drawn
    from each row's own generator, so the greedy argmax is a sample from the warped distribution.

    Row ``i`` draws one vector of ``vocab`` uniforms per decoding step from ``torch.Generator(seed=seeds[i])``:
    its ``t``-th token depends on its own stream only (finished rows keep drawing; that does not affect others)."""

    def __init__(self, seeds: Sequence[int], sampling: SamplingConfig, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]
        warpers = LogitsProcessorList()
        if sampling.temperature is not None and sampling.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k:
            warpers.append(TopKLogitsWarper(top_k=sampling.top_k))
        if sampling.top_p is not None and sampling.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=sampling.top_p))
        if sampling.min_p:
            warpers.append(MinPLogitsWarper(min_p=sampling.min_p))
        self.warpers = warpers

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"{scores.shape[0]} rows but {len(self.generators)} seeds")
        scores = self.warpers(input_ids, scores)
        uniforms = torch.empty(scores.shape, dtype=torch.float32, device=self.device)   # [B, V]
        for row, generator in enumerate(self.generators):
            torch.rand(scores.shape[-1], generator=generator, device=self.device, out=uniforms[row])
        gumbel = -torch.log(-torch.log(uniforms.clamp(min=1e-38)))
        return scores + gumbel.to(scores.device, scores.dtype)                   # -inf (filtered) stays -inf


@contextmanager
def _extra_logits_processor(model: torch.nn.Module, processor: LogitsProcessor):
    """Within the block, the model's `generate` also applies `processor` (after the built-in processors).

    TODO(merge): `rollout.generate` could take a `logits_processor` argument and this patch would go away."""
    base = unwrap_model(model)
    had_own = "generate" in vars(base)
    original = base.generate
    base.generate = functools.partial(original, logits_processor=LogitsProcessorList([processor]))
    try:
        yield
    finally:
        if had_own:
            base.generate = original
        else:
            del base.generate


@torch.no_grad()
def sample_completions(
    model: torch.nn.Module,
    encoder: Encoder,
    rows: list[dict],
    seeds: Sequence[int],
    sampling: SamplingConfig,
    *,
    shared_prefix: bool = True,
) -> Rollout:
    """One completion per row (repeat the rows for groups), row ``i`` sampled with its own stream ``seeds[i]``.

    With ``sampling.do_sample=False`` this is plain greedy decoding (seeds unused). ``shared_prefix``: consecutive
    equal prompt rows are prefilled once (`vlmalign.rl.rollout.generate`)."""
    if len(seeds) != len(rows):
        raise ValueError(f"{len(rows)} rows but {len(seeds)} seeds")
    greedy = replace(sampling, do_sample=False)
    if not sampling.do_sample:
        return generate(model, encoder, rows, num_generations=1, sampling=greedy, shared_prefix=shared_prefix)
    device = next(unwrap_model(model).parameters()).device
    sampler = RowSeededSampler(seeds, sampling, device=device)
    with _extra_logits_processor(model, sampler):
        return generate(model, encoder, rows, num_generations=1, sampling=greedy, shared_prefix=shared_prefix)
