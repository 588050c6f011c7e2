"""The shared-prefix forwards under gradient checkpointing, bf16 autocast and LoRA equal the plain path.

Plain path: the prompts repeated per completion (`append_completions` + `token_logps`), run WITHOUT gradient
checkpointing (checkpointing changes which activations are kept, not the values). Shared path:
`shared_prefix_logps` with checkpointing on (every decoder and vision layer replayed in the backward), in
reentrant and non-reentrant mode. Losses: GRPO (token level, off-policy, with KL and an entropy bonus) and DPO's
sigmoid loss on summed log-probs. Same fixtures as tests/test_shared_prefix.py (3 prompts of different lengths,
two images in one, none in another; completions of 1..C tokens).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from test_shared_prefix import FAMILIES, WIDTH, _assert_grads_close, _batches, _loss_and_grads, built  # noqa: F401

from vlmalign.losses.policy import policy_loss
from vlmalign.models import shared_prefix as sp
from vlmalign.models.families import get_family
from vlmalign.models.forward import token_logps, unwrap_model

RTOL = 1e-5
# Gemma 4's vision tower normalises queries and keys (RMSNorm): the Q/K projection gradients are small differences,
# and float32 rounding (the plain path runs G copies of each image, the shared path one) reaches 1.1e-5 relative
# there; in float64 the same comparison gives <= 2.5e-7 on every parameter (measured), so it is rounding.
GRAD_RTOL = {"gemma4": 2e-5}


def _rtol(model) -> float:
    """1e-5; 1e-4 for models with linear-attention layers (Qwen3.5), whose float32 chunked gated delta rule moves
    the gradients near its decays by more than 1e-5 whenever the chunk boundaries move (see DECAY_PATH in
    tests/test_shared_prefix.py, which also bounds the decay parameters themselves)."""
    types = getattr(unwrap_model(model).config.get_text_config(), "layer_types", None) or ()
    return 1e-4 if "linear_attention" in types else RTOL


def _grpo(logps, entropy, mask, seed=1):
    gen = torch.Generator().manual_seed(seed)
    base = logps.detach()
    old = base + 0.05 * torch.randn(base.shape, generator=gen)
    ref = base + 0.05 * torch.randn(base.shape, generator=gen)
    advantages = torch.randn(logps.shape[0], generator=gen)
    loss = policy_loss(logps, old, advantages, mask, importance_sampling_level="token", beta=0.04, ref_logps=ref,
                       loss_type="grpo")[0]
    return loss + 0.01 * (entropy * mask).sum()


class _checkpointing:
    def __init__(self, model, reentrant: bool):
        self.model, self.reentrant = model, reentrant

    def __enter__(self):
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": self.reentrant})

    def __exit__(self, *exc):
        self.model.gradient_checkpointing_disable()


@pytest.mark.parametrize("family", FAMILIES)
def test_grpo_and_dpo_under_gradient_checkpointing_match_plain_path(built, family, caplog):
    model, encoder = built(family)
    model.train()
    G = 3
    rtol = _rtol(model)
    unique, plain, ids, mask = _batches(encoder, G)
    first = token_logps(model, plain, mask, keep_last=WIDTH)[0].detach()

    def plain_grpo():
        logps, entropy, _ = token_logps(model, plain, mask, keep_last=WIDTH, with_entropy=True)
        return _grpo(logps, entropy, mask)

    def shared_grpo():
        logps, entropy = sp.shared_prefix_logps(model, unique, ids, mask, G, with_entropy=True)
        torch.testing.assert_close(logps.detach(), first, rtol=rtol, atol=1e-6)
        return _grpo(logps, entropy, mask)

    loss_plain, grads_plain = _loss_and_grads(model, plain_grpo)
    sp._LOGGED.clear()
    for reentrant in (False, True):
        with _checkpointing(model, reentrant), caplog.at_level(logging.INFO, logger=sp.__name__):
            loss, grads = _loss_and_grads(model, shared_grpo)
        torch.testing.assert_close(loss, loss_plain, rtol=rtol, atol=1e-7)
        _assert_grads_close(grads_plain, grads, get_family(model), rtol=max(rtol, GRAD_RTOL.get(family, RTOL)))
        assert not any("_can_checkpoint_with_cache" in m.__dict__ for m in model.modules()), "setting not restored"
    assert not any("unavailable" in r.getMessage() for r in caplog.records), "fell back to the plain path"

    # DPO: G = 2 (chosen, rejected) per prompt
    unique, plain, ids, mask = _batches(encoder, 2, seed=2)
    ref = torch.randn(ids.shape[0], generator=torch.Generator().manual_seed(3))

    def dpo(logps):
        seq = logps.sum(dim=1) - ref
        return -F.logsigmoid(0.1 * (seq[0::2] - seq[1::2])).mean()

    loss_plain, grads_plain = _loss_and_grads(model, lambda: dpo(token_logps(model, plain, mask, keep_last=WIDTH)[0]))
    with _checkpointing(model, False):
        loss, grads = _loss_and_grads(model, lambda: dpo(sp.shared_prefix_logps(model, unique, ids, mask, 2)[0]))
    torch.testing.assert_close(loss, loss_plain, rtol=rtol, atol=1e-7)
    _assert_grads_close(grads_plain, grads, get_family(model), rtol=max(rtol, GRAD_RTOL.get(family, RTOL)))


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_under_gradient_checkpointing_matches_plain_path(built, family):
    """LoRA on the language model and the vision tower (random B, so every adapter gets a gradient), wrapped as the
    trainers wrap it (`prepare_model`: input grads on, then `get_peft_model`); GRPO loss, checkpointing on for the
    shared path only."""
    from peft import LoraConfig, get_peft_model

    from vlmalign.trainers.base import lora_target_modules

    base, encoder = built(family)
    base = copy.deepcopy(base)
    fam = get_family(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=lora_target_modules(base, fam, True), init_lora_weights=False)
    torch.manual_seed(0)
    model = get_peft_model(base, config)
    model.train()
    G = 2
    unique, plain, ids, mask = _batches(encoder, G, seed=4)

    def plain_grpo():
        logps, entropy, _ = token_logps(model, plain, mask, keep_last=WIDTH, with_entropy=True)
        return _grpo(logps, entropy, mask)

    def shared_grpo():
        logps, entropy = sp.shared_prefix_logps(model, unique, ids, mask, G, with_entropy=True)
        return _grpo(logps, entropy, mask)

    loss_plain, grads_plain = _loss_and_grads(model, plain_grpo)
    base.enable_input_require_grads()
    with _checkpointing(base, False):
        loss, grads = _loss_and_grads(model, shared_grpo)
    assert grads.keys() == grads_plain.keys() and all("lora_" in name for name in grads)
    torch.testing.assert_close(loss, loss_plain, rtol=_rtol(base), atol=1e-7)
    _assert_grads_close(grads_plain, grads, fam, rtol=_rtol(base))


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_autocast_under_gradient_checkpointing(built, family):
    """bf16 autocast (what `bf16=True` runs on CPU): the shared path gives the same values and gradients with and
    without checkpointing (the replay recomputes the same bf16 ops), and stays within bf16 rounding of the float32
    plain path, no further from it than the plain path in bf16 is (within a factor 2, per loss and gradient)."""
    model, encoder = built(family)
    model.train()
    G = 3
    unique, plain, ids, mask = _batches(encoder, G, seed=5)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731

    def plain_grpo():
        logps, entropy, _ = token_logps(model, plain, mask, keep_last=WIDTH, with_entropy=True)
        return _grpo(logps, entropy, mask)

    def shared_grpo():
        logps, entropy = sp.shared_prefix_logps(model, unique, ids, mask, G, with_entropy=True)
        return _grpo(logps, entropy, mask)

    loss32, grads32 = _loss_and_grads(model, plain_grpo)
    with autocast():
        loss_plain, grads_plain = _loss_and_grads(model, plain_grpo)
        loss_shared, grads_shared = _loss_and_grads(model, shared_grpo)
        with _checkpointing(model, False):
            loss_ckpt, grads_ckpt = _loss_and_grads(model, shared_grpo)
    torch.testing.assert_close(loss_ckpt, loss_shared, rtol=RTOL, atol=1e-7)
    _assert_grads_close(grads_shared, grads_ckpt, get_family(model), rtol=RTOL)

    def error(grads):
        return (torch.cat([(grads[n] - g).flatten() for n, g in grads32.items()]).norm()
                / torch.cat([g.flatten() for g in grads32.values()]).norm()).item()

    assert abs(loss_shared - loss32) <= 2 * abs(loss_plain - loss32) + 1e-3 * abs(loss32)
    assert error(grads_shared) <= 2 * error(grads_plain) + 1e-3, (error(grads_shared), error(grads_plain))
    assert error(grads_shared) < 0.05
