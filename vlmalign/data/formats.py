"""One data format for every stage: accept the column conventions users already have, normalise each row to one
internal form, and validate every row before training starts.

Internal form (`normalize_row`). A message is ``{"role": "system"|"user"|"assistant", "content": [blocks]}``, a block
``{"type": "image"}`` or ``{"type": "text", "text": str}``; ``images`` lists RGB PIL images in image-block order;
other columns are kept as they are (reward functions read them). Kinds:
- ``"sft"``: ``messages`` (at least one assistant turn), ``images``.
- ``"preference"``: ``prompt`` (ends with a user turn), ``chosen`` and ``rejected`` (assistant turns), ``images``.
  Only the prompt may hold image blocks: chosen and rejected share its images.
- ``"prompt"`` (RL): ``prompt`` (ends with a user turn, no assistant turns), ``images``.

Accepted inputs. sft: ``messages``, ``conversations``, or ``prompt`` + ``completion``. preference: ``prompt`` /
``chosen`` / ``rejected``, or only ``chosen`` / ``rejected`` sharing leading turns (the "implicit prompt": their
longest common prefix of whole turns, cut back to end at a user turn); a copy of the prompt at the start of chosen
and rejected is removed. A string prompt is one user turn, a string answer one assistant turn, a string content one
text block. ShareGPT turns (``{"from": "human"|"gpt"|"system", "value"}``) are mapped, their ``<image>`` tags
becoming image blocks. Images come from ``images`` (list), ``image`` (one, or None) or inline ``{"type": "image",
"image"|"path": x}`` blocks, each a PIL image, a path, bytes or a ``{"bytes", "path"}`` dict (datasets' undecoded
Image); no image column, ``images=[]`` or ``image=None`` is a text-only row.
Placeholders (TRL's convention): a row with images but no image block gets one ``{"type": "image"}`` per image at the
start of its first user turn; otherwise each image block without an inline image takes the next column image, and
the counts must match.

Errors name the row, the column and the problem: missing columns, None values, unknown roles, empty turns, empty
answer text, non-string text, chosen identical to rejected (a pair with no preference is almost always a data bug),
placeholder/image count mismatch, missing image files, unreadable or truncated images (each is fully decoded),
images above ``max_image_pixels`` (default ``PIL.Image.MAX_IMAGE_PIXELS``, read from the header before decoding; PIL
itself refuses more than twice its own limit), aspect ratios above ``MAX_ASPECT_RATIO``, image-placeholder text of any
family typed into a message (``VISION_TEXT_TOKENS``), lone surrogate characters, prompts not ending with a user turn,
assistant turns in RL prompts. Non-RGB images are converted to RGB (transparency composited on white, 16/32-bit gray
scaled to 8 bits) and counted; the EXIF orientation is applied whatever the image's source. A row reports its first problem;
`validate_dataset` reports every bad row.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .checks import MAX_ASPECT_RATIO, VISION_TEXT_TOKENS, image_shape_problem, text_problem  # noqa: F401
from .images import _load_rgb, load_image  # noqa: F401 (load_image: re-exported)

KINDS = ("sft", "preference", "prompt")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
IMAGE_COLUMNS = ("images", "image")
MAX_LISTED_ERRORS = 50
# Normalised prompt/completion SFT rows: how many leading assistant turns (those of the prompt) get no labels.
PROGRESS_BAR_MIN_ROWS = 2000


class RowError(ValueError):
    """One bad row: ``row`` is its index (None for a dataset-level problem), ``column`` the column at fault."""

    def __init__(self, row: int | None, column: str | None, problem: str):
        self.row, self.column, self.problem = row, column, problem
        where = "dataset" if row is None else f"row {row}"
        super().__init__(where + ("" if column is None else f", column {column!r}") + f": {problem}")

    def __reduce__(self):
        return type(self), (self.row, self.column, self.problem)


class DataValidationError(ValueError):
    """Every bad row of a dataset (``.errors``), listed in the message up to MAX_LISTED_ERRORS lines."""

    def __init__(self, errors: list[RowError], num_rows: int | None = None, dataset: str | None = None):
        self.errors, self.num_rows, self.dataset = list(errors), num_rows, dataset
        in_rows = "" if num_rows is None else f" in {_plural(num_rows, 'row')}"
        of = "" if dataset is None else f" of {dataset}"
        super().__init__(f"data validation{of} failed, {_plural(len(self.errors), 'error')}{in_rows}:\n"
                         f"{_format_errors(self.errors)}")

    def __reduce__(self):
        return type(self), (self.errors, self.num_rows, self.dataset)


@dataclass
class ValidationReport:
    kind: str
    num_rows: int = 0
    valid_indices: list[int] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)
    num_converted_images: int = 0  # non-RGB images converted to RGB

    def summary(self) -> str:
        text = (f"{self.kind} data: {len(self.valid_indices)} of {self.num_rows} rows valid, {len(self.errors)} "
                f"invalid; {self.num_converted_images} non-RGB images converted to RGB")
        return text + (f"\n{_format_errors(self.errors)}" if self.errors else "")


def _format_errors(errors: list[RowError]) -> str:
    lines = [f"  {e}" for e in errors[:MAX_LISTED_ERRORS]]
    if len(errors) > MAX_LISTED_ERRORS:
        lines.append(f"  ... and {len(errors) - MAX_LISTED_ERRORS} more")
    return "\n".join(lines)


class _Bad(Exception):
    """``_Bad(column, problem)`` from a helper; `_normalize` adds the row index and raises a RowError."""


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


# -------------------------------------------------------------------------------------------------- messages


def _parse_messages(value: Any, column: str, default_role: str) -> list[dict]:
    """A string is one `default_role` turn; a list holds message dicts. Image blocks keep any inline image."""
    if value is None:
        raise _Bad(column, "is None; expected a string or a list of messages")
    if isinstance(value, str):
        _check_text(value, column, f"message 0 ({default_role})")
        return [{"role": default_role, "content": [{"type": "text", "text": value}]}]
    if not isinstance(value, (list, tuple)):
        raise _Bad(column, f"expected a string or a list of messages, got {type(value).__name__}")
    if not value:
        raise _Bad(column, "is an empty list of messages")
    return [_parse_message(message, column, i) for i, message in enumerate(value)]


def _parse_message(message: Any, column: str, i: int) -> dict:
    if not isinstance(message, Mapping):
        raise _Bad(column, f"message {i} is a {type(message).__name__}, expected a dict with 'role' and 'content'")
    sharegpt = "role" not in message and "from" in message
    role = SHAREGPT_ROLES.get(message["from"], message["from"]) if sharegpt else message.get("role")
    content = message.get("value" if sharegpt else "content")
    if role not in ROLES:
        raise _Bad(column, f"message {i} has unknown role {role!r} (expected system, user or assistant)")
    where = f"message {i} ({role})"
    if content is None:
        raise _Bad(column, f"{where} content is None")
    if isinstance(content, str):
        blocks = _split_image_tags(content) if sharegpt else [{"type": "text", "text": content}]
    elif isinstance(content, (list, tuple)):
        blocks = [_parse_block(block, column, f"{where} block {j}") for j, block in enumerate(content)]
    else:
        raise _Bad(column, f"{where} content must be a string or a list of blocks, got {type(content).__name__}")
    for j, block in enumerate(blocks):
        if block["type"] == "text":
            _check_text(block["text"], column, where if isinstance(content, str) else f"{where} block {j}")
    return {"role": role, "content": blocks}


def _check_text(text: str, column: str, where: str) -> None:
    problem = text_problem(text)
    if problem is not None:
        raise _Bad(column, f"{where} text {problem}")


def _parse_block(block: Any, column: str, where: str) -> dict:
    if not isinstance(block, Mapping):
        raise _Bad(column, f"{where} is a {type(block).__name__}, expected a dict with a 'type'")
    if block.get("type") == "text":
        text = block.get("text")
        if not isinstance(text, str):
            got = "None" if text is None else f"a {type(text).__name__} ({text!r})"
            raise _Bad(column, f"{where} text is {got}, expected a string")
        return {"type": "text", "text": text}
    if block.get("type") == "image":
        source = block.get("image") if block.get("image") is not None else block.get("path")
        return {"type": "image"} if source is None else {"type": "image", "image": source}
    raise _Bad(column, f"{where} has unsupported type {block.get('type')!r} (expected 'text' or 'image')")


def _split_image_tags(text: str) -> list[dict]:
    blocks: list[dict] = []
    for k, part in enumerate(text.split("<image>")):
        blocks += ([{"type": "image"}] if k else []) + ([{"type": "text", "text": part}] if part else [])
    return blocks


def _text(messages: list[dict]) -> str:
    return "".join(b["text"] for m in messages for b in m["content"] if b["type"] == "text")


def _check_answer(messages: list[dict], column: str) -> None:
    """completion / chosen / rejected: assistant turns with some text."""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            raise _Bad(column, f"message {i} has role {message['role']!r}; {column!r} must hold assistant turns only")
    if not _text(messages).strip():
        raise _Bad(column, f"empty {column} text")


def _check_prompt(messages: list[dict], column: str, allow_assistant: bool) -> None:
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and not allow_assistant:
            raise _Bad(column, f"message {i} is an assistant turn; an RL prompt must not hold assistant turns")
    if messages[-1]["role"] != "user":
        raise _Bad(column, f"must end with a user turn, but ends with a {messages[-1]['role']} turn")


def _check_nonempty_turns(sections: list[tuple[str, list[dict]]]) -> None:
    for column, messages in sections:
        for i, m in enumerate(messages):
            if not any(b["type"] == "image" or b["text"].strip() for b in m["content"]):
                raise _Bad(column, f"message {i} ({m['role']}) is empty (no text and no image)")


# ------------------------------------------------------------------------------------------------------ rows


def _get(row: Mapping, column: str) -> Any:
    if column not in row:
        raise _Bad(column, f"missing (the row has columns {', '.join(map(repr, row)) or 'none'})")
    return row[column]


def _sft(row: Mapping) -> tuple[list[tuple[str, list[dict]]], dict]:
    column = next((c for c in ("messages", "conversations") if c in row), None)
    if column is not None:
        sections = [(column, _parse_messages(row[column], column, "user"))]
    else:
        completion = _parse_messages(_get(row, "completion"), "completion", "assistant")
        sections = [("prompt", _parse_messages(_get(row, "prompt"), "prompt", "user")), ("completion", completion)]
        _check_answer(completion, "completion")
    messages = [m for _, section in sections for m in section]
    if not any(m["role"] == "assistant" for m in messages):
        raise _Bad(sections[0][0], "has no assistant turn (nothing to train on)")
    if messages[-1]["role"] != "assistant":
        raise _Bad(sections[-1][0], f"the last turn is a {messages[-1]['role']} turn; an SFT conversation must end "
                                    "with the assistant's answer (a trailing turn would never be trained on)")
    # prompt + completion: only the completion is trained on, even when the prompt holds assistant turns (as TRL)
    start = len(sections[0][1]) if column is None else 0
    return sections, {"messages": messages, "completion_start": start}


def _preference(row: Mapping) -> tuple[list[tuple[str, list[dict]]], dict]:
    chosen = _parse_messages(_get(row, "chosen"), "chosen", "assistant")
    rejected = _parse_messages(_get(row, "rejected"), "rejected", "assistant")
    if "prompt" in row:
        prompt = _parse_messages(row["prompt"], "prompt", "user")
        chosen, rejected = (x[len(prompt):] if x[:len(prompt)] == prompt else x for x in (chosen, rejected))
    else:
        prompt, chosen, rejected = _split_implicit_prompt(chosen, rejected)
    _check_prompt(prompt, "prompt", allow_assistant=True)
    for column, answer in (("chosen", chosen), ("rejected", rejected)):
        _check_answer(answer, column)
        if any(b["type"] == "image" for m in answer for b in m["content"]):
            raise _Bad(column, "has an image block; images belong to the prompt (chosen and rejected share them)")
    if chosen == rejected:
        raise _Bad("rejected", "identical to 'chosen' (the pair expresses no preference)")
    return [("prompt", prompt), ("chosen", chosen), ("rejected", rejected)], {
        "prompt": prompt, "chosen": chosen, "rejected": rejected}


def _split_implicit_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == len(chosen) == len(rejected):
        raise _Bad("rejected", "identical to 'chosen' (the pair expresses no preference)")
    while n and chosen[n - 1]["role"] != "user":
        n -= 1
    if n == 0:
        raise _Bad("prompt", "missing, and 'chosen'/'rejected' share no leading turns ending with a user turn "
                             "to use as the prompt")
    return chosen[:n], chosen[n:], rejected[n:]


def _prompt(row: Mapping) -> tuple[list[tuple[str, list[dict]]], dict]:
    prompt = _parse_messages(_get(row, "prompt"), "prompt", "user")
    _check_prompt(prompt, "prompt", allow_assistant=False)
    return [("prompt", prompt)], {"prompt": prompt}


_KIND_PARSERS = {"sft": _sft, "preference": _preference, "prompt": _prompt}


def _column_images(row: Mapping) -> tuple[str, list]:
    images, image = row.get("images"), row.get("image")
    if images is not None and not isinstance(images, (list, tuple)):
        raise _Bad("images", f"expected a list of images, got {type(images).__name__}")
    if image is not None and images:
        raise _Bad("image", "the row has both 'image' and a non-empty 'images'; use one of them")
    return ("image", [image]) if image is not None else ("images", list(images or []))


def _attach_images(sections: list[tuple[str, list[dict]]], row: Mapping, max_pixels: int | None) -> tuple[list, int]:
    """Fill placeholders from the image column (inserting them if there are none), load every image in block
    order, and leave only bare ``{"type": "image"}`` blocks. Returns (RGB images, number converted)."""
    image_column, sources = _column_images(row)
    blocks = [b for _, messages in sections for m in messages for b in m["content"] if b["type"] == "image"]
    placeholders = [b for b in blocks if "image" not in b]
    if not blocks and sources:
        first_user = next((m for _, messages in sections for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise _Bad(image_column, f"{_plural(len(sources), 'image')} but no user turn to put them in")
        placeholders = [{"type": "image"} for _ in sources]
        first_user["content"][:0] = placeholders
    elif len(placeholders) != len(sources):
        raise _Bad(image_column,
                   f"{_plural(len(sources), 'image')} but {_plural(len(placeholders), 'image placeholder')}")
    from_column = {id(b): source for b, source in zip(placeholders, sources)}
    images, converted = [], 0
    for section, messages in sections:
        for m in messages:
            for j, block in enumerate(m["content"]):
                if block["type"] != "image":
                    continue
                column, source = (image_column, from_column[id(block)]) if id(block) in from_column else (
                    section, block["image"])
                if source is None:
                    raise _Bad(column, f"image {len(images)} is None")
                try:
                    image, was_converted = _load_rgb(source, max_pixels)
                except ValueError as e:
                    raise _Bad(column, f"image {len(images)}: {e}") from None
                images.append(image)
                converted += was_converted
                m["content"][j] = {"type": "image"}
    return images, converted


def _normalize(row: Mapping, kind: str, index: int, max_image_pixels: int | None) -> tuple[dict, int]:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    if not isinstance(row, Mapping):
        raise RowError(index, None, f"expected a dict, got {type(row).__name__}")
    try:
        sections, out = _KIND_PARSERS[kind](row)
        images, converted = _attach_images(sections, row, max_image_pixels)
        _check_nonempty_turns(sections)
    except _Bad as bad:
        raise RowError(index, *bad.args) from None
    used = {column for column, _ in sections} | set(IMAGE_COLUMNS)
    return {**out, "images": images, **{k: v for k, v in row.items() if k not in used}}, converted


def normalize_row(row: dict, kind: str, index: int = 0, *, max_image_pixels: int | None = None) -> dict:
    """Normalise one row of `kind` ("sft", "preference", "prompt") to the internal form; raises RowError."""
    return _normalize(row, kind, index, max_image_pixels)[0]


# --------------------------------------------------------------------------------------------------- datasets


def detect_kind(column_names) -> str:
    """The kind of data: preference if chosen+rejected, sft if messages/conversations or prompt+completion, prompt
    if prompt alone."""
    columns = set(column_names)
    if {"chosen", "rejected"} <= columns:
        return "preference"
    if columns & {"messages", "conversations"} or {"prompt", "completion"} <= columns:
        return "sft"
    if "prompt" in columns:
        return "prompt"
    raise ValueError(f"cannot tell the data kind from columns {sorted(columns)}: expected 'messages' or 'prompt' + "
                     "'completion' (sft), 'chosen' + 'rejected' (preference), or 'prompt' alone (prompt)")


def _missing_columns(columns: list[str], kind: str) -> list[str]:
    present = set(columns)
    if kind == "sft":
        if present & {"messages", "conversations"}:
            return []
        return [c for c in ("prompt", "completion") if c not in present] if "prompt" in present else ["messages"]
    return [c for c in {"preference": ("chosen", "rejected"), "prompt": ("prompt",)}[kind] if c not in present]


def _column_names(dataset) -> list[str] | None:
    names = getattr(dataset, "column_names", None)
    if names is None and isinstance(dataset, (list, tuple)):
        names = list(dict.fromkeys(k for row in dataset if isinstance(row, Mapping) for k in row))
    return names


def _undecoded(feature):
    """The same feature with every Image inside it set to decode=False."""
    from datasets import Image as ImageFeature
    from datasets import List, Sequence

    if isinstance(feature, ImageFeature):
        return ImageFeature(decode=False)
    if isinstance(feature, (List, Sequence)):
        return type(feature)(_undecoded(feature.feature))
    return feature


def _raw_rows(dataset, chunk: int = 1000):
    """Rows as plain Python. A `datasets.Dataset` is read through Arrow, so images stay undecoded and our own checks
    (pixel limit before decoding, truncation as a row error) see them instead of datasets' decoder."""
    from datasets import Dataset, IterableDataset  # imported here: collate workers need only normalize_row
    if isinstance(dataset, Dataset) and dataset.format.get("type") != "custom":
        # Python formatting (decodes Json-typed columns, which datasets infers for mixed content blocks), with
        # the image columns cast to undecoded dicts.
        undecoded = dataset.with_format(None)
        for column in IMAGE_COLUMNS:
            if column in undecoded.column_names:
                undecoded = undecoded.cast_column(column, _undecoded(undecoded.features[column]))
        for start in range(0, len(dataset), chunk):
            batch = undecoded[start:start + chunk]
            yield from ({k: batch[k][i] for k in batch} for i in range(len(next(iter(batch.values()), []))))
    else:
        yield from (dataset.decode(False) if isinstance(dataset, IterableDataset) else dataset)


