"""Full parameters for a stretch of forwards that must run no collective (generation), per engine.

Under FSDP2 and ZeRO-3 every module forward all-gathers its parameters and releases them afterwards, so sampling
T tokens would gather the model T times, and two processes whose completions end at different lengths would run
different numbers of collectives. `gathered_for_generation` gathers the parameters once for the block:

* FSDP2: every `FSDPModule` is unsharded and told not to reshard after forward; on exit the previous setting is
  restored and the parameters resharded. Inner modules (a PEFT model's base model) can then be called directly;
* ZeRO-3: DeepSpeed's `unwrap_model_for_generation` (all parameters gathered, the engine's module hooks removed
  for the block, as they would release them after each module, and registered again afterwards);
* anything else (one process, DDP, ZeRO-1/2): nothing to do.
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn


def fsdp2_modules(model: nn.Module) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def zero3_engine(accelerator):
    """The DeepSpeed engine of a ZeRO-3 run (None otherwise)."""
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None) if accelerator is not None else None
    engine = getattr(wrapped, "engine", None)
    if engine is None or engine.zero_optimization_stage() != 3:
        return None
    return engine


def is_zero3_partitioned(param) -> bool:
    return hasattr(param, "ds_id") and hasattr(param, "ds_status")


@contextmanager
def _fsdp2_unsharded(modules):
    states = []
    modules[0]._get_fsdp_state()._lazy_init()
    for module in modules:
        state = module._get_fsdp_state()
        states.append((state._auto_reshard_after_forward, [g.post_forward_mesh_info for g in state._fsdp_param_groups]))
        module.set_reshard_after_forward(False, recurse=False)
        module.unshard()
    try:
        yield
    finally:
        for module, (auto, infos) in zip(modules, states):
            state = module._get_fsdp_state()
            state._auto_reshard_after_forward = auto
            for group, info in zip(state._fsdp_param_groups, infos):
                group.post_forward_mesh_info = info
            module.reshard()


@contextmanager
def gathered_for_generation(model: nn.Module, accelerator=None):
    """Within the block the model's parameters are whole on every process, and forwards run no collective."""
    modules = fsdp2_modules(model)
    if modules:
        with _fsdp2_unsharded(modules):
            yield
        return
    engine = zero3_engine(accelerator)
    if engine is not None:
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        with unwrap_model_for_generation(engine):
            yield
        return
    yield
