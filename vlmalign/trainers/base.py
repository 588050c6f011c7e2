"""What every vlmalign trainer shares: the config fields, model / processor / PEFT set-up, data preparation, metric
logging and saving. The method trainers (sft.py, dpo.py, grpo.py) add their loss and nothing else.

Reliability (docs/reliability.md), for every trainer through `VLMTrainer`:

* atomic checkpoints (checkpoint.py): written under ``.tmp-checkpoint-N/`` and renamed to ``checkpoint-N`` when
  complete, subclass additions included (any `_save_checkpoint` override is wrapped, see `__init_subclass__`);
* a non-finite loss or gradient stops training, or skips the step (guards.py, ``nonfinite_policy``);
* counters a resumed run needs (`_resumable_attrs`) are saved in ``vlmalign_state.json`` in each checkpoint.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, enable_full_determinism, set_seed

from ..data.collate import Encoder
from ..data.dataset import prepare_rows
from ..data.sources import shuffled, source_rows
from ..distributed import clean_exit, cpu_engines
from ..distributed.gather import zero3_engine
from ..distributed.checks import check_engine
from ..models.families import Family, get_family
from ..models import patch_embed, vision_balance
from ..models.forward import unwrap_model
from ..models.loading import load_model, load_processor, save_processor
from ..models.quantization import check_quantized_loading
from . import checkpoint as ckpt
from . import run_dir as runs
from .config_check import check_field_types
from .guards import POLICIES, NonFiniteError, NonFiniteGuard

logger = logging.getLogger(__name__)

VLMALIGN_STATE_NAME = "vlmalign_state.json"
TRAINING_ARGS_NAME = "training_args.bin"   # what Trainer writes (a pickle); replaced by:
TRAINING_ARGS_JSON = "training_args.json"
PICKLE_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin")


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
        check_engine(self)
        if cpu_engines.engage() and cpu_engines.requested_engine() == "deepspeed":
            self.use_cpu = False  # accelerate skips DeepSpeed for cpu=True; without an accelerator it is CPU anyway
        super().__post_init__()


def _disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "text_config", None), getattr(config, "vision_config", None)):
        for key in ("attention_dropout", "hidden_dropout", "dropout"):
            if cfg is not None and hasattr(cfg, key) and isinstance(getattr(cfg, key), float):
                setattr(cfg, key, 0.0)


def lora_target_modules(model: torch.nn.Module, family: Family, include_vision: bool) -> list[str]:
    """Full names of the Linear layers LoRA should wrap: the language model's (and the vision tower's and projector's
    when asked); never the LM head."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        is_vision = family.is_vision_param(name) or family.is_projector_param(name)
        if is_vision and not include_vision:
            continue
        names.append(name)
    return names


def prepare_model(model, args: BaseConfig, peft_config=None) -> tuple[torch.nn.Module, Family]:
    """Load (if a path), freeze what is asked, disable dropout, wrap with PEFT."""
    init_kwargs = dict(args.model_init_kwargs or {})
    if isinstance(model, (str, Path)):
        check_quantized_loading(init_kwargs.get("quantization_config"), peft_config is not None)
    elif init_kwargs.get("quantization_config") is not None:
        raise ValueError("model_init_kwargs['quantization_config'] applies only when the model is given as a path; "
                         "this model is already loaded")
    model = load_model(model, **init_kwargs)
    family = get_family(model)
    patch_embed.install(model)   # one-patch Conv3d (Qwen-VL towers) as one matrix product (models/patch_embed.py)
    if args.disable_dropout:
        _disable_dropout(model)
    for name, param in model.named_parameters():
        if (args.freeze_vision_tower and family.is_vision_param(name)) or (
            args.freeze_projector and family.is_projector_param(name)
        ):
            param.requires_grad_(False)
    if peft_config is not None:
        from peft import get_peft_model

        if getattr(peft_config, "target_modules", None) in (None, "all-linear"):
            peft_config.target_modules = lora_target_modules(model, family, args.lora_include_vision)
        if args.gradient_checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(model, peft_config)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters (every parameter is frozen): nothing would be "
                         "trained. Check freeze_vision_tower / freeze_projector, or a PEFT model loaded without "
                         "is_trainable=True")
    return model, family


class MetricsMixin:
    """Collect per-step metrics (averaged over the logging window) and merge them into the Trainer's logs."""

    def _init_metrics(self):
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def record(self, name: str, value: float | torch.Tensor) -> None:
        mode = "train" if self.model.training else "eval"
        if isinstance(value, torch.Tensor):
            value = value.detach().float().mean().item()
        self._metrics[mode][name].append(float(value))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if "loss" in logs or not any(k.startswith("eval_") for k in logs) else "eval"
        metrics = {k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v}
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        logs = {**logs, **metrics}
        self._metrics[mode].clear()
        super().log(logs, start_time)


