"""The shared-prefix forwards under gradient checkpointing, bf16 autocast and LoRA equal the plain path.

Plain path: the prompts repeated per completion (`append_completions` + `token_logps`), run WITHOUT gradient
checkpointing (checkpointing changes which activations are kept, not the values). Shared path:
`shared_prefix_logps` with checkpointing on (every decoder and vision layer replayed in the backward), in
reentrant and non-reentrant mode. Losses: GRPO (token level, off-policy, with KL and an entropy bonus) and DPO's
sigmoid loss on summed log-probs. Same fixtures as tests/test_shared_prefix.py (3 prompts of different lengths,
two images in one, none in another; completions of 1..C tokens).
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from test_shared_prefix import FAMILIES, WIDTH, _assert_grads_close, _batches, _loss_and_grads, built  # noqa: F401

from vlmalign.losses.policy import policy_loss
from vlmalign.models import shared_prefix as sp
from vlmalign.models.families import get_family
from vlmalign.models.forward import token_logps

RTOL = 1e-5


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
    unique, plain, ids, mask = _batches(encoder, G)
    first = token_logps(model, plain, mask, keep_last=WIDTH)[0].detach()

    def plain_grpo():
        logps, entropy, _ = token_logps(model, plain, mask, keep_last=WIDTH, with_entropy=True)
        return _grpo(logps, entropy, mask)

    def shared_grpo():
        logps, entropy = sp.shared_prefix_logps(model, unique, ids, mask, G, with_entropy=True)
        torch.testing.assert_close(logps.detach(), first, rtol=RTOL, atol=1e-6)
        return _grpo(logps, entropy, mask)

    loss_plain, grads_plain = _loss_and_grads(model, plain_grpo)
    sp._LOGGED.clear()
    for reentrant in (False, True):
        with _checkpointing(model, reentrant), caplog.at_level(logging.INFO, logger=sp.__name__):
            loss, grads = _loss_and_grads(model, shared_grpo)
        torch.testing.assert_close(loss, loss_plain, rtol=RTOL, atol=1e-7)
        _assert_grads_close(grads_plain, grads, get_family(model), rtol=RTOL)
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
    torch.testing.assert_close(loss, loss_plain, rtol=RTOL, atol=1e-7)
    _assert_grads_close(grads_plain, grads, get_family(model), rtol=RTOL)
