"""Atomic checkpoint directories.

A checkpoint is written under a staging directory ``<output_dir>/.tmp-checkpoint-N/checkpoint-N`` and moved to
``<output_dir>/checkpoint-N`` by one ``os.rename`` once every file is written (model, optimizer, scheduler, RNG
states, trainer state, and whatever a trainer subclass adds). ``transformers.trainer_utils.get_last_checkpoint``
and checkpoint rotation only look at ``checkpoint-<digits>`` names, so a process killed while saving leaves the
previous checkpoints as they were, and ``resume_from_checkpoint=True`` picks the last complete one. Staging
directories left by a killed save are removed at the next save or at the next ``train()`` (with a log line).

`VLMTrainer` (base.py) drives this; these are the file-system helpers.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

STAGING_PREFIX = f".tmp-{PREFIX_CHECKPOINT_DIR}-"
TRAINER_STATE_NAME = "trainer_state.json"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def staging_root(run_dir: str | os.PathLike, step: int) -> str:
    """The staging directory of the checkpoint of `step` (its checkpoint folder is inside it)."""
    return os.path.join(os.fspath(run_dir), f"{STAGING_PREFIX}{step}")


def remove_stale_staging(run_dir: str | os.PathLike, reason: str = "") -> list[str]:
    """Delete every staging directory under `run_dir` (left by a save that was killed); return their paths."""
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        return []
    removed = []
    for name in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, name)
        if name.startswith(STAGING_PREFIX) and os.path.isdir(path):
            logger.warning("Removing incomplete checkpoint %s (left by an interrupted save)%s", path, reason)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _fsync_path(path: str, directory: bool) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:  # e.g. directories on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """Flush every file and directory under `root` to disk (so a power loss after the rename cannot leave a
    complete-looking checkpoint with empty files)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(os.path.join(dirpath, name), directory=False)
        _fsync_path(dirpath, directory=True)


def fix_state_paths(checkpoint_dir: str, staged_prefix: str, final_prefix: str) -> None:
    """Rewrite paths under the staging directory recorded in the checkpoint's trainer_state.json
    (``best_model_checkpoint``) to their final location."""
    path = os.path.join(checkpoint_dir, TRAINER_STATE_NAME)
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        state = json.load(f)
    best = state.get("best_model_checkpoint")
    if isinstance(best, str) and best.startswith(staged_prefix):
        state["best_model_checkpoint"] = final_prefix + best[len(staged_prefix):]
        with open(path, "w", encoding="utf-8") as f:  # the format TrainerState.save_to_json writes
            f.write(json.dumps(state, indent=2, sort_keys=True) + "\n")


def publish(staged_dir: str, final_dir: str, fsync: bool = True) -> None:
    """Move a completely written checkpoint folder to its final name. An existing folder of that name (a second save
    at the same step) is replaced: moved aside first, deleted after."""
    root = os.path.dirname(staged_dir)
    if fsync:
        fsync_tree(staged_dir)
    replaced = None
    if os.path.lexists(final_dir):
        replaced = os.path.join(root, "replaced-" + os.path.basename(final_dir))
        os.rename(final_dir, replaced)
    os.rename(staged_dir, final_dir)
    if fsync:
        _fsync_path(os.path.dirname(final_dir), directory=True)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """A `checkpoint-N` folder with its trainer state (the last file Trainer writes)."""
    return os.path.isfile(os.path.join(os.fspath(path), TRAINER_STATE_NAME))


