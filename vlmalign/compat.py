"""Every private transformers (and accelerate) member vlmalign relies on, checked when `vlmalign.trainers` is imported.

A private member can be renamed, removed or given other parameters in any release, and an override of a method
that Trainer no longer calls is silently never run (the non-finite guard would turn off without a sound). So each
member is named here with the parameters vlmalign's code passes or overrides, and `check()` verifies them at import:
a mismatch raises `TransformersCompatError` naming the member, what was found, the installed version and the
supported range (pyproject.toml; tested at both ends: 5.19 in .ci/run_vllm, 5.24 in the main suite).

Kinds of member:

* ``method``: a method vlmalign overrides or calls; the parameter names (``inspect.signature``, ``self`` dropped)
  must equal ``params`` exactly, since an override with fewer parameters breaks when Trainer passes a new one;
* ``attribute``: must exist on the class (class attributes and properties);
* ``assigned``: an instance attribute that transformers sets in a module's code (``self.<name> = ...`` or
  ``<obj>.<name> = ...``), read or replaced by vlmalign; checked in the module's source;
* ``source``: a behaviour vlmalign depends on, checked by a phrase in the member's source.

This module imports nothing from vlmalign (a bottom layer, tests/test_layers.py).
"""

from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass

#: The transformers versions vlmalign is tested with (also in pyproject.toml's dependencies).
SUPPORTED_TRANSFORMERS = ">=5.19,<5.25"


class TransformersCompatError(ImportError):
    """A private transformers / accelerate member vlmalign relies on is missing or has changed."""


@dataclass(frozen=True)
class Member:
    owner: str                          # "module:Class" or "module" (for `assigned`)
    name: str
    kind: str                           # "method", "attribute", "assigned" or "source"
    used_by: str                        # where vlmalign relies on it
    params: tuple[str, ...] = ()        # method: parameter names after self
    phrase: str = ""                    # source: a phrase the member's source must hold

    @property
    def qualname(self) -> str:
        return f"{self.owner.replace(':', '.')}.{self.name}"


_T = "transformers.trainer:Trainer"
_GUARD = "trainers/guards.py (non-finite guard, run from training_step before clipping)"
_SAVE = "trainers/saving.py (atomic checkpoints, resume)"

