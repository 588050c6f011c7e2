"""A frozen reference model prepared by the policy's engine (ZeRO-3: partitioned, with its own inference engine)."""

from __future__ import annotations

from torch import nn


def deepspeed_stage(accelerator) -> int | None:
    """The ZeRO stage of a DeepSpeed run (None without DeepSpeed)."""
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    if plugin is None:
        return None
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def _concrete(value, default):
    return default if value in (None, "auto") else value


def zero3_inference_engine(model: nn.Module, accelerator, args) -> nn.Module:
    """`model` (frozen) under a DeepSpeed ZeRO-3 engine without optimizer: parameters stay partitioned across the
    processes and each module gathers its own for its forward, as the policy's do. Returns the engine (its
    `.module` is the model)."""
    import deepspeed

    source = accelerator.state.deepspeed_plugin.deepspeed_config
    zero = source.get("zero_optimization", {})
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": accelerator.num_processes,
        "zero_optimization": {
            "stage": 3,
            "offload_param": zero.get("offload_param", {"device": "none"}),
            "stage3_param_persistence_threshold": _concrete(zero.get("stage3_param_persistence_threshold"), 0),
            "stage3_prefetch_bucket_size": _concrete(zero.get("stage3_prefetch_bucket_size"), 0),
        },
    }
    for precision in ("bf16", "fp16"):
        enabled = source.get(precision, {}).get("enabled", False)
        if enabled == "auto":
            enabled = bool(getattr(args, precision, False))
        config[precision] = {"enabled": bool(enabled)}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine
