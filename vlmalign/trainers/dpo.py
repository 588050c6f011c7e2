"""Direct preference optimisation of a VLM: DPO and its family (IPO, hinge, robust, BCO, ..., MPO).

One batch of 2B rows `[prompt+chosen_1..B, prompt+rejected_1..B]` (each row with its own images, see
`PreferenceCollator`) goes through the policy once and through the reference once; by default in its shared-prefix
form only (each prompt and its images processed and run once for both answers), the plain 2B rows where the chat
template or `padding_free` rules that out. Per-sequence log-probs are the
sum of token log-probs over the answer tokens, computed at those positions only (never [B, T, V] logits). The loss is
`vlmalign.losses.preference.combined_preference_loss` (a weighted sum of batch-mean losses; MPO is
`MPO_PRESET`). The BCO reward shift (running mean of the implicit rewards, gathered across processes) is updated
every training step before the loss, as TRL <= 0.28 did, and saved in / restored from checkpoints
(`_resumable_attrs`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from accelerate.utils import gather_object

from ..data.collate import PreferenceCollator
from ..data.formats import _column_names
from .engines.gather import is_zero3_partitioned
from ..losses.preference import PREFERENCE_LOSSES, RunningMeanDelta, combined_preference_loss, dpo_reward_metrics
from ..models.packing import packing_unsupported
from .base import BaseConfig, VLMTrainer
from .trl_fields import DPOTrlFields, check_trl_arguments
from .reference import (RowsWithReferenceLogps, batch_sequence_logps, make_reference_model,
                        precompute_reference_logps, reference_logps)

#: MPO (Wang et al. 2024, arXiv 2411.10442): preference (DPO) + quality (BCO) + generation (SFT) losses.
MPO_PRESET = {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}

_REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")
logger = logging.getLogger(__name__)
#: TRL 1.16 DPO loss types without a vlmalign implementation (refused by name)
TRL_ONLY_LOSSES = ("aot", "aot_unpaired", "sigmoid_norm")


def _split(value) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    return [part.strip() for item in items for part in str(item).split(",") if part.strip()]


@dataclass
class DPOConfig(BaseConfig, DPOTrlFields):
    """Configuration of `DPOTrainer` (a `transformers.TrainingArguments`). MPO: `DPOConfig(**MPO_PRESET, ...)`."""

    beta: float = field(default=0.1, metadata={"help": "Temperature of the implicit reward beta * log(pi/pi_ref) "
                        "(IPO's tau). Higher keeps the policy closer to the reference."})
    loss_type: list[str] | str = field(default_factory=lambda: ["sigmoid"], metadata={"help": "Loss name(s) of "
                                       "vlmalign.losses.preference.PREFERENCE_LOSSES: a list, a name, or "
                                       "comma-separated names (e.g. 'sigmoid,bco_pair,sft' = MPO with its weights)."})
    loss_weights: list[float] | None = field(default=None, metadata={"help": "One weight per loss_type "
                                             "(default 1.0 each). CLI: --loss_weights 0.8 0.2 1.0 (in Python a "
                                             "comma-separated string works too)."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Preference-flip rate: cDPO for 'sigmoid', "
                                   "robust DPO, EXO's epsilon (exo_pair needs > 0, e.g. 1e-3)."})
    discopop_tau: float = field(default=0.05, metadata={"help": "Temperature of the 'discopop' loss."})
    use_bco_running_mean: bool = field(default=True, metadata={"help": "Shift bco_pair's rewards by the running "
                                       "mean delta of all rewards (BCO / MPO papers, TRL <= 0.28). False: delta = 0 "
                                       "(TRL 1.16)."})
    precompute_ref_log_probs: bool = field(default=False, metadata={"help": "Compute the reference log-probs of "
                                           "every train/eval row once before training and keep no reference model "
                                           "(image datasets supported)."})
    precompute_ref_batch_size: int | None = field(default=None, metadata={"help": "Rows per forward when "
                                                  "precomputing (default: per_device_train_batch_size)."})
    shared_prefix: bool = field(default=True, metadata={"help": "Run each prompt and its images once for its "
                                "chosen and rejected answers (policy and reference passes); same values and "
                                "gradients as repeating the prompt."})
    learning_rate: float = 1e-6
    remove_unused_columns: bool = True

    def __post_init__(self):
        check_trl_arguments(self)
        self._check_dpo_arguments()
        if self.loss_type is None:  # a parser or YAML that leaves the field unset: TRL's default
            self.loss_type = ["sigmoid"]
        self.loss_type = _split(self.loss_type)  # "a,b", ["a", "b"] and the CLI's ["a,b"] all become ["a", "b"]
        unknown = [t for t in self.loss_type if t not in PREFERENCE_LOSSES]
        not_here = [t for t in unknown if t in TRL_ONLY_LOSSES]
        if not_here:
            raise ValueError(f"loss_type {not_here} (TRL 1.16) is not implemented in vlmalign; implemented: "
                             f"{sorted(PREFERENCE_LOSSES)}")
        if not self.loss_type or unknown:
            raise ValueError(f"unknown loss_type {unknown or self.loss_type}; valid: {sorted(PREFERENCE_LOSSES)}")
        if self.loss_weights is not None:
            self.loss_weights = [float(w) for w in _split(self.loss_weights)]
            if len(self.loss_weights) != len(self.loss_type):
                raise ValueError(f"loss_weights has {len(self.loss_weights)} entries for loss_type {self.loss_type}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        super().__post_init__()


class _Shard:
    """The rows of `rows` at `positions` (one process's share of a precompute)."""

    def __init__(self, rows, positions):
        self.rows, self.positions = rows, list(positions)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> dict:
        return self.rows[self.positions[i]]


@dataclass
class DPOCollator(PreferenceCollator):
    """`PreferenceCollator` + the rows' precomputed reference log-probs, when they carry them ([B] each)."""

    use_ref_columns: bool = False  # only with precompute_ref_log_probs: stray columns never become the reference

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().__call__(rows)
        if self.use_ref_columns and all(k in rows[0] for k in _REF_KEYS):
            for key in _REF_KEYS:
                batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.float32)
        return batch