MEMBERS: tuple[Member, ...] = (
    # Trainer methods VLMTrainer / GRPOTrainer override
    Member(_T, "_save", "method", _SAVE + ": JSON training args, processor beside the weights",
           ("output_dir", "state_dict")),
    Member(_T, "_save_checkpoint", "method", _SAVE + ": staged and renamed", ("model", "trial")),
    Member(_T, "_get_output_dir", "method", _SAVE + ": redirected into the staging folder", ("trial",)),
    Member(_T, "_push_from_checkpoint", "method", _SAVE + ": pushed after the rename", ("checkpoint_folder",)),
    Member(_T, "_load_optimizer_and_scheduler", "method", _SAVE + ": vlmalign_state.json restored",
           ("checkpoint",)),
    Member(_T, "_load_from_checkpoint", "method", _SAVE + ": weights loaded with the key conversion",
           ("resume_from_checkpoint", "model")),
    Member(_T, "_load_best_model", "method", _SAVE + ": best model loaded with the key conversion", ()),
    # Trainer marks the accumulation's last micro-batch (accelerator.sync_gradients) before its training_step
    Member(_T, "_run_epoch", "source", _GUARD, phrase="_set_sync_gradients(do_sync_step)"),
    Member(_T, "_remove_unused_columns", "method", "trainers/base.py (rows are normalised before Trainer sees them)",
           ("dataset", "description")),
    Member(_T, "_get_collator_with_removed_columns", "method", "trainers/base.py (likewise)",
           ("data_collator", "description")),
    Member(_T, "_get_train_sampler", "method", "trainers/grpo.py (RepeatSampler: G completions per prompt)",
           ("train_dataset",)),
    Member(_T, "_get_eval_sampler", "method", "trainers/grpo.py (RepeatSampler)", ("eval_dataset",)),
    Member(_T, "_prepare_inputs", "method", "trainers/grpo.py (generation batch sampled and buffered here)",
           ("inputs",)),
    # Trainer members called or read
    Member(_T, "_get_dataloader", "method", "trainers/grpo.py get_train_dataloader",
           ("dataset", "description", "batch_size", "sampler_fn", "is_training", "dataloader_key")),
    Member("transformers.trainer", "_train_batch_size", "assigned", "trainers/grpo.py get_train_dataloader"),
    # generation and models
    Member("transformers.generation.utils:GenerationMixin", "_prepare_position_ids_for_generation", "method",
           "models/shared_prefix.py (generation positions of the shared prompt)", ("inputs_tensor", "model_kwargs")),
    Member("transformers.modeling_layers:GradientCheckpointingLayer", "_can_checkpoint_with_cache", "attribute",
           "models/prefix_cache.py (cache kept through checkpointed layers)"),
    Member("transformers.modeling_utils", "_gradient_checkpointing_func", "assigned",
           "models/prefix_cache.py (non-reentrant checkpointing with a cache)"),
    Member("transformers.configuration_utils:PretrainedConfig", "_attn_implementation", "attribute",
           "models/packing.py (packed attention swapped in for a forward)"),
    Member("transformers.core_model_loading", "_weight_conversions", "assigned",
           "trainers/saving.py (ZeRO-3 save without the recorded key conversions)"),
    # processors
    Member("transformers.processing_utils:ProcessorMixin", "from_args_and_dict", "source",
           "models/loading.py image_only_processor_class (saved settings are filtered by its validate_init_kwargs)",
           phrase="cls.validate_init_kwargs("),
    # accelerate
    Member("accelerate.state:PartialState", "_prepare_backend", "method",
           "trainers/engines/cpu_engines.py (FSDP2 / DeepSpeed on gloo for CPU tests)", ("cpu", "sagemaker_dp", "backend")),
    Member("accelerate.state:PartialState", "_shared_state", "attribute", "trainers/engines/cpu_engines.py"),
)


def _owner(member: Member):
    module_name, _, class_name = member.owner.partition(":")
    module = importlib.import_module(module_name)
    return module if not class_name else getattr(module, class_name)


def _module_source(module_name: str) -> str:
    return inspect.getsource(importlib.import_module(module_name))


def problem(member: Member) -> str | None:
    """Why `member` does not match what vlmalign needs (None when it does)."""
    try:
        owner = _owner(member)
    except (ImportError, AttributeError) as err:
        return f"{member.owner.replace(':', '.')} cannot be imported ({err})"
    if member.kind == "assigned":
        if not re.search(rf"\.{re.escape(member.name)}\s*=[^=]", _module_source(member.owner)):
            return f"{member.owner} no longer sets .{member.name}"
        return None
    value = inspect.getattr_static(owner, member.name, None)
    if value is None and not hasattr(owner, member.name):
        return "no such member"
    if member.kind == "method":
        params = [p for p in inspect.signature(getattr(owner, member.name)).parameters if p != "self"]
        if tuple(params) != member.params:
            return f"parameters are ({', '.join(params)}), expected ({', '.join(member.params)})"
    if member.kind == "source":
        try:
            source = inspect.getsource(getattr(owner, member.name))
        except (OSError, TypeError) as err:
            return f"its source cannot be read ({err})"
        if member.phrase not in source:
            return f"its code no longer uses {member.phrase}"
    return None


def check(members: tuple[Member, ...] = MEMBERS) -> None:
    """Raise `TransformersCompatError` naming every member that is missing or changed."""
    bad = [(m, why) for m in members if (why := problem(m)) is not None]
    if not bad:
        return
    import accelerate
    import transformers

    lines = "\n".join(f"  {m.qualname} ({m.kind}, used by {m.used_by}): {why}" for m, why in bad)
    raise TransformersCompatError(
        f"vlmalign relies on private transformers / accelerate members that this installation lacks or has changed "
        f"(transformers {transformers.__version__}, accelerate {accelerate.__version__}; supported transformers "
        f"{SUPPORTED_TRANSFORMERS}):\n{lines}\nInstall a supported transformers version (pip install "
        f"'transformers{SUPPORTED_TRANSFORMERS}').")
