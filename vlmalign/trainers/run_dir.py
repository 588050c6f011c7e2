"""Output-folder safety: one run at a time per folder, and a run never reuses or deletes another run's checkpoints.

* **Lock** (``<output_dir>/.vlmalign.lock``, created with ``O_EXCL``, holding the pid, host and run id): taken when
  `train()` starts, released when it returns or raises. A second run in the same folder stops with
  `OutputDirInUseError` naming the holder. A lock left by a process that no longer exists (same host) is taken
  over with a warning; a lock of another host is respected (delete the file by hand if that run is really gone).
* **Run identity** (``<output_dir>/.vlmalign_run.json``, and ``run_id`` in each checkpoint's
  ``vlmalign_state.json``): a fresh run gets a new id; a resumed run keeps its checkpoint's id.
* **Another run's checkpoints**: a new (not resuming) run in a folder that holds ``checkpoint-N`` folders stops with
  `OutputDirInUseError` unless ``overwrite_output_dir=True``; then those folders are moved, never deleted, to
  ``<output_dir>/previous-runs/<their run id>/``, so rotation (``save_total_limit``) and
  ``resume_from_checkpoint=True`` only ever see this run's checkpoints. Rotation itself deletes only checkpoints
  whose run id is this run's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
import uuid

from . import checkpoint as ckpt

logger = logging.getLogger(__name__)

LOCK_NAME = ".vlmalign.lock"
RUN_NAME = ".vlmalign_run.json"
STATE_NAME = "vlmalign_state.json"
PREVIOUS_RUNS = "previous-runs"


class OutputDirInUseError(RuntimeError):
    """The output folder is locked by another run, or holds another run's checkpoints."""


