"""Engage FSDP and DeepSpeed on a machine without an accelerator (CPU processes talking over gloo).

accelerate 1.15 only turns FSDP / DeepSpeed on for accelerator devices. On a CPU-only machine, a launch with an FSDP
or DeepSpeed config silently becomes plain DDP (``use_cpu: true``) or N independent one-process runs writing the same
output folder (``use_cpu: false``); DeepSpeed starts its own 2-process group while accelerate believes it is alone
and then fails its batch-size check. `engage()` changes only how accelerate picks backend and engine in that case:

* a launched multi-process job (``LOCAL_RANK`` and ``WORLD_SIZE > 1`` set) with no accelerator gets the gloo backend
  (`PartialState`), so every launch is one job of N processes;
* with ``ACCELERATE_USE_FSDP`` (FSDP config) the job is FSDP, not DDP (`AcceleratorState`);
* with ``ACCELERATE_USE_DEEPSPEED`` DeepSpeed's group is accelerate's group.

Nothing changes when an accelerator (CUDA, XPU, NPU, ...) is present or when the process was not launched as a
multi-process job. `BaseConfig.__post_init__` calls `engage()` before the devices are set up; set
``VLMALIGN_CPU_ENGINES=0`` to keep accelerate's own behaviour.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

logger = logging.getLogger(__name__)

_ENGAGED = False


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def has_accelerator() -> bool:
    """Whether torch sees any accelerator device (CUDA, XPU, MPS, ...)."""
    if torch.cuda.is_available():
        return True
    accel = getattr(torch, "accelerator", None)
    try:
        return bool(accel is not None and accel.is_available())
    except Exception:  # pragma: no cover - backends without the API
        return False


def launched_world_size() -> int:
    """Number of processes of a launched job (1 when not launched by torchrun / accelerate launch)."""
    if int(os.environ.get("LOCAL_RANK", -1)) == -1:
        return 1
    return int(os.environ.get("WORLD_SIZE", "1"))


def requested_engine() -> str:
    """'deepspeed', 'fsdp' or 'ddp', as `accelerate launch` announced it through its environment variables."""
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return "ddp"


def should_engage() -> bool:
    return (os.environ.get("VLMALIGN_CPU_ENGINES", "1") != "0" and launched_world_size() > 1
            and not has_accelerator())


def engage() -> bool:
    """Install the switch (once per process) when `should_engage()`; returns whether it is installed."""
    global _ENGAGED
    if _ENGAGED:
        return True
    if not should_engage():
        return False
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original_backend = PartialState._prepare_backend

    @functools.wraps(original_backend)
    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        found, kind = original_backend(self, cpu, sagemaker_dp, backend)
        if found is None and launched_world_size() > 1 and not has_accelerator():
            return backend or "gloo", DistributedType.MULTI_CPU
        return found, kind

    original_init = AcceleratorState.__init__

    @functools.wraps(original_init)
    def accelerator_state_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if (self.distributed_type == DistributedType.MULTI_CPU and plugin is not None
                and _flag("ACCELERATE_USE_FSDP")):
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    PartialState._prepare_backend = prepare_backend
    AcceleratorState.__init__ = accelerator_state_init
    _ENGAGED = True
    logger.info("No accelerator: %s over gloo with %d CPU processes", requested_engine(), launched_world_size())
    return True
