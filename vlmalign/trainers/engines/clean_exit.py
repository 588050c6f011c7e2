"""Tear the process group down while the interpreter is still alive.

A gloo process group that is still alive at interpreter finalisation can abort the process *after* training
finished ("terminate called without an active exception", exit status 1 or SIGABRT): gloo's worker threads still
hold work objects whose tensors refer to Python objects, and destroying them during finalisation needs the GIL of
an interpreter being torn down (PyTorch's own analysis: pytorch/pytorch#179291, #190489). Objects in reference
cycles with the trainer (DDP's reducer, DeepSpeed engines) are only collected there too.

`register()` adds an `atexit` handler (once per process) that collects garbage and calls
`torch.distributed.destroy_process_group()` if a group is still initialised; a script that already called it is
unaffected. It runs no collective, so a process whose peers died does not wait for them.
"""

from __future__ import annotations

import atexit
import gc

import torch

_REGISTERED = False


def _destroy() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gc.collect()
        try:
            torch.distributed.destroy_process_group()
        except Exception:  # pragma: no cover - a group already torn down by its engine
            pass


def register() -> None:
    global _REGISTERED
    if not _REGISTERED:
        atexit.register(_destroy)
        _REGISTERED = True
