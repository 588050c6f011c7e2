"""Where bitsandbytes quantization (QLoRA) can run, and a clear error where it cannot."""

from __future__ import annotations

import importlib.util


def bitsandbytes_problem() -> str | None:
    """Why bitsandbytes 4/8-bit loading cannot run here, or None."""
    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        return "the bitsandbytes package is not installed (pip install bitsandbytes)"
    if not torch.cuda.is_available():
        return "no CUDA device is available (bitsandbytes 4/8-bit training needs one)"
    return None


def check_quantized_loading(quantization_config, has_peft: bool) -> None:
    """Raise before loading when a quantization config is given but cannot be trained here."""
    if quantization_config is None:
        return
    problem = bitsandbytes_problem()
    if problem is not None:
        raise RuntimeError(f"quantization_config was given, but {problem}. Train without quantization (LoRA alone "
                           "still saves optimizer memory) or run on a CUDA machine with bitsandbytes.")
    if not has_peft:
        raise ValueError("a quantized model can only be trained through adapters: pass peft_config (LoRA)")
