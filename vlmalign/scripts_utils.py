"""Script helpers under TRL 1.16's names, so a TRL training script runs after changing its `from trl import ...` lines.

* `TrlParser`: `transformers.HfArgumentParser` + ``--config FILE.yaml`` (its keys become the dataclasses'
  defaults, the command line overrides them; an ``env:`` mapping sets environment variables; unknown keys raise).
* `ScriptArguments` (dataset_name / dataset_config / splits / streaming / ignore_bias_buffers), `ModelConfig`
  (model path, dtype, attention, LoRA and bitsandbytes options).
* `get_peft_config`, `get_quantization_config`, `get_kbit_device_map`.

Differences from TRL (docs/trl-compatibility.md): `lora_target_modules` entries lose stray commas (TRL's own script
docstrings write ``--lora_target_modules "q_proj", "v_proj"``, which passes ``q_proj,``); quantization is refused
with a message where bitsandbytes or a CUDA device is missing, instead of failing inside bitsandbytes.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

from transformers import HfArgumentParser

__all__ = ["ModelConfig", "ScriptArguments", "TrlParser", "get_kbit_device_map", "get_peft_config",
           "get_quantization_config"]


@dataclass
class ScriptArguments:
    """Arguments common to TRL's scripts (same names and defaults as TRL 1.16's `ScriptArguments`)."""

    dataset_name: str | None = field(default=None, metadata={"help": "Dataset path or hub name for "
                                     "datasets.load_dataset (a local folder of data/train-*.parquet works)."})
    dataset_config: str | None = field(default=None, metadata={"help": "`name` argument of load_dataset."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split used for training."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split used for evaluation."})
    dataset_streaming: bool = field(default=False, metadata={"help": "Load the dataset as an IterableDataset."})
    ignore_bias_buffers: bool = field(default=False, metadata={"help": "DDP work-around for boolean buffers "
                                      "(the scripts set model._ddp_params_and_buffers_to_ignore)."})


@dataclass
class ModelConfig:
    """Model and LoRA / quantization arguments (TRL 1.16's `ModelConfig`: same names and defaults)."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "Model directory or hub id."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the model."})
    dtype: str | None = field(default="float32", metadata={"help": "Weights dtype.",
                              "choices": ["auto", "bfloat16", "float16", "float32"]})
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. 'eager', 'sdpa'."})
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters (get_peft_config)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(default=None, metadata={"help": "Module names, or 'all-linear'. "
                                                  "Default: every linear layer of the language model."})
    lora_target_parameters: list[str] | None = field(default=None, metadata={"help": "PEFT target_parameters."})
    lora_modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained in full."})
    lora_task_type: str = field(default="CAUSAL_LM", metadata={"help": "PEFT task type."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA (alpha / sqrt(r))."})
    use_dora: bool = field(default=False, metadata={"help": "Weight-decomposed LoRA (DoRA)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "bitsandbytes 8-bit base model (CUDA only)."})
    load_in_4bit: bool = field(default=False, metadata={"help": "bitsandbytes 4-bit base model (CUDA only)."})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "4-bit type.", "choices": ["fp4", "nf4"]})
    use_bnb_nested_quant: bool = field(default=False, metadata={"help": "Nested (double) quantization."})
    bnb_4bit_quant_storage: str | None = field(default=None, metadata={"help": "Storage dtype of 4-bit weights."})

    def __post_init__(self):
        if self.load_in_8bit and self.load_in_4bit:
            raise ValueError("load_in_8bit and load_in_4bit cannot both be set")
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [self.lora_target_modules]
        if self.lora_target_modules is not None:
            names = [part.strip() for item in self.lora_target_modules for part in str(item).split(",")]
            names = [name.strip("\"'") for name in names if name.strip("\"'")]
            # one name stays a string, as in TRL ("all-linear" must reach PEFT as a string)
            self.lora_target_modules = names[0] if len(names) == 1 else names


class TrlParser(HfArgumentParser):
    """`HfArgumentParser` that also reads ``--config FILE.yaml`` (TRL's `TrlParser` behaviour).

    `parse_args_and_config(args=None)` -> one instance per dataclass. YAML keys set defaults, command-line flags
    override them; ``env: {NAME: value}`` in the YAML sets environment variables; a key that no dataclass has
    raises (``fail_with_unknown_args=False`` returns them instead, as ``--key value`` strings)."""

    def __init__(self, dataclass_types=None, **kwargs):
        if dataclass_types is None:
            dataclass_types = []
        elif not isinstance(dataclass_types, Iterable):
            dataclass_types = [dataclass_types]
        for cls in dataclass_types:
            if "config" in cls.__dataclass_fields__:
                raise ValueError(f"{cls.__name__} has a field named 'config', which TrlParser reserves for the "
                                 "YAML file path")
        super().__init__(dataclass_types=dataclass_types, **kwargs)

    def parse_args_and_config(self, args: Iterable[str] | None = None, return_remaining_strings: bool = False,
                              fail_with_unknown_args: bool = True, separate_remaining_strings: bool = False):
        args = list(args) if args is not None else sys.argv[1:]
        from_config: list[str] = []
        if "--config" in args:
            i = args.index("--config")
            if i + 1 >= len(args):
                raise ValueError("--config needs a YAML file path")
            path = args[i + 1]
            args = args[:i] + args[i + 2:]
            from_config = self._apply_yaml(path)
        output = self.parse_args_into_dataclasses(args=args, return_remaining_strings=return_remaining_strings)
        if return_remaining_strings:
            rest = list(output[-1])
            if separate_remaining_strings:
                return (*output[:-1], from_config, rest)
            return (*output[:-1], from_config + rest)
        if fail_with_unknown_args and from_config:
            raise ValueError(f"Unknown keys in the config file: {from_config[::2]} (no dataclass of this script has "
                             "them); remove them or pass fail_with_unknown_args=False")
        return output

    def _apply_yaml(self, path: str) -> list[str]:
        import yaml

        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
        if not isinstance(config, dict):
            raise ValueError(f"Config file {path} must hold a YAML mapping, got {type(config).__name__}")
        env = config.pop("env", None) or {}
        if not isinstance(env, dict):
            raise ValueError(f"{path}: `env` must be a mapping of environment variables")
        for key, value in env.items():
            os.environ[str(key)] = str(value)
        return self.set_defaults_with_config(**config)

    def set_defaults_with_config(self, **kwargs) -> list[str]:
        """Make `kwargs` the defaults of the matching arguments (also in sub-parsers); return the rest as
        ``["--key", "value", ...]``."""
        used: set[str] = set()

        def apply(parser):
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    for sub in action.choices.values():
                        apply(sub)
                elif action.dest in kwargs:
                    action.default = kwargs[action.dest]
                    action.required = False
                    used.add(action.dest)

        apply(self)
        return [item for key, value in kwargs.items() if key not in used for item in (f"--{key}", str(value))]


def _bitsandbytes_problem() -> str | None:
    from .models.quantization import bitsandbytes_problem

    return bitsandbytes_problem()


def get_quantization_config(model_args: ModelConfig):
    """A `transformers.BitsAndBytesConfig` for ``load_in_4bit`` / ``load_in_8bit``, else None (TRL's values:
    4-bit compute dtype = ``model_args.dtype``). Raises where bitsandbytes cannot run, saying why."""
    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return None
    problem = _bitsandbytes_problem()
    if problem is not None:
        bits = 4 if model_args.load_in_4bit else 8
        raise RuntimeError(f"load_in_{bits}bit: {problem}. Train without quantization (drop --load_in_{bits}bit; "
                           "LoRA alone with --use_peft still saves optimizer memory) or run on a CUDA machine.")
    from transformers import BitsAndBytesConfig

    if model_args.load_in_4bit:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=model_args.dtype,
                                  bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
                                  bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
                                  bnb_4bit_quant_storage=model_args.bnb_4bit_quant_storage)
    return BitsAndBytesConfig(load_in_8bit=True)


def get_kbit_device_map() -> dict[str, int] | None:
    """``{"": local process index}`` (each process loads the quantized model on its own GPU) where CUDA is
    available, else None (TRL <= 0.x's helper; TRL 1.16 dropped it)."""
    import torch

    if not torch.cuda.is_available():
        return None
    from accelerate import PartialState

    return {"": PartialState().local_process_index}


def get_peft_config(model_args: ModelConfig):
    """A `peft.LoraConfig` from `model_args` when ``use_peft``, else None (TRL's mapping; bias="none").
    ``lora_target_modules=None`` lets vlmalign pick the language model's linear layers (see
    `vlmalign.trainers.base.lora_target_modules`); TRL leaves that choice to PEFT's per-architecture table."""
    if not model_args.use_peft:
        return None
    from peft import LoraConfig

    extra = {}
    if model_args.lora_target_parameters is not None:
        extra["target_parameters"] = model_args.lora_target_parameters
    return LoraConfig(task_type=model_args.lora_task_type, r=model_args.lora_r,
                      target_modules=model_args.lora_target_modules, lora_alpha=model_args.lora_alpha,
                      lora_dropout=model_args.lora_dropout, bias="none", use_rslora=model_args.use_rslora,
                      use_dora=model_args.use_dora, modules_to_save=model_args.lora_modules_to_save, **extra)
