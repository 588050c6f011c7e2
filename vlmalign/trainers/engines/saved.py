"""What a finished save must contain to load with `from_pretrained` (or `PeftModel.from_pretrained`)."""

from __future__ import annotations

import os

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
                "pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin")
CONFIG_FILES = ("config.json", "adapter_config.json")


def missing_saved_files(folder: str) -> list[str]:
    """What is missing from `folder` for a loadable model: weights and a (model or adapter) config."""
    if not os.path.isdir(folder):
        return ["the folder itself"]
    names = set(os.listdir(folder))
    missing = []
    if not names & set(WEIGHT_FILES):
        missing.append("weights (" + " / ".join(WEIGHT_FILES[:3]) + ")")
    if not names & set(CONFIG_FILES):
        missing.append("config.json / adapter_config.json")
    return missing