def _atomic_checkpoint(save_checkpoint):
    """Make a `_save_checkpoint` implementation atomic. The outermost call (the most derived override, which
    Trainer calls) stages the whole save, its `super()` chain and additions included; inner calls pass through."""
    if getattr(save_checkpoint, "_vlmalign_atomic", False):
        return save_checkpoint

    @functools.wraps(save_checkpoint)
    def wrapper(self, model, trial, *args, **kwargs):
        if getattr(self, "_ckpt_staging", None) is not None:
            return save_checkpoint(self, model, trial, *args, **kwargs)
        return self._staged_save(functools.partial(save_checkpoint, self, model, trial, *args, **kwargs), trial)

    wrapper._vlmalign_atomic = True
    return wrapper


class VLMTrainer(MetricsMixin, Trainer):
    """transformers.Trainer + vlmalign's model, processor and data set-up. Subclasses set `data_kind` and build
    their collator in `make_collator`.

    Subclasses that add files to a checkpoint override `_save_checkpoint` as usual (call super(), then write into
    ``os.path.join(self._get_output_dir(trial), f"checkpoint-{self.state.global_step}")``): the override is made
    atomic automatically. Plain JSON-able counters a resumed run needs can instead be listed in
    `_resumable_attrs` (saved in vlmalign_state.json, restored on resume)."""

    data_kind: str = "sft"
    _resumable_attrs: tuple[str, ...] = ()
    _ckpt_staging: str | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("_save_checkpoint")
        if own is not None:
            cls._save_checkpoint = _atomic_checkpoint(own)

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
        self._guard_checked, self._guard_verdict = False, None
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
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`, so that the folder loads with `from_pretrained` (config, processor and full weights;
        the adapter under PEFT) from every engine: under FSDP with ``SHARDED_STATE_DICT`` (where transformers writes
        nothing) and under ZeRO-3 the full weights are gathered to the main process. Checkpoints keep the engine's
        own sharded files for resuming as well."""
        if self.is_fsdp_enabled and "FULL_STATE_DICT" not in str(self.accelerator.state.fsdp_plugin.state_dict_type):
            output_dir = output_dir or self.args.output_dir
            state_dict = self.accelerator.get_state_dict(self.model)   # collective: every process takes part
            self._save(output_dir, state_dict=state_dict)
            if self.args.push_to_hub and not _internal_call:
                self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
            return
        engine = zero3_engine(self.accelerator)
        if engine is not None:
            # Gather and save the model's own state_dict (also with stage3_gather_16bit_weights_on_model_save off).
            import deepspeed

            output_dir = output_dir or self.args.output_dir
            with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
                state_dict = ({k: v.detach().clone() for k, v in engine.module.state_dict().items()}
                              if self.args.should_save else None)
            if self.args.should_save:
                # A model loaded under zero.Init records weight conversions that, reverted at save time, put an
                # extra prefix on every key (model.model.embed_tokens): save with the family's default mapping.
                base = unwrap_model(engine.module)
                recorded = base.__dict__.pop("_weight_conversions", None)
                try:
                    self._save(output_dir, state_dict=state_dict)
                finally:
                    if recorded is not None:
                        base._weight_conversions = recorded
            if self.args.push_to_hub and not _internal_call:
                self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
            return
        super().save_model(output_dir, _internal_call)

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        # Trainer pickles the whole TrainingArguments object as training_args.bin: keep a JSON copy instead, so no
        # pickle file is left in any output folder.
        pickled = os.path.join(output_dir, TRAINING_ARGS_NAME)
        if os.path.isfile(pickled):
            os.remove(pickled)
        with open(os.path.join(output_dir, TRAINING_ARGS_JSON), "w", encoding="utf-8") as f:
            f.write(self.args.to_json_string())
        save_processor(self.processing_class, output_dir)
        stale = [name for name in PICKLE_WEIGHT_FILES if os.path.exists(os.path.join(output_dir, name))]
        if stale:  # transformers 5 writes safetensors only: these come from an earlier run in the same directory
            logger.warning("%s holds pickle weight files not written by this save: %s", output_dir, stale)

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
            self._guard_checked, self._guard_verdict = False, None
            return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                                 ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        finally:
            if self.args.should_save:
                runs.release_lock(self._run_lock, self.run_id)

    def _claim_output_dir(self, resume_from_checkpoint):
        """Lock the output folder, pick and check the checkpoint to resume from, and fix this run's identity
        (run_dir.py). Decided on the main process; every process raises the same error."""
        error, resolved, run_id = None, resume_from_checkpoint, None
        if self.args.should_save:
            try:
                out = self.args.output_dir
                self._run_lock = runs.acquire_lock(out, "pending")
                ckpt.remove_stale_staging(out, " at the start of training")
                need_optimizer = not (self.args.save_only_model or self.is_deepspeed_enabled or self.is_fsdp_enabled)
                resolved, run_id = runs.resolve_resume(
                    out, resume_from_checkpoint, unwrap_model(self.model).config, need_optimizer=need_optimizer,
                    overwrite=getattr(self.args, "overwrite_output_dir", False))
                runs.update_lock(self._run_lock, run_id)
            except (runs.OutputDirInUseError, ckpt.CheckpointMismatchError, ValueError) as e:
                if self._run_lock is not None:
                    runs.release_lock(self._run_lock, "pending")
                    self._run_lock = None
                error = e
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list
            shared = [None if error is None else (type(error), str(error)), resolved, run_id]
            broadcast_object_list(shared)
            error = error if error is not None or shared[0] is None else shared[0][0](shared[0][1])
            resolved, run_id = shared[1], shared[2]
        self.accelerator.wait_for_everyone()
        if error is not None:
            raise error
        self.run_id = run_id
        return resolved

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._guard.record_loss(loss)  # checked at the optimizer step (one sync per step)
        return loss

    def _check_before_optimizer_step(self) -> None:
        """Run the non-finite guard once per optimizer step, before clipping; raise or drop the step's gradients."""
        if self._guard_checked:
            return
        self._guard_checked = True
        # Under fp16 a GradScaler skips steps with inf/NaN gradients (and lowers its scale) by design: only the
        # loss is checked then.
        check_grads = getattr(self.accelerator, "scaler", None) is None
        reduce = None
        if self.accelerator.num_processes > 1:
            reduce = functools.partial(self.accelerator.reduce, reduction="sum")
        verdict = self._guard.check(self.model.named_parameters(), check_grads=check_grads, reduce=reduce,
                                    device=self.args.device if reduce is not None else None)
        self._guard_verdict = verdict
        if verdict is None:
            return
        step = self.state.global_step + 1
        what = verdict.describe(step)
        if self._guard.policy == "raise":
            raise NonFiniteError(
                f"{what[0].upper()}{what[1:]}. The optimizer step was not taken: the weights are those after step "
                f"{step - 1}. Set nonfinite_policy='skip' to skip such steps instead.",
                step=step, kind=verdict.kind, parameter=verdict.parameter)
        self._drop_gradients()
        self._guard.skipped += 1
        logger.warning("%s: optimizer step skipped (%d so far)", what, self._guard.skipped)

    def _drop_gradients(self) -> None:
        """Make the coming optimizer.step() a no-op: optimizers leave parameters without a gradient untouched
        (moments, step counts and weight decay included). Under a GradScaler, fill them with NaN instead: the
        scaler then skips the step itself (it asserts that it saw gradients)."""
        scaler = getattr(self.accelerator, "scaler", None)
        params = list(self.model.parameters())
        if self.optimizer is not None:
            params += [p for group in self.optimizer.param_groups for p in group["params"]]
        for param in params:
            if param.grad is not None:
                if scaler is not None:
                    param.grad.fill_(float("nan"))
                else:
                    param.grad = None

    def _clip_grad_norm(self, model):
        self._check_before_optimizer_step()
        if self._guard_verdict is not None:  # skipped step: nothing to clip
            return torch.tensor(self._guard_verdict.grad_norm)
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        self._check_before_optimizer_step()  # no-op when _clip_grad_norm ran it
        verdict, self._guard_checked, self._guard_verdict = self._guard_verdict, False, None
        if verdict is not None:
            return verdict.grad_norm
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._guard.policy == "skip" and ("loss" in logs or "train_loss" in logs):
            logs = {**logs, "nonfinite_skipped": self._guard.skipped}
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------- checkpoints

    def _resumable_state(self) -> dict:
        state = {"nonfinite_skipped": self._guard.skipped, "run_id": getattr(self, "run_id", None)}
        state.update({name: getattr(self, name) for name in self._resumable_attrs if hasattr(self, name)})
        return state

    @_atomic_checkpoint
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, VLMALIGN_STATE_NAME), "w", encoding="utf-8") as f:
                json.dump(self._resumable_state(), f, indent=2, sort_keys=True)

    def _load_optimizer_and_scheduler(self, checkpoint):
        # Called on every resume path (plain, DDP, FSDP, DeepSpeed).
        super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, VLMALIGN_STATE_NAME) if checkpoint else None
        if path and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                state = json.load(f)
            self._guard.skipped = int(state.pop("nonfinite_skipped", 0))
            state.pop("run_id", None)
            for name, value in state.items():
                if name in self._resumable_attrs:
                    setattr(self, name, value)

    def _plain_pretrained_model(self, model=None):
        """The unwrapped model when it is a plain (non-PEFT) PreTrainedModel trained without FSDP / DeepSpeed."""
        from transformers import PreTrainedModel

        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return None
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        return model if isinstance(model, PreTrainedModel) else None

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # transformers 5.23 resumes with a raw load_state_dict of a file saved in the hub key layout: for models
        # with a conversion mapping (Qwen2-VL, LLaVA, Gemma3, ...) nothing loads (see checkpoint.needs_key_conversion).
        target = self._plain_pretrained_model(model)
        if target is not None and ckpt.needs_key_conversion(target, resume_from_checkpoint):
            logger.info("Loading model weights from %s with the model's key conversion", resume_from_checkpoint)
            ckpt.load_converted_weights(target, resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        best = self.state.best_model_checkpoint
        target = self._plain_pretrained_model()
        if best and target is not None and ckpt.needs_key_conversion(target, best):
            logger.info("Loading best model from %s (score: %s) with the model's key conversion", best,
                        self.state.best_metric)
            ckpt.load_converted_weights(target, best)
            return
        super()._load_best_model()

    def _get_output_dir(self, trial) -> str:
        # While a checkpoint is being written, Trainer (and subclass overrides) build its folder as
        # os.path.join(self._get_output_dir(trial), "checkpoint-N"): that lands in the staging directory.
        if self._ckpt_staging is not None:
            return self._ckpt_staging
        return super()._get_output_dir(trial)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if self._ckpt_staging is not None:  # push the published folder, after the rename
            self._ckpt_push_pending = True
            return
        super()._push_from_checkpoint(checkpoint_folder)

    def _staged_save(self, save, trial) -> None:
        """Write a checkpoint into ``<run_dir>/.tmp-checkpoint-N/checkpoint-N`` with `save()` (the full
        `_save_checkpoint` chain), then rename it to ``<run_dir>/checkpoint-N``, then rotate old checkpoints."""
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        root = ckpt.staging_root(run_dir, self.state.global_step)
        staged, final = os.path.join(root, name), os.path.join(run_dir, name)
        if self.args.should_save:
            ckpt.remove_stale_staging(run_dir)
        self.accelerator.wait_for_everyone()  # nobody writes into a staging directory being removed
        self._ckpt_staging, self._ckpt_push_pending = root, False
        try:
            save()
            self.accelerator.wait_for_everyone()  # every process has written its files (RNG states, shards)
        except BaseException as error:
            if self.args.should_save:
                shutil.rmtree(root, ignore_errors=True)
            if ckpt.is_disk_full(error, run_dir):
                raise OSError(errno.ENOSPC, f"No space left on the disk of {run_dir} while writing checkpoint {name} "
                              f"({type(error).__name__}: {error}). The partial checkpoint was removed; the earlier "
                              f"checkpoints are intact. Free space (or lower save_total_limit) and resume with "
                              f"resume_from_checkpoint=True.") from error
            raise
        finally:
            self._ckpt_staging = None
        best = self.state.best_model_checkpoint
        if best is not None and os.path.abspath(best).startswith(os.path.abspath(root) + os.sep):
            self.state.best_model_checkpoint = os.path.join(run_dir, os.path.relpath(best, root))
        if self.args.should_save:
            if os.path.isdir(staged):
                ckpt.fix_state_paths(staged, root, run_dir)
                ckpt.publish(staged, final, fsync=getattr(self.args, "checkpoint_fsync", True))
                logger.info("Checkpoint %s complete", final)
            else:
                shutil.rmtree(root, ignore_errors=True)
            # Trainer rotated inside the staging directory (a no-op there): rotate the real one, after the new
            # checkpoint is complete.
            if getattr(self, "run_id", None) is not None:  # only this run's checkpoints are ever deleted
                runs.rotate_own_checkpoints(run_dir, self.args.save_total_limit, self.run_id,
                                               self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()  # the checkpoint is published before anyone goes on
        if self._ckpt_push_pending:
            self._ckpt_push_pending = False
            super()._push_from_checkpoint(final)
