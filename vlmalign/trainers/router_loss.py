"""The router load-balancing loss in every trainer (policy pass only; models/moe.py says what is counted).

On by default where the model's config turns it on (`output_router_logits=True`, weight `router_aux_loss_coef`);
`router_aux_loss_coef` in the config of the method (TRL's argument) sets the weight (0 turns it off). Logged as
`aux_loss` (the unweighted loss, TRL's metric name), added to the loss as `coef * aux_loss`, divided by the
gradient accumulation steps where the trainer's loss is already scaled for accumulation (SFT, GRPO), as TRL does;
the reference and old-policy passes never add it.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..models.moe import RouterCapture, router_aux_settings, top_k


class RouterAuxLoss:
    def __init__(self, model: torch.nn.Module, coef: float | None):
        self.enabled, self.coef = router_aux_settings(model, coef)
        self.top_k = top_k(model) if self.enabled else 0

    @contextmanager
    def policy_pass(self, model: torch.nn.Module):
        """Around the policy's forwards of one micro-batch: yields the capture (None when the loss is off)."""
        if not self.enabled:
            yield None
            return
        with RouterCapture(model) as capture:
            yield capture

    def add(self, trainer, loss: torch.Tensor, capture: RouterCapture | None, accumulation: int = 1) -> torch.Tensor:
        """`loss + coef * aux_loss / accumulation`, the aux loss recorded as `aux_loss`."""
        if capture is None:
            return loss
        aux = capture.loss(self.top_k)
        trainer.record("aux_loss", trainer.accelerator.gather(aux.detach().float().reshape(1)).mean())
        return loss + (self.coef / accumulation) * aux.to(loss.dtype)
