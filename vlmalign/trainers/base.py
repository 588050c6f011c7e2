"""What every vlmalign trainer shares: the config fields, model / processor / PEFT set-up, data preparation, metric
logging and saving. The method trainers (sft.py, dpo.py, grpo.py) add their loss and nothing else.

Reliability (docs/reliability.md), for every trainer through `VLMTrainer`:

* atomic checkpoints, resumable counters and the output folder's lock (saving.py, `SavingMixin`);
* a non-finite loss or gradient stops training, or skips the step (guards.py, `GuardMixin`, ``nonfinite_policy``);
* per-step metrics averaged over the logging window (metrics.py, `MetricsMixin`);
* model loading, freezing, dropout and PEFT (setup.py, `prepare_model`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import enable_full_determinism, set_seed

from ..data.collate import Encoder
from ..data.dataset import prepare_rows
from ..data.sources import shuffled, source_rows
from .engines import clean_exit, cpu_engines
from .engines.checks import check_engine
from ..models import vision_balance
from ..models.forward import unwrap_model
from ..models.loading import load_processor
from . import run_dir as runs
from .config_check import check_field_types
from .router_loss import RouterAuxLoss
from .guards import POLICIES, GuardMixin, NonFiniteGuard
from .metrics import MetricsMixin
from .saving import SavingMixin, VLMALIGN_STATE_NAME  # noqa: F401 (VLMALIGN_STATE_NAME: re-exported)
from .setup import lora_target_modules, prepare_model  # noqa: F401 (lora_target_modules: re-exported)

logger = logging.getLogger(__name__)


@dataclass
class BaseConfig(TrainingArguments):
    """Fields shared by every vlmalign config (on top of `transformers.TrainingArguments`)."""

    max_length: int | None = field(default=1024, metadata={"help": "Longest sequence (image tokens included). Longer "
                                   "rows are dropped or rejected (truncation_policy), never cut inside an image."})
    truncation_policy: str = field(default="drop", metadata={"help": "'drop' (count and log) or 'raise'."})
    freeze_vision_tower: bool = field(default=False, metadata={"help": "Freeze the vision encoder."})
    freeze_projector: bool = field(default=False, metadata={"help": "Freeze the vision->text projector."})
    lora_include_vision: bool = field(default=False, metadata={"help": "Also put LoRA adapters on the vision tower "
                                      "and projector (default: language model only)."})
    model_init_kwargs: dict | None = field(default=None, metadata={"help": "kwargs for from_pretrained when "
                                                 "the model is given as a path (e.g. {'dtype': 'bfloat16'})."})
    max_image_pixels: int | None = field(default=None, metadata={"help": "Decompression-bomb limit per image "
                                         "(default: PIL's)."})
    disable_dropout: bool = field(default=True, metadata={"help": "Set every dropout probability to 0."})
    nonfinite_policy: str = field(default="raise", metadata={"help": "On a non-finite loss or gradient: 'raise' "
                                  "(stop, naming the step; weights untouched) or 'skip' (drop that optimizer step, "
                                  "count it in the metric nonfinite_skipped)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Start a new run in an output_dir that "
                                       "holds another run's checkpoints (they are moved to previous-runs/, never "
                                       "deleted). Without it such a start is refused."})
    checkpoint_fsync: bool = field(default=True, metadata={"help": "fsync checkpoint files before the atomic "
                                   "rename (survives power loss, not only a killed process)."})
    # Defaults that differ from TrainingArguments
    logging_steps: float = 10
    report_to: None | str | list[str] = "none"
    remove_unused_columns: bool = False  # SFTConfig / DPOConfig: True, as in TRL (data/sources.py says what it does)
    save_only_model: bool = False

    def __post_init__(self):
        if isinstance(self.model_init_kwargs, str):
            import json
            self.model_init_kwargs = json.loads(self.model_init_kwargs)
        check_field_types(self)  # a wrong type stops here, naming the field, not deep inside training
        if getattr(self, "trust_remote_code", False):  # TRL's field (trl_fields.py): model and processor
            self.model_init_kwargs = {**(self.model_init_kwargs or {}), "trust_remote_code": True}
        if self.truncation_policy not in ("drop", "raise"):
            raise ValueError(f"truncation_policy must be 'drop' or 'raise', got {self.truncation_policy!r}")
        if self.nonfinite_policy not in POLICIES:
            raise ValueError(f"nonfinite_policy must be one of {POLICIES}, got {self.nonfinite_policy!r}")
        if self.nonfinite_policy == "skip" and (self.deepspeed or cpu_engines.requested_engine() == "deepspeed"):
            # accelerate's DeepSpeed wrapper runs engine.step() inside backward, before Trainer's clipping hook where
            # the guard looks: the step cannot be skipped there (docs/reliability.md).
            raise ValueError("nonfinite_policy='skip' is not available under DeepSpeed: the DeepSpeed engine steps "
                             "the optimizer inside backward, before the guard runs, so the step cannot be skipped. "
                             "Use nonfinite_policy='raise' (training stops, naming the step).")
        check_engine(self)
        if cpu_engines.engage() and cpu_engines.requested_engine() == "deepspeed":
            self.use_cpu = False  # accelerate skips DeepSpeed for cpu=True; without an accelerator it is CPU anyway
        super().__post_init__()


class VLMTrainer(GuardMixin, SavingMixin, MetricsMixin, Trainer):
    """transformers.Trainer + vlmalign's model, processor and data set-up. Subclasses set `data_kind` and build
    their collator in `make_collator`.

    Subclasses that add files to a checkpoint override `_save_checkpoint` as usual (call super(), then write into
    ``os.path.join(self._get_output_dir(trial), f"checkpoint-{self.state.global_step}")``): the override is made
    atomic automatically. Plain JSON-able counters a resumed run needs can instead be listed in
    `_resumable_attrs` (saved in vlmalign_state.json, restored on resume)."""

    data_kind: str = "sft"

    def __init__(
        self,
        model,
        args: BaseConfig,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        peft_config=None,
        callbacks=None,
        quantization_config=None,
        **kwargs: Any,
    ):
        if quantization_config is not None:  # TRL's GRPOTrainer keyword: load the model (a path) quantized
            args.model_init_kwargs = {**(args.model_init_kwargs or {}), "quantization_config": quantization_config}
        model_path = model if isinstance(model, (str, Path)) else getattr(model, "name_or_path", None)
        # Seed before anything random is built (LoRA adapters' initialisation), as Trainer seeds itself later:
        # otherwise two runs of one config in a process start from different adapters.
        enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
        model, self.family = prepare_model(model, args, peft_config)
        self.router_aux = RouterAuxLoss(model, getattr(args, "router_aux_loss_coef", None))  # MoE: router_loss.py
        if processing_class is None:
            if not model_path:
                raise ValueError("processing_class is required when the model was not loaded from a path")
            remote = bool((args.model_init_kwargs or {}).get("trust_remote_code", False))
            processing_class = load_processor(model_path, **({"trust_remote_code": True} if remote else {}))
        self.encoder = Encoder(processing_class, self.family, self.family.image_token_id(unwrap_model(model)))
        self.balance_vision(model)
        prep = dict(max_length=args.max_length, truncation_policy=args.truncation_policy,
                    max_image_pixels=args.max_image_pixels)
        rows_needed = self._stream_rows_needed(args)

        def prepare(dataset, name):
            dataset = source_rows(dataset, self.data_kind, name=name, rows_needed=rows_needed,
                                  remove_unused_columns=bool(args.remove_unused_columns))
            if name == "train_dataset" and self.data_kind == "sft" and getattr(args, "shuffle_dataset", False):
                dataset = shuffled(dataset, args.seed)  # SFTConfig.shuffle_dataset: once, before training (TRL)
            return prepare_rows(dataset, self.data_kind, self.encoder, name=name, **prep)

        train_dataset = prepare(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: prepare(v, k) for k, v in eval_dataset.items()}
        else:
            eval_dataset = prepare(eval_dataset, "eval_dataset")
        self._init_metrics()
        self._guard = NonFiniteGuard(getattr(args, "nonfinite_policy", "raise"))
        self._guard_verdict = None
        self._ckpt_push_pending = False
        super().__init__(
            model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
            processing_class=processing_class, data_collator=self.make_collator(), callbacks=callbacks, **kwargs,
        )
        # Trainer.__init__ sets this from the model class (Qwen2.5-VL declares `accepts_loss_kwargs = False`, the
        # others are read off their forward signature), but it must follow *our* loss: whether compute_loss
        # normalises over the accumulated batch (num_items_in_batch). Left to the model, SFT on Qwen2.5-VL
        # multiplied loss and gradients by the accumulation count.
        ours = [vars(c)["model_accepts_loss_kwargs"] for c in type(self).__mro__
                if issubclass(c, VLMTrainer) and "model_accepts_loss_kwargs" in vars(c)]
        if ours:
            self.model_accepts_loss_kwargs = ours[0]
        if args.world_size > 1:
            clean_exit.register()   # no gloo teardown at interpreter finalisation (distributed/clean_exit.py)

    def balance_vision(self, model) -> None:
        """Install the zero-weighted vision pass for image-free batches on `model` (policy or reference), so a
        process whose batch has only text rows runs the same collectives as the others (models/vision_balance.py)."""
        base = unwrap_model(model)
        if not hasattr(base, "get_image_features"):
            return
        from PIL import Image

        blank = Image.new("RGB", (56, 56), (127, 127, 127))
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "."}]}]
        try:
            batch = self.encoder.encode([conversation], [[blank]], add_generation_prompt=True, with_labels=False)
        except Exception as err:  # a processor that cannot encode a blank image: no balance, say so
            logger.warning("no zero-weighted vision pass for text-only batches (%s)", err)
            return
        vision_balance.install(base, vision_balance.vision_kwargs(batch, base))

    def make_collator(self):  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def _stream_rows_needed(args) -> int | None:
        """Rows a streaming train dataset must yield: max_steps x the global batch (None without max_steps)."""
        if args.max_steps is None or args.max_steps <= 0:
            return None
        return args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size

    # remove_unused_columns is applied to the user's columns before validation (data/sources.py); the rows the
    # collators receive are vlmalign's normalised rows, which Trainer's signature-based removal must not touch.
    def _remove_unused_columns(self, dataset, description=None):
        return dataset

    def _get_collator_with_removed_columns(self, data_collator, description=None):
        return data_collator

    # ------------------------------------------------------------------------------------- training loop

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None,
              **kwargs):
        """`Trainer.train`, holding the output folder's lock (run_dir.py: one run per folder; another run's
        checkpoints are neither reused nor deleted), with staging directories of interrupted saves removed first, and
        ``resume_from_checkpoint=True`` resolved to the last checkpoint that passes `ckpt.checkpoint_problem` (also
        the strings "true" / "last", as the CLI's ``--resume_from_checkpoint`` passes them, unless such a path
        exists)."""
        if (isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.lower() in ("true", "last")
                and not os.path.exists(resume_from_checkpoint)):
            resume_from_checkpoint = True
        if resume_from_checkpoint is False:
            resume_from_checkpoint = None
        self._run_lock = None
        self.run_id = None
        try:
            resume_from_checkpoint = self._claim_output_dir(resume_from_checkpoint)
            self._guard.reset()
            self._guard.skipped = 0
            self._guard_verdict = None
            return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                                 ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        finally:
            if self.args.should_save:
                runs.release_lock(self._run_lock, self.run_id)