def validate_dataset(dataset, kind: str, *, max_image_pixels: int | None = None,
                     on_error: str = "raise", name: str | None = None) -> ValidationReport:
    """Check the required columns once, then normalise EVERY row (loading every image) and collect all errors.

    on_error="raise" raises DataValidationError listing every bad row; "drop" returns the report, whose
    `valid_indices` the caller selects (and whose `summary()` it logs)."""
    from tqdm.auto import tqdm

    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    if on_error not in ("raise", "drop"):
        raise ValueError(f"on_error must be 'raise' or 'drop', got {on_error!r}")
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise DataValidationError([RowError(None, None, "the dataset is empty (0 rows)")], 0, dataset=name)
    columns = _column_names(dataset)
    if columns is not None and (missing := _missing_columns(columns, kind)):
        present = ", ".join(map(repr, columns)) or "none"
        raise DataValidationError([RowError(None, c, f"missing required column for kind {kind!r} (columns present: "
                                                     f"{present})") for c in missing], dataset=name)
    total = len(dataset) if hasattr(dataset, "__len__") else None
    report = ValidationReport(kind=kind)
    progress = tqdm(_raw_rows(dataset), total=total, desc=f"validating {kind} rows", unit="row",
                    disable=total is not None and total <= PROGRESS_BAR_MIN_ROWS)
    for index, row in enumerate(progress):
        report.num_rows += 1
        try:
            _, converted = _normalize(row, kind, index, max_image_pixels)
        except RowError as e:
            report.errors.append(e)
            continue
        except Exception as e:  # an input shape we did not foresee is still this row's problem, not a crash
            report.errors.append(RowError(index, None, f"unexpected {type(e).__name__}: {e}"))
            continue
        report.valid_indices.append(index)
        report.num_converted_images += converted
    if report.errors and on_error == "raise":
        raise DataValidationError(report.errors, report.num_rows, dataset=name)
    return report
