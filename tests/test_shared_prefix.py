"""Shared-prefix forwards and generation equal the plain path (prompt repeated per completion), for every family.

Plain path: the prompts encoded G times each (processor), `append_completions`, `token_logps(keep_last=C)`, and
`generate(shared_prefix=False)`. Shared path: `shared_prefix_logps` on the unique prompts, `generate` with
`shared_prefix=True`. Prompts of different lengths (left padding; one with two images, one text-only), completions
of different lengths (1 .. C tokens). Float32 tiny models, built once per module.
"""

from __future__ import annotations

import logging
import re

import numpy as np

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlmalign.data.collate import Encoder, append_completions
from vlmalign.losses.policy import policy_loss
from vlmalign.models import shared_prefix as sp
from vlmalign.models.families import family_names, get_family
from vlmalign.models.forward import token_logps
from vlmalign.models.tiny import build_tiny_model
from vlmalign.rl.rollout import Rollout, SamplingConfig, generate

FAMILIES = family_names()
RTOL = 1e-4
# Linear attention (Qwen3.5): the gradients of the decay path (A_log, dt_bias, in_proj_a and their LoRA adapters)
# carry the float32 rounding of transformers' chunked gated delta rule (in-chunk cumulative decays of -20 per token
# and more): the plain path against itself with 7 extra left-padding columns already moves them by up to 2e-2
# relative; with the rule run in float64 the shared path equals the plain path to 2.3e-7 on every parameter
# (measured on the tiny qwen3_5). They are held to 1e-3 here, every other parameter to the test's tolerance.
DECAY_PATH = re.compile(r"linear_attn\.(A_log|dt_bias|in_proj_a)\b")
DECAY_RTOL = 1e-3
WIDTH = 6            # completion length C
ENCODE = dict(padding_side="left", add_generation_prompt=True, with_labels=False)


def _image(seed: int) -> Image.Image:
    """Noise, not a flat color: a flat image gives the vision tower's attention (near-)zero gradients."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (28, 28, 3), dtype=np.uint8))


def _rows() -> list[dict]:
    user = lambda *blocks: [{"role": "user", "content": list(blocks)}]  # noqa: E731
    image, text = {"type": "image"}, lambda t: {"type": "text", "text": t}  # noqa: E731
    return [
        {"prompt": user(image, text("what color is the shape in the middle ?")), "images": [_image(0)]},
        {"prompt": user(image, image, text("what ?")), "images": [_image(1), _image(2)]},
        {"prompt": user(text("no image here , count to three")), "images": []},
    ]


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(family: str):
        if family not in cache:
            model, processor = build_tiny_model(family, "tiny")
            fam = get_family(model)
            cache[family] = (model, Encoder(processor, fam, fam.image_token_id(model)))
        return cache[family]

    return get


def _batches(encoder: Encoder, num_generations: int, seed: int = 0, width: int = WIDTH):
    """Unique prompts [B, P], the plain path's batch [B*G, P + C], and completions [B*G, C] of lengths 1..C."""
    rows = _rows()
    unique = encoder.encode([r["prompt"] for r in rows], [r["images"] for r in rows], **ENCODE)
    repeated = encoder.encode([r["prompt"] for r in rows for _ in range(num_generations)],
                              [r["images"] for r in rows for _ in range(num_generations)], **ENCODE)
    n = len(rows) * num_generations
    gen = torch.Generator().manual_seed(seed)
    tokenizer = encoder.processor.tokenizer
    special = set(encoder.vision_token_ids.tolist()) | set(tokenizer.all_special_ids)
    vocab = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    ids = vocab[torch.randint(0, len(vocab), (n, width), generator=gen)]
    lengths = torch.randint(1, width + 1, (n,), generator=gen)
    lengths[0], lengths[-1] = 1, width
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, tokenizer.pad_token_id)
    return unique, append_completions(repeated, ids, mask, encoder), ids, mask