def checkpoints_by_step(output_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """(step, path) of the `checkpoint-N` folders directly under `output_dir`, oldest first; [] when the folder does
    not exist."""
    output_dir = os.fspath(output_dir)
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_RE.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def numbered_checkpoints(output_dir: str | os.PathLike) -> list[str]:
    """The `checkpoint-N` folders of `output_dir`, newest (highest N) first."""
    return [path for _, path in reversed(checkpoints_by_step(output_dir))]


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The `checkpoint-N` folder of the highest N that holds a trainer state; None if there is none.

    With atomic saves every `checkpoint-N` folder is complete; folders written by other tools (or copied by hand)
    without trainer_state.json are skipped with a warning rather than resumed from (transformers would silently
    restart from step 0 with their weights)."""
    for path in numbered_checkpoints(output_dir):
        if is_complete_checkpoint(path):
            return path
        logger.warning("Skipping %s: no %s (not a complete checkpoint)", path, TRAINER_STATE_NAME)
    return None


# ---------------------------------------------------------------------------------------------------------------
# Loading a checkpoint's weights back into the live model
# ---------------------------------------------------------------------------------------------------------------

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def saved_weight_keys(checkpoint_dir: str | os.PathLike) -> set[str] | None:
    """The tensor names of a checkpoint's safetensors weights (single file or sharded index); None without any."""
    checkpoint_dir = os.fspath(checkpoint_dir)
    single = os.path.join(checkpoint_dir, SAFE_WEIGHTS_NAME)
    index = os.path.join(checkpoint_dir, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return set(f.keys())
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            return set(json.load(f)["weight_map"])
    return None


def needs_key_conversion(model, checkpoint_dir: str | os.PathLike) -> bool:
    """Whether the checkpoint names its weights differently from `model`'s modules.

    transformers 5 `save_pretrained` writes the original (hub) key layout, reverting the model's conversion mapping
    (e.g. Qwen2-VL ``model.language_model.*`` -> ``model.*``, ``model.visual.*`` -> ``visual.*``), but
    `Trainer._load_from_checkpoint` / `_load_best_model` load that file with a plain ``load_state_dict(strict=False)``:
    no weight matches, a warning is logged, and training "resumes" from the initial weights (transformers#43701,
    #48805)."""
    keys = saved_weight_keys(checkpoint_dir)
    return keys is not None and not keys <= set(model.state_dict())


def load_converted_weights(model, checkpoint_dir: str | os.PathLike) -> None:
    """Load a checkpoint's weights into `model` through `from_pretrained` (which applies the conversion mapping),
    then copy them over strictly: every parameter and buffer is restored or this raises."""
    loaded, info = type(model).from_pretrained(os.fspath(checkpoint_dir), dtype=model.dtype, use_safetensors=True,
                                               output_loading_info=True)
    problems = {k: sorted(map(str, info.get(k) or ())) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        raise RuntimeError(f"Checkpoint {checkpoint_dir} does not match the model: {problems}")
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded


def is_disk_full(error: BaseException, folder: str, min_free_bytes: int = 64 * 2**20) -> bool:
    """Whether a failed save was (most likely) a full disk: ENOSPC / EDQUOT anywhere in the exception chain, or
    torch's "file write failed" with less than `min_free_bytes` left on `folder`'s disk."""
    import errno

    seen, current = set(), error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
            return True
        current = current.__cause__ or current.__context__
    if "write" in str(error).lower():
        try:
            return shutil.disk_usage(folder).free < min_free_bytes
        except OSError:
            return False
    return False


# ---------------------------------------------------------------------------------------------------------------
# Checking a checkpoint before resuming from it
# ---------------------------------------------------------------------------------------------------------------

OPTIMIZER_NAME, SCHEDULER_NAME = "optimizer.pt", "scheduler.pt"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


class CheckpointMismatchError(ValueError):
    """A checkpoint written for another model (family or architecture) than the one being trained."""


def _torch_file_problem(path: str) -> str | None:
    """A `torch.save` file (a zip archive) that is cut short fails to open its central directory."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        return f"{path} is truncated or corrupt ({type(error).__name__}: {error})"
    return None


def _safetensors_problem(path: str) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
            if keys:  # reading the last tensor touches the end of the file
                f.get_slice(keys[-1])
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            header = int.from_bytes(f.read(8), "little")
            meta = json.loads(f.read(header))
        end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
        if 8 + header + end > size:
            return f"{path} is truncated ({size} bytes, the header describes {8 + header + end})"
    except Exception as error:  # safetensors raises its own error types
        return f"{path} is truncated or corrupt ({type(error).__name__}: {error})"
    return None


def checkpoint_problem(path: str | os.PathLike, *, need_optimizer: bool = True) -> str | None:
    """The first reason `path` cannot be resumed from, naming the file; None for a complete checkpoint. Checks the
    trainer state (JSON), the weights (safetensors, full or adapter, single or sharded: headers and sizes), and the
    optimizer and scheduler state (present, readable archives) unless `need_optimizer` is False."""
    path = os.fspath(path)
    state = os.path.join(path, TRAINER_STATE_NAME)
    if not os.path.isfile(state):
        return f"{state} is missing (not a complete checkpoint)"
    try:
        with open(state, encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError) as error:
        return f"{state} is unreadable ({error})"
    weights = [os.path.join(path, n) for n in (SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME)
               if os.path.isfile(os.path.join(path, n))]
    index = os.path.join(path, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError) as error:
            return f"{index} is unreadable ({error})"
        for shard in shards:
            if not os.path.isfile(os.path.join(path, shard)):
                return f"{os.path.join(path, shard)} is missing (listed in {index})"
        weights += [os.path.join(path, s) for s in shards]
    if not weights and not any(n.startswith(("global_step", "pytorch_model_fsdp")) for n in os.listdir(path)):
        return f"{path} holds no model weights ({SAFE_WEIGHTS_NAME}, {ADAPTER_WEIGHTS_NAME} or a sharded index)"
    for file in weights:
        if (problem := _safetensors_problem(file)) is not None:
            return problem
    if need_optimizer:
        for name in (OPTIMIZER_NAME, SCHEDULER_NAME):
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                return (f"{file} is missing: resuming would restart the optimizer (moments, step counts) or the "
                        f"learning-rate schedule from scratch")
            if (problem := _torch_file_problem(file)) is not None:
                return problem
    return None


def check_same_model(path: str | os.PathLike, model_config) -> None:
    """Raise `CheckpointMismatchError` when the checkpoint's config.json names another architecture than the model
    being trained (model_type, or the text model's hidden size / layer count)."""
    file = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(file):
        return  # adapter-only checkpoints carry adapter_config.json; the weights check catches mismatches there
    with open(file, encoding="utf-8") as f:
        saved = json.load(f)
    ours = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    differences = []
    for key in ("model_type",):
        if saved.get(key) != ours.get(key):
            differences.append(f"{key} {saved.get(key)!r} (checkpoint) vs {ours.get(key)!r} (model)")
    saved_text, our_text = saved.get("text_config") or saved, ours.get("text_config") or ours
    for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if key in saved_text and key in our_text and saved_text[key] != our_text[key]:
            differences.append(f"text {key} {saved_text[key]} (checkpoint) vs {our_text[key]} (model)")
    if differences:
        raise CheckpointMismatchError(
            f"checkpoint {path} was written for another model: {'; '.join(differences)}. Resume with the model "
            f"the checkpoint was trained from, or start a new run in another output_dir.")


def last_resumable_checkpoint(output_dir: str | os.PathLike, *, need_optimizer: bool = True) -> str | None:
    """The newest `checkpoint-N` that `checkpoint_problem` accepts; newer broken ones are skipped with a warning
    naming the bad file."""
    for path in numbered_checkpoints(output_dir):
        problem = checkpoint_problem(path, need_optimizer=need_optimizer)
        if problem is None:
            return path
        logger.warning("Skipping %s: %s; falling back to an older checkpoint", path, problem)
    return None
