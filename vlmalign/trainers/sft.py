"""Supervised fine-tuning of a VLM on image+text conversations.

Loss: per-token NLL on assistant (or completion) tokens only, image tokens never, normalised over the whole
accumulated batch: sum over this micro-batch / (answer tokens in all micro-batches of the optimiser step), so
batch 8 x accumulation 1 and batch 2 x accumulation 4 give the same loss and update.

Padding-free packing (`padding_free=True`, or `packing=True`: TRL's names; here both pack the rows of each batch,
never across batches): the batch's rows run as one sequence without padding, attention kept inside each row
(`vlmalign.models.packing`); the same loss and gradients as the padded batch. Families that cannot be packed run
padded (logged once).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..data.collate import SFTCollator
from ..losses.logprobs import IGNORE_INDEX
from ..models.forward import token_logps
from ..models.packing import pack_rows, packed_attention, packed_score_mask, packing_unsupported
from .base import BaseConfig, VLMTrainer
from .trl_fields import SFTTrlFields, check_trl_arguments

logger = logging.getLogger(__name__)


@dataclass
class SFTConfig(BaseConfig, SFTTrlFields):
    """Configuration of `SFTTrainer` (a `transformers.TrainingArguments`); TRL 1.16's SFTConfig arguments are all
    accepted (trl_fields.py; docs/trl-compatibility.md)."""

    learning_rate: float = 2e-5
    padding_free: bool = field(default=False, metadata={"help": "Run each batch's rows as one sequence without "
                               "padding (attention inside each row); same loss as the padded batch."})
    packing: bool = field(default=False, metadata={"help": "Same as padding_free here: packs the rows of each "
                          "batch (not across batches as TRL's packing does)."})
    remove_unused_columns: bool = True

    def __post_init__(self):
        check_trl_arguments(self)
        self._check_sft_arguments()
        super().__post_init__()


class SFTTrainer(VLMTrainer):
    """`SFTTrainer(model=..., args=SFTConfig(...), train_dataset=..., processing_class=..., peft_config=...)`.

    Rows: `messages` (+ `images` / `image`), or `prompt` + `completion`; text-only rows may be mixed in."""

    data_kind = "sft"
    # Our loss is already normalised over the accumulated batch (num_items_in_batch).
    model_accepts_loss_kwargs = True
    loss_is_scaled_for_ga = True
    # the num_tokens metric's running count continues across a resume (saved in each checkpoint)
    _resumable_attrs = ("_tokens_seen",)

    def make_collator(self):
        return SFTCollator(self.encoder)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self.router_aux.policy_pass(model) as routers:
            logps, hits, mask = self._token_logps(model, inputs)
        local_tokens = mask.sum()
        denominator = num_items_in_batch if num_items_in_batch is not None else local_tokens
        denominator = torch.as_tensor(denominator, device=logps.device).clamp(min=1)
        loss = -(logps * mask).sum() / denominator
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        loss = self.router_aux.add(self, loss, routers, self.args.gradient_accumulation_steps if model.training else 1)
        self.record("mean_token_accuracy", (hits & mask).sum() / local_tokens.clamp(min=1))
        if model.training:
            self._tokens_seen = getattr(self, "_tokens_seen", 0) + int(inputs["attention_mask"].sum())
            self.record("num_tokens", self._tokens_seen)
        return (loss, {"loss": loss}) if return_outputs else loss

    def _token_logps(self, model, inputs):
        """Log-probs, argmax hits and the scored mask: packed (padding_free / packing) or padded."""
        reason = None
        if self.args.padding_free or self.args.packing:
            reason = packing_unsupported(model)
            if reason is None:
                packed = pack_rows(model, inputs)                 # [1, L]: the rows without their padding
                mask = packed_score_mask(packed)
                with packed_attention(model):
                    logps, _, hits = token_logps(model, packed, mask)
            elif not getattr(self, "_packing_logged", False):
                self._packing_logged = True
                logger.info("padding_free: %s; running padded batches", reason)
        if not (self.args.padding_free or self.args.packing) or reason is not None:
            mask = inputs["labels"] != IGNORE_INDEX               # [B, T]
            logps, _, hits = token_logps(model, inputs, mask)     # [B, T] each
        return logps, hits, mask