class DPOTrainer(VLMTrainer):
    """`DPOTrainer(model=..., ref_model=None, args=DPOConfig(...), train_dataset=..., processing_class=...,
    peft_config=...)`.

    Rows: `prompt` / `chosen` / `rejected` (or implicit-prompt `chosen` / `rejected`) + `images` / `image`.
    Reference: `ref_model` if given; with PEFT the policy with adapters disabled (no copy); with
    `precompute_ref_log_probs` none (log-probs computed once up front); otherwise a frozen copy of the policy."""

    data_kind = "preference"
    model_accepts_loss_kwargs = False
    loss_is_scaled_for_ga = False   # batch-mean loss: the Trainer divides by the accumulation steps

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None, callbacks=None, **kwargs):
        args = args if args is not None else DPOConfig(output_dir="dpo-output")
        # read by make_collator, which runs inside super().__init__; padding_free packs the plain batch instead
        self._shared_prefix = args.shared_prefix and not args.padding_free
        self._use_ref_columns = args.precompute_ref_log_probs
        for name, data in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            stray = [k for k in _REF_KEYS if k in (_column_names(data) or ())]
            if stray:
                logger.warning("%s has the columns %s; they are ignored: the reference log-probs are %s", name, stray,
                               "recomputed up front (precompute_ref_log_probs=True)" if args.precompute_ref_log_probs
                               else "computed by the reference model at every step (precompute_ref_log_probs=False)")
        super().__init__(model, args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, peft_config=peft_config, callbacks=callbacks, **kwargs)
        precompute = args.precompute_ref_log_probs
        if precompute and any(is_zero3_partitioned(p) for p in self.model.parameters()):
            raise ValueError("precompute_ref_log_probs=True cannot run under DeepSpeed ZeRO-3: the precompute runs "
                             "before DeepSpeed builds its engine, while the loaded weights are already partitioned. "
                             "Set precompute_ref_log_probs=False (the reference then runs partitioned alongside the "
                             "policy) or use ZeRO-2 / FSDP2.")
        self.ref_model = make_reference_model(self.model, args, ref_model, None if precompute else self.accelerator)
        if self.ref_model is not None:
            self.balance_vision(self.ref_model)
        self.running_mean = RunningMeanDelta()
        if precompute:
            self._precompute_reference()
            self.ref_model = None  # a given ref_model was used once (on the policy's device); none is kept

    def make_collator(self):
        return DPOCollator(self.encoder, shared_prefix=self._shared_prefix,
                           use_ref_columns=self._use_ref_columns)

    # -------------------------------------------------------------------------------------------- reference

    def _precompute_reference(self) -> None:
        size = self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size

        acc = self.accelerator
        rank, world = acc.process_index, acc.num_processes

        def attach(rows, name):
            if rows is None or isinstance(rows, RowsWithReferenceLogps):
                return rows
            # each process computes every world-th row, then the tables are merged on every process
            shard = _Shard(rows, range(rank, len(rows), world)) if world > 1 else rows
            table = precompute_reference_logps(self.model, self.ref_model, shard, self.data_collator,
                                               batch_size=size, desc=f"reference log-probs ({name})")
            if world > 1:
                table = {k: v for part in gather_object([table]) for k, v in part.items()}
            return RowsWithReferenceLogps(rows, table)

        self.train_dataset = attach(self.train_dataset, "train")
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {k: attach(v, k) for k, v in self.eval_dataset.items()}
        else:
            self.eval_dataset = attach(self.eval_dataset, "eval")

    # ------------------------------------------------------------------------------------------------- loss

    @property
    def uses_bco_delta(self) -> bool:
        return "bco_pair" in self.args.loss_type and self.args.use_bco_running_mean

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        precomputed = [inputs.pop(k, None) for k in _REF_KEYS]
        packed = self.args.padding_free
        if packed and not getattr(self, "_packing_logged", False) and packing_unsupported(model) is not None:
            self._packing_logged = True
            logger.info("padding_free: %s; running padded batches", packing_unsupported(model))
        with self.router_aux.policy_pass(model) as routers:                 # MoE load balancing (policy only)
            logps, lengths = batch_sequence_logps(model, inputs, padding_free=packed)   # [2B] each
        if precomputed[0] is not None:
            ref_chosen, ref_rejected = (t.to(logps) for t in precomputed)
        else:
            ref = reference_logps(model, self.ref_model, inputs, padding_free=packed).to(logps)  # [2B]
            ref_chosen, ref_rejected = ref.chunk(2)
        chosen, rejected = logps.chunk(2)
        chosen_lengths, rejected_lengths = lengths.chunk(2)
        beta = self.args.beta
        if self.uses_bco_delta and model.training:
            rewards = beta * torch.cat([chosen - ref_chosen, rejected - ref_rejected]).detach()
            self.running_mean.update(self.accelerator.gather(rewards))      # before the loss, as TRL <= 0.28
        delta = self.running_mean.value if self.uses_bco_delta else 0.0
        loss, parts = combined_preference_loss(
            self.args.loss_type, self.args.loss_weights,
            chosen_logps=chosen, rejected_logps=rejected, ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected,
            beta=beta, label_smoothing=self.args.label_smoothing, reward_shift=delta,
            discopop_tau=self.args.discopop_tau,
            chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
        )
        loss = self.router_aux.add(self, loss, routers)  # the Trainer divides the loss by the accumulation steps
        metrics = dpo_reward_metrics(chosen, rejected, ref_chosen, ref_rejected, beta)
        metrics.update({f"loss/{name}": value for name, value in parts.items()})
        for name, value in metrics.items():
            self.record(name, self.accelerator.gather(value.detach().float()).mean())
        if "bco_pair" in self.args.loss_type:
            self.record("bco_delta", delta)
        return (loss, {"loss": loss.detach()}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ------------------------------------------------------------------------------------- checkpoint state
    # The running mean is listed in `_resumable_attrs`: VLMTrainer saves it in each checkpoint's
    # vlmalign_state.json and restores it on resume (every resume path).
    _resumable_attrs = ("bco_running_mean",)

    @property
    def bco_running_mean(self) -> dict:
        return self.running_mean.state_dict()

    @bco_running_mean.setter
    def bco_running_mean(self, state: dict) -> None:
        self.running_mean.load_state_dict(state)
