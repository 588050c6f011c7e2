"""A user's dataset -> the rows a trainer iterates: validated up front, length-checked, normalised on the fly."""

from __future__ import annotations

import logging

import torch

from .once import on_main_process
from .collate import Encoder, SequenceTooLongError
from .formats import DataValidationError, RowError, normalize_row, validate_dataset
from .supervision import SupervisionError

logger = logging.getLogger(__name__)


class RowDataset(torch.utils.data.Dataset):
    """Normalised rows of `dataset` (a `datasets.Dataset` or a list of dicts) at `indices`, decoded lazily."""

    def __init__(self, dataset, kind: str, indices: list[int] | None = None, *, max_image_pixels: int | None = None):
        self.dataset, self.kind, self.max_image_pixels = dataset, kind, max_image_pixels
        self.indices = list(range(len(dataset))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        index = self.indices[i]
        row = normalize_row(self.dataset[index], self.kind, index, max_image_pixels=self.max_image_pixels)
        row["_index"] = index
        return row


def _sequences(row: dict, kind: str) -> list[tuple[str, list[dict], bool, int]]:
    """The sequences a row becomes in training, as (column, conversation, add_generation_prompt, supervise_from)."""
    if kind == "sft":
        return [("messages", row["messages"], False, row.get("completion_start", 0))]
    if kind == "preference":
        n = len(row["prompt"])
        return [("chosen", row["prompt"] + row["chosen"], False, n), ("rejected", row["prompt"] + row["rejected"], False, n)]
    return [("prompt", row["prompt"], True, 0)]


def check_with_template(rows: "RowDataset", kind: str, encoder: Encoder, *, measure: bool = True,
                        batch_size: int = 32, name: str | None = None) -> dict[int, int]:
    """Render every row with the model's chat template and check what training will see: no message text that the
    template drops, and (SFT / preference) at least one supervised token per answer. With `measure`, also tokenise
    with the images expanded and return {row index: its longest sequence's length}. Raises DataValidationError
    naming every bad row, its column and why."""
    from tqdm.auto import tqdm

    sup = encoder.supervisor
    errors: list[RowError] = []
    lengths: dict[int, int] = {}
    seqs = []
    for i in range(len(rows)):
        row = rows[i]
        index = rows.indices[i]
        for column, conversation, gen, start in _sequences(row, kind):
            why = sup.dropped_text(conversation)
            if why:
                errors.append(RowError(index, column, why))
            else:
                seqs.append((index, column, conversation, row["images"], gen, start))
    labels = kind in ("sft", "preference")
    if (measure or labels) and seqs:
        chunks = range(0, len(seqs), batch_size)
        for c in tqdm(chunks, desc="checking rows with the chat template", unit="batch", disable=len(chunks) < 20):
            chunk = seqs[c:c + batch_size]
            for part, batch in _encode_checked(chunk, encoder, labels, errors):
                for s, n in zip(part, batch["attention_mask"].sum(dim=1).tolist()):
                    lengths[s[0]] = max(lengths.get(s[0], 0), int(n))
    if errors:
        errors.sort(key=lambda e: (e.row, e.column or ""))
        raise DataValidationError(errors, len(rows), name)
    return lengths


def _encode_checked(chunk: list, encoder: Encoder, labels: bool, errors: list[RowError]) -> list[tuple[list, dict]]:
    """[(sequences, their batch)]: the chunk as one batch when it encodes; otherwise each sequence alone, the
    failing ones recorded in `errors` with their row and column."""
    def encode(part):
        return encoder.encode([s[2] for s in part], [s[3] for s in part], add_generation_prompt=part[0][4],
                              with_labels=labels, supervise_from=[s[5] for s in part])

    try:
        return [(chunk, encode(chunk))]
    except SupervisionError:
        out = []
        for s in chunk:
            try:
                out.append(([s], encode([s])))
            except SupervisionError as e:
                errors.append(RowError(s[0], s[1], f"cannot be supervised with the model's chat template: {e}"))
        return out


def prepare_rows(
    dataset,
    kind: str,
    encoder: Encoder,
    *,
    max_length: int | None = None,
    truncation_policy: str = "drop",
    max_image_pixels: int | None = None,
    name: str = "train_dataset",
) -> RowDataset:
    """Validate every row (errors name each bad row and column, all of them), check each row through the model's
    chat template (`check_with_template`), and drop or reject the rows longer than `max_length` with their images
    expanded (never cut). In a multi-process run the main process does this work alone and sends the kept row
    indices (or the error) to the others, which decode no image here (`distributed.once`)."""
    if dataset is None:
        return None
    if isinstance(dataset, RowDataset):
        return dataset
    if truncation_policy not in ("drop", "raise"):
        raise ValueError(f"truncation policy must be 'drop' or 'raise', got {truncation_policy!r}")
    kept = on_main_process(lambda: checked_indices(dataset, kind, encoder, max_length=max_length,
                                                   truncation_policy=truncation_policy,
                                                   max_image_pixels=max_image_pixels, name=name))
    return RowDataset(dataset, kind, kept, max_image_pixels=max_image_pixels)


def checked_indices(dataset, kind: str, encoder: Encoder, *, max_length: int | None, truncation_policy: str,
                    max_image_pixels: int | None, name: str) -> list[int]:
    """The indices of the rows `prepare_rows` keeps (its docstring), computed on this process."""
    report = validate_dataset(dataset, kind, max_image_pixels=max_image_pixels, on_error="raise", name=name)
    if report.num_converted_images:
        logger.info("%s: %d non-RGB images converted to RGB", name, report.num_converted_images)
    rows = RowDataset(dataset, kind, report.valid_indices, max_image_pixels=max_image_pixels)
    lengths = check_with_template(rows, kind, encoder, measure=max_length is not None, name=name)
    if max_length is None:
        return rows.indices
    too_long = {i: n for i, n in lengths.items() if n > max_length}
    if too_long and truncation_policy == "raise":
        column = {"sft": "messages", "preference": "chosen/rejected", "prompt": "prompt"}[kind]
        lines = [f"row {i}, column '{column}': {n} tokens with its images > max_length={max_length}"
                 for i, n in sorted(too_long.items())[:50]]
        raise SequenceTooLongError(f"{name}: rows too long (rows are never cut inside images):\n  " + "\n  ".join(lines))
    if too_long:
        logger.warning("%s: dropped %d rows longer than max_length=%d (rows are never cut inside images): %s",
                       name, len(too_long), max_length, sorted(too_long)[:20])
    kept = [i for i in rows.indices if i not in too_long]
    if not kept:
        raise SequenceTooLongError(f"{name}: every row is longer than max_length={max_length} with its images "
                                   f"(rows are never cut inside images); raise max_length")
    return kept
