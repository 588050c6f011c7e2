"""Final-logit soft-capping (Gemma 4: cap * tanh(logits / cap)): vlmalign's chunked log-probs, which bypass the LM
head and project only scored positions, equal the log-softmax of the model's own (capped) logits, on the plain and
the shared-prefix paths. A small cap (0.5) makes the capping matter: the random tiny model's logits are small."""

from __future__ import annotations

import pytest
import torch

from test_shared_prefix import WIDTH, _batches, built  # noqa: F401
from vlmalign.models.forward import token_logps
from vlmalign.models.shared_prefix import shared_prefix_logps

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(model, batch, mask):
    """log p(token t | < t) from the model's own logits (soft-capped by its forward)."""
    with torch.no_grad():
        logits = model(**batch).logits.float()
    logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return torch.nn.functional.pad(logps, (1, 0)) * mask


def test_softcapped_logps_equal_the_models_own_logits(built):
    model, encoder = built("gemma4")
    text = model.config.get_text_config()
    assert text.final_logit_softcapping == 30.0                      # the real checkpoints' value
    unique, plain, ids, mask = _batches(encoder, 2)
    full_mask = torch.cat([torch.zeros_like(plain["attention_mask"][:, :-WIDTH]), mask], dim=1)
    try:
        text.final_logit_softcapping = 0.5
        reference = _reference(model, plain, full_mask)
        with torch.no_grad():
            ours, _, _ = token_logps(model, plain, full_mask)
            shared, _ = shared_prefix_logps(model, unique, ids, mask, 2)
        assert text.final_logit_softcapping == 0.5                    # restored after the bypass
        text.final_logit_softcapping = None
        uncapped = _reference(model, plain, full_mask)
    finally:
        text.final_logit_softcapping = 30.0
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared, reference[:, -WIDTH:], rtol=1e-5, atol=1e-5)
    assert (uncapped - reference).abs().max() > 1e-2                  # the cap changes the values: the test can fail
