"""vlmalign: align vision-language models to preferences and rewards (SFT, DPO/MPO, GRPO/GSPO)."""

__version__ = "0.1.0"

_LAZY = {
    "SFTConfig": "vlmalign.trainers.sft", "SFTTrainer": "vlmalign.trainers.sft",
    "DPOConfig": "vlmalign.trainers.dpo", "DPOTrainer": "vlmalign.trainers.dpo",
    "GRPOConfig": "vlmalign.trainers.grpo", "GRPOTrainer": "vlmalign.trainers.grpo",
    "make_tiny_model": "vlmalign.models.tiny", "load_processor": "vlmalign.models.loading",
    "make_dataset": "vlmalign.data.synthetic", "evaluate": "vlmalign.eval.evaluate",
    "make_preferences": "vlmalign.recipes.preferences", "run_demo": "vlmalign.recipes.demo",
    # TRL's script helpers (a TRL script runs after changing its `from trl import ...` lines)
    "TrlParser": "vlmalign.scripts_utils", "ScriptArguments": "vlmalign.scripts_utils",
    "ModelConfig": "vlmalign.scripts_utils", "get_peft_config": "vlmalign.scripts_utils",
    "get_quantization_config": "vlmalign.scripts_utils", "get_kbit_device_map": "vlmalign.scripts_utils",
}

__all__ = list(_LAZY)


def __getattr__(name):  # lazy: `import vlmalign` stays cheap, and each trainer imports only what it needs
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlmalign' has no attribute {name!r}")
