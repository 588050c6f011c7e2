"""What every vlmalign trainer shares: the config fields, model / processor / PEFT set-up, data preparation, metric
logging and saving. The method trainers (sft.py, dpo.py, grpo.py) add their loss and nothing else."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from ..data.collate import Encoder
from ..data.dataset import prepare_rows
from ..models.families import Family, get_family
from ..models.forward import unwrap_model
from ..models.loading import load_model, load_processor, save_processor

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
    # Defaults that differ from TrainingArguments
    logging_steps: float = 10
    report_to: None | str | list[str] = "none"
    remove_unused_columns: bool = False
    save_only_model: bool = False

    def __post_init__(self):
        if isinstance(self.model_init_kwargs, str):
            import json
            self.model_init_kwargs = json.loads(self.model_init_kwargs)
        if self.truncation_policy not in ("drop", "raise"):
            raise ValueError(f"truncation_policy must be 'drop' or 'raise', got {self.truncation_policy!r}")
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
    model = load_model(model, **(args.model_init_kwargs or {}))
    family = get_family(model)
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


class VLMTrainer(MetricsMixin, Trainer):
    """transformers.Trainer + vlmalign's model, processor and data set-up. Subclasses set `data_kind` and build
    their collator in `make_collator`."""

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
        **kwargs: Any,
    ):
        model_path = model if isinstance(model, (str, Path)) else getattr(model, "name_or_path", None)
        model, self.family = prepare_model(model, args, peft_config)
        if processing_class is None:
            if not model_path:
                raise ValueError("processing_class is required when the model was not loaded from a path")
            processing_class = load_processor(model_path)
        self.encoder = Encoder(processing_class, self.family, self.family.image_token_id(unwrap_model(model)))
        prep = dict(max_length=args.max_length, truncation_policy=args.truncation_policy,
                    max_image_pixels=args.max_image_pixels)
        train_dataset = prepare_rows(train_dataset, self.data_kind, self.encoder, name="train_dataset", **prep)
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: prepare_rows(v, self.data_kind, self.encoder, name=k, **prep) for k, v in eval_dataset.items()}
        else:
            eval_dataset = prepare_rows(eval_dataset, self.data_kind, self.encoder, name="eval_dataset", **prep)
        self._init_metrics()
        super().__init__(
            model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
            processing_class=processing_class, data_collator=self.make_collator(), callbacks=callbacks, **kwargs,
        )

    def make_collator(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        save_processor(self.processing_class, output_dir)
