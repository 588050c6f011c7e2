"""A user's dataset -> the rows a trainer iterates: validated up front, length-checked, normalised on the fly."""

from __future__ import annotations

import logging

import torch

from .collate import Encoder, SequenceTooLongError, filter_by_length
from .formats import normalize_row, validate_dataset

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


def _conversations(row: dict, kind: str) -> list[tuple[list[dict], list, bool]]:
    """The sequences a row becomes in training, as (conversation, images, add_generation_prompt)."""
    if kind == "sft":
        return [(row["messages"], row["images"], False)]
    if kind == "preference":
        return [(row["prompt"] + row["chosen"], row["images"], False),
                (row["prompt"] + row["rejected"], row["images"], False)]
    return [(row["prompt"], row["images"], True)]


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
    """Validate every row (errors name each bad row and column, all of them), then measure each row's sequences with
    their images expanded and drop or reject the ones longer than `max_length` (never cut)."""
    if dataset is None:
        return None
    if isinstance(dataset, RowDataset):
        return dataset
    report = validate_dataset(dataset, kind, max_image_pixels=max_image_pixels, on_error="raise", name=name)
    if report.num_converted_images:
        logger.info("%s: %d non-RGB images converted to RGB", name, report.num_converted_images)
    rows = RowDataset(dataset, kind, report.valid_indices, max_image_pixels=max_image_pixels)
    if max_length is None:
        return rows
    column = {"sft": "messages", "preference": "chosen/rejected", "prompt": "prompt"}[kind]
    seqs, owners = [], []
    for i in range(len(rows)):
        for conv, images, gen in _conversations(rows[i], kind):
            seqs.append((conv, images))
            owners.append(rows.indices[i])
    add_gen = kind == "prompt"
    try:
        length_report = filter_by_length(seqs, encoder, max_length, truncation_policy, column=column,
                                         add_generation_prompt=add_gen, row_ids=owners)
    except SequenceTooLongError as error:
        raise SequenceTooLongError(f"{name}: {error}") from None
    too_long = {owners[j] for j in length_report.dropped}
    if too_long:
        logger.warning("%s: dropped %d rows longer than max_length=%d (rows are never cut inside images): %s",
                       name, len(too_long), max_length, sorted(too_long)[:20])
    kept = [i for i in rows.indices if i not in too_long]
    if not kept:
        raise SequenceTooLongError(f"{name}: every row is longer than max_length={max_length} with its images "
                                   f"(rows are never cut inside images); raise max_length")
    return RowDataset(dataset, kind, kept, max_image_pixels=max_image_pixels)
