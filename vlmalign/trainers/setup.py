"""Model set-up shared by every trainer: load (if a path), freeze what is asked, disable dropout, wrap with PEFT."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..models import patch_embed
from ..models.families import Family, get_family
from ..models.loading import load_model
from ..models.quantization import check_quantized_loading

if TYPE_CHECKING:
    from .base import BaseConfig


def disable_dropout(model: torch.nn.Module) -> None:
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
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
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
        disable_dropout(model)
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