def checkpoint_run_id(checkpoint_dir: str) -> str | None:
    """The run id recorded in a checkpoint (None for checkpoints written before run ids, or by other tools)."""
    try:
        with open(os.path.join(checkpoint_dir, STATE_NAME), encoding="utf-8") as f:
            value = json.load(f).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def acquire_lock(output_dir: str, run_id: str) -> str:
    """Create the folder's lock file for `run_id` and return its path; raise `OutputDirInUseError` if another live
    run holds it."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_NAME)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id, "started": time.time()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_json(path)
            same_host = holder.get("host") == record["host"]
            pid = holder.get("pid")
            if same_host and pid == os.getpid():
                raise OutputDirInUseError(
                    f"{output_dir} is locked by another training run in this process (run {holder.get('run_id')}); "
                    f"one run per output_dir at a time") from None
            if same_host and isinstance(pid, int) and not _pid_alive(pid):
                logger.warning("Taking over %s: left by process %d, which no longer exists", path, pid)
                os.unlink(path)
                continue
            when = holder.get("started")
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) if isinstance(when, (int, float)) else "?"
            raise OutputDirInUseError(
                f"{output_dir} is in use by another training run (pid {pid} on host {holder.get('host')!r}, started "
                f"{since}, lock file {path}). Two runs in one output_dir would overwrite and delete each other's "
                f"checkpoints: use another output_dir, or delete the lock file if that run is gone.") from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f)
        return path
    raise OutputDirInUseError(f"could not take the lock {path}")


def update_lock(path: str, run_id: str) -> None:
    """Record the run id in a lock this process holds."""
    record = _read_json(path)
    record["run_id"] = run_id
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f)


def release_lock(path: str | None, run_id: str) -> None:
    """Remove the lock file if it is still ours."""
    if path and os.path.isfile(path) and _read_json(path).get("run_id") == run_id:
        os.unlink(path)


def start_run(output_dir: str, resume_from: str | None, overwrite: bool) -> str:
    """Decide this run's id and make `output_dir` safe for it (see the module docstring); returns the run id.

    `resume_from`: the checkpoint being resumed (None for a new run)."""
    if resume_from:
        run_id = checkpoint_run_id(resume_from) or _read_json(os.path.join(output_dir, RUN_NAME)).get("run_id")
        run_id = run_id or uuid.uuid4().hex
    else:
        existing = ckpt.checkpoints_by_step(output_dir)
        if existing and not overwrite:
            names = ", ".join(os.path.basename(p) for _, p in existing[:5]) + (" ..." if len(existing) > 5 else "")
            raise OutputDirInUseError(
                f"{output_dir} already holds checkpoints ({names}) of an earlier run. Resume that run with "
                f"resume_from_checkpoint=True (CLI: --resume_from_checkpoint true), start a new one elsewhere, or "
                f"pass overwrite_output_dir=True to start over there (the old checkpoints are then moved to "
                f"{os.path.join(output_dir, PREVIOUS_RUNS)}/, never deleted).")
        for _, path in existing:
            old = checkpoint_run_id(path) or "unknown"
            target = os.path.join(output_dir, PREVIOUS_RUNS, old)
            os.makedirs(target, exist_ok=True)
            destination = os.path.join(target, os.path.basename(path))
            if os.path.exists(destination):
                destination += f"-moved-{int(time.time())}"
            os.rename(path, destination)
            logger.warning("overwrite_output_dir: moved %s (run %s) to %s", path, old, destination)
        run_id = uuid.uuid4().hex
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, RUN_NAME), "w", encoding="utf-8") as f:
        json.dump({"run_id": run_id, "resumed_from": resume_from}, f, indent=2)
    return run_id


def rotate_own_checkpoints(output_dir: str, save_total_limit: int | None, run_id: str,
                           best_model_checkpoint: str | None = None) -> list[str]:
    """Delete the oldest checkpoints of run `run_id` beyond `save_total_limit` (keeping the best one); checkpoints
    of any other run, or without a run id, are never touched. Returns the deleted paths."""
    if not save_total_limit or save_total_limit <= 0:
        return []
    own = [path for _, path in ckpt.checkpoints_by_step(output_dir) if checkpoint_run_id(path) == run_id]
    best = os.path.abspath(best_model_checkpoint) if best_model_checkpoint else None
    # like transformers: the best checkpoint is kept, and with a limit of 1 the newest is kept too
    limit = 2 if save_total_limit == 1 and best and own and os.path.abspath(own[-1]) != best else save_total_limit
    removable = [p for p in own if os.path.abspath(p) != best]
    keep_slots = limit - (1 if best and any(os.path.abspath(p) == best for p in own) else 0)
    doomed = removable[: max(0, len(removable) - max(keep_slots, 0))]
    for path in doomed:
        logger.info("Deleting older checkpoint %s (save_total_limit=%d)", path, save_total_limit)
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def resolve_resume(output_dir: str, resume_from_checkpoint, model_config, *, need_optimizer: bool = True,
                   overwrite: bool = False) -> tuple[str | None, str]:
    """(checkpoint to resume from or None, run id), on the main process, under the lock. `True`: the newest
    checkpoint that passes `checkpoint.checkpoint_problem` (newer broken ones skipped with a warning naming the
    file); a path: that checkpoint, which must pass. Either way the checkpoint must be of this model
    (`checkpoint.check_same_model`). Then `start_run`."""
    if resume_from_checkpoint is True:
        last = ckpt.last_resumable_checkpoint(output_dir, need_optimizer=need_optimizer)
        if last is None:
            raise ValueError(f"No valid checkpoint found in output directory ({output_dir})")
        logger.info("Resuming from the last complete checkpoint, %s", last)
        resume_from_checkpoint = last
    elif resume_from_checkpoint is not None:
        if not os.path.isdir(resume_from_checkpoint):
            raise ValueError(f"resume_from_checkpoint: {resume_from_checkpoint} is not a checkpoint folder")
        problem = ckpt.checkpoint_problem(resume_from_checkpoint, need_optimizer=need_optimizer)
        if problem is not None:
            raise ValueError(f"cannot resume from {resume_from_checkpoint}: {problem}")
    if resume_from_checkpoint is not None:
        ckpt.check_same_model(resume_from_checkpoint, model_config)
    return resume_from_checkpoint, start_run(output_dir, resume_from_checkpoint, overwrite)
