"""What a trainer does with the dataset object it is handed, before row validation (`dataset.prepare_rows`):

* a streaming `datasets.IterableDataset` is read as far as training needs (``rows_needed``: max_steps x the global
  batch), then treated like any dataset (validated, length-checked); the rest of the stream is never read. An
  evaluation stream is read to its end (evaluation streams are finite);
* ``remove_unused_columns=True`` (TRL's meaning) keeps only the columns the trainer reads (`KEPT_COLUMNS`): for GRPO
  the other columns then do not reach the reward functions, as in TRL.
"""

from __future__ import annotations

import itertools
import logging

logger = logging.getLogger(__name__)

#: Columns each data kind reads (TRL 1.16's signature columns for vision datasets).
KEPT_COLUMNS = {
    "sft": ("messages", "conversations", "prompt", "completion", "image", "images"),
    "preference": ("prompt", "chosen", "rejected", "image", "images"),
    "prompt": ("prompt", "image", "images"),
}


def is_stream(dataset) -> bool:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return isinstance(dataset, datasets.IterableDataset)


def read_stream(dataset, rows_needed: int | None, name: str) -> list[dict]:
    """The first `rows_needed` rows of a stream (all of it when None), as a list of dicts."""
    rows = list(itertools.islice(iter(dataset), rows_needed)) if rows_needed is not None else list(dataset)
    if not rows:
        raise ValueError(f"{name}: the streaming dataset yielded no rows")
    logger.info("%s: read %d rows from the stream%s", name, len(rows),
                "" if rows_needed is None else f" (max_steps x global batch = {rows_needed})")
    return rows


def keep_columns(dataset, kind: str, name: str):
    """`dataset` restricted to the columns `kind` reads (a `datasets.Dataset`, or a list of dict rows)."""
    kept = KEPT_COLUMNS[kind]
    if isinstance(dataset, list):
        return [{k: v for k, v in row.items() if k in kept} for row in dataset]
    names = getattr(dataset, "column_names", None)
    if names is None:
        return dataset
    dropped = [c for c in names if c not in kept]
    if dropped:
        logger.info("%s: remove_unused_columns=True drops columns %s", name, dropped)
        dataset = dataset.remove_columns(dropped)
    return dataset


def source_rows(dataset, kind: str, *, name: str, rows_needed: int | None, remove_unused_columns: bool):
    """The dataset as `prepare_rows` takes it (see the module docstring)."""
    if dataset is None:
        return None
    if is_stream(dataset):
        if name == "train_dataset" and rows_needed is None:
            raise ValueError("a streaming (IterableDataset) train_dataset has no length: set max_steps > 0 (as "
                             "transformers' Trainer requires for streams)")
        dataset = read_stream(dataset, rows_needed, name)
    if remove_unused_columns:
        dataset = keep_columns(dataset, kind, name)
    return dataset


def shuffled(dataset, seed: int):
    """The rows in a seeded random order (a `datasets.Dataset` or a list)."""
    if dataset is None:
        return None
    if isinstance(dataset, list):
        import random
        rows = list(dataset)
        random.Random(seed).shuffle(rows)
        return rows
    return dataset.shuffle(seed=seed)