def _loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(plain: dict, shared: dict, family, rtol: float = RTOL) -> float:
    """Every parameter's gradient within RTOL of the plain one (relative to its norm, floored at 1e-3 of the total
    norm: some gradients are exactly zero in theory, e.g. attention key biases, and hold only rounding noise).
    Returns the largest relative error over the parameters above that floor."""
    assert plain.keys() == shared.keys()
    total = torch.cat([g.flatten() for g in plain.values()]).norm()
    worst = 0.0
    for name, grad in plain.items():
        scale = max(grad.norm().item(), 1e-3 * total.item())
        err = (shared[name] - grad).norm().item() / scale
        bound = max(rtol, DECAY_RTOL) if DECAY_PATH.search(name) else rtol
        assert err <= bound, f"{name}: gradient relative error {err:.2e}"
        if grad.norm() > 1e-3 * total:
            worst = max(worst, err)
    vision = [g.norm().item() for n, g in shared.items() if family.is_vision_param(n)]
    assert vision and max(vision) > 0, "no gradient reached the vision tower"
    return worst


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("family", FAMILIES)
def test_grpo_loss_and_gradients_match_plain_path(built, family, level):
    model, encoder = built(family)
    model.train()
    G = 3
    unique, plain, ids, mask = _batches(encoder, G)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        ref_logps = token_logps(model, plain, mask, keep_last=WIDTH)[0]
    old = ref_logps + 0.05 * torch.randn(ref_logps.shape, generator=gen)   # off-policy: ratios != 1, some clipped
    ref = ref_logps + 0.05 * torch.randn(ref_logps.shape, generator=gen)
    advantages = torch.randn(ids.shape[0], generator=gen)
    kw = dict(importance_sampling_level=level, beta=0.04, ref_logps=ref, loss_type="grpo")
    out = {}

    def plain_loss():
        logps, entropy, _ = token_logps(model, plain, mask, keep_last=WIDTH, with_entropy=True)
        out["plain"] = (logps.detach(), entropy.detach())
        return policy_loss(logps, old, advantages, mask, **kw)[0] + 0.01 * (entropy * mask).sum()

    def shared_loss():
        logps, entropy = sp.shared_prefix_logps(model, unique, ids, mask, G, with_entropy=True)
        out["shared"] = (logps.detach(), entropy.detach())
        return policy_loss(logps, old, advantages, mask, **kw)[0] + 0.01 * (entropy * mask).sum()

    loss_plain, grads_plain = _loss_and_grads(model, plain_loss)
    loss_shared, grads_shared = _loss_and_grads(model, shared_loss)
    torch.testing.assert_close(loss_shared, loss_plain, rtol=RTOL, atol=1e-6)
    for a, b in zip(out["shared"], out["plain"]):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-5)
    assert (out["shared"][0][~mask.bool()] == 0).all()
    _assert_grads_close(grads_plain, grads_shared, get_family(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_dpo_sequence_logps_and_gradients_match_plain_path(built, family):
    """G = 2 (chosen, rejected) per prompt; DPO's sigmoid loss on summed log-probs."""
    model, encoder = built(family)
    model.train()
    unique, plain, ids, mask = _batches(encoder, 2, seed=2)
    ref = torch.randn(ids.shape[0], generator=torch.Generator().manual_seed(3))

    def dpo(logps):
        seq = logps.sum(dim=1) - ref                             # [2B]: chosen at even rows, rejected at odd
        return -F.logsigmoid(0.1 * (seq[0::2] - seq[1::2])).mean()

    loss_plain, grads_plain = _loss_and_grads(model, lambda: dpo(token_logps(model, plain, mask, keep_last=WIDTH)[0]))
    shared = lambda: dpo(sp.shared_prefix_logps(model, unique, ids, mask, 2)[0])  # noqa: E731
    loss_shared, grads_shared = _loss_and_grads(model, shared)
    torch.testing.assert_close(loss_shared, loss_plain, rtol=RTOL, atol=1e-6)
    _assert_grads_close(grads_plain, grads_shared, get_family(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_select_prompt_rows_equals_processor_on_repeated_rows(built, family):
    _, encoder = built(family)
    rows = _rows()
    unique = encoder.encode([r["prompt"] for r in rows], [r["images"] for r in rows], **ENCODE)
    index = torch.tensor([2, 0, 0, 1, 1, 1, 2])
    expected = encoder.encode([rows[i]["prompt"] for i in index], [rows[i]["images"] for i in index], **ENCODE)
    got = sp.select_prompt_rows(unique, index, encoder.family, encoder.image_token_id)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_matches_plain_path(built, family):
    model, encoder = built(family)
    rows, G = _rows(), 3
    greedy = SamplingConfig(max_completion_length=6, do_sample=False)
    plain = generate(model, encoder, rows, num_generations=G, sampling=greedy, shared_prefix=False)
    shared = generate(model, encoder, rows, num_generations=G, sampling=greedy, shared_prefix=True)
    assert torch.equal(shared.completion_ids, plain.completion_ids)
    assert torch.equal(shared.completion_mask, plain.completion_mask)
    assert shared.texts == plain.texts
    # Rollout: the unique prompts and the index, and the repeated prompts on demand (same as the plain path's)
    assert shared.unique_prompt_inputs["input_ids"].shape[0] == len(rows)
    assert torch.equal(shared.group_index, torch.arange(len(rows)).repeat_interleave(G))
    for key, value in plain.prompt_inputs.items():
        assert torch.equal(shared.prompt_inputs[key], value), key
        assert torch.equal(shared.unique_prompt_inputs[key], plain.unique_prompt_inputs[key]), key
    # sampling under one seed draws the same tokens
    sampled = SamplingConfig(max_completion_length=6, do_sample=True, temperature=1.0)
    a = generate(model, encoder, rows, num_generations=G, sampling=sampled, generator_seed=7, shared_prefix=False)
    b = generate(model, encoder, rows, num_generations=G, sampling=sampled, generator_seed=7, shared_prefix=True)
    assert torch.equal(a.completion_ids, b.completion_ids)


def test_generation_groups_rows_passed_repeated(built):
    """Callers that repeat the rows themselves (num_generations=1) get the prefix shared too."""
    model, encoder = built("qwen2_vl")
    rows = [row for row in _rows() for _ in range(2)]
    greedy = SamplingConfig(max_completion_length=4, do_sample=False)
    plain = generate(model, encoder, rows, sampling=greedy, shared_prefix=False)
    shared = generate(model, encoder, rows, sampling=greedy)
    assert isinstance(shared, Rollout)
    assert shared.unique_prompt_inputs["input_ids"].shape[0] == 3
    assert torch.equal(shared.group_index, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert torch.equal(shared.completion_ids, plain.completion_ids)


def test_single_token_completions_and_fallback_for_custom_checkpoint_function(built, caplog):
    """One-token completions (prompt pass only). A checkpoint function that is not a `functools.partial` (so its
    reentrancy cannot be set) makes the path fall back to the plain one, logged once, values unchanged."""
    model, encoder = built("llava_clip")
    model.train()
    unique, _, ids, mask = _batches(encoder, 2)
    rows = _rows()
    twice = [r for r in rows for _ in range(2)]
    repeated = encoder.encode([r["prompt"] for r in twice], [r["images"] for r in twice], **ENCODE)
    one, one_mask = ids[:, :1], torch.ones_like(ids[:, :1])
    expected = token_logps(model, append_completions(repeated, one, one_mask, encoder), one_mask, keep_last=1)[0]
    got = sp.shared_prefix_logps(model, unique, one, one_mask, 2)[0]
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=1e-6)

    def custom(function, *args, **kwargs):
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)

    model.gradient_checkpointing_enable()
    for layer in model.modules():
        if getattr(layer, "gradient_checkpointing", False) and hasattr(layer, "_gradient_checkpointing_func"):
            layer._gradient_checkpointing_func = custom
    try:
        with caplog.at_level(logging.INFO, logger=sp.__name__):
            sp._LOGGED.clear()
            for _ in range(2):
                logps, _ = sp.shared_prefix_logps(model, unique, one, one_mask, 2)
    finally:
        model.gradient_checkpointing_disable()
    torch.testing.assert_close(logps, expected, rtol=RTOL, atol=1e-6)
    assert sum("custom function (" in r.getMessage() for r in caplog.records) == 1


def test_one_token_completion_pass_continues_the_linear_attention_states(built):
    """C = 2: the completion pass runs a single token (the linear-attention layers' one-step path: the recurrent
    rule from the prompt's state, the convolution over [prompt conv state, token]). Same log-probs and gradients as
    the plain path."""
    model, encoder = built("qwen3_5")
    model.train()
    unique, plain, ids, mask = _batches(encoder, 3, width=2)
    loss_plain, grads_plain = _loss_and_grads(model, lambda: token_logps(model, plain, mask, keep_last=2)[0].sum())
    loss, grads = _loss_and_grads(model, lambda: sp.shared_prefix_logps(model, unique, ids, mask, 3)[0].sum())
    torch.testing.assert_close(loss, loss_plain, rtol=RTOL, atol=1e-6)
    _assert_grads_close(grads_plain, grads, get_family(model))
