"""Work done once per job, not once per process: the main process (global rank 0) computes, every process gets the
result.

`on_main_process(fn)` runs `fn()` on rank 0 only and broadcasts its (picklable) result to the other processes, which
wait for it. An exception raised by `fn` on rank 0 is broadcast too and raised on every process with the same type and
message, so a bad dataset stops the whole job with one message instead of leaving the other processes waiting in the
next collective. Outside a multi-process group `fn()` simply runs.
"""

from __future__ import annotations

import pickle

import torch


def _group_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _portable(err: Exception) -> Exception:
    """`err` if it survives pickling, else a RuntimeError carrying its type name and message."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")


def on_main_process(fn):
    """`fn()` computed on the main process and sent to every process (see the module docstring)."""
    if _group_size() == 1:
        return fn()
    dist = torch.distributed
    main = dist.get_rank() == 0
    box = [None]
    error = None
    if main:
        try:
            box[0] = ("ok", fn())
        except Exception as err:  # sent to the others, then re-raised here with its own traceback
            error = err
            box[0] = ("error", _portable(err))
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        if main:
            raise error
        raise value
    return value
