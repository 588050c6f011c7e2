"""Saving and loading datasets: ``save_to_disk`` folders, JSON Lines with PNG files, JSON, Parquet, the Hub.

``load_dataset_any`` accepts, in this order:

1. a folder written by ``Dataset.save_to_disk`` (for a ``DatasetDict`` folder, ``split`` picks the split,
   default ``"train"``);
2. a folder holding ``data.jsonl`` (as written by ``save_dataset(..., fmt="jsonl")``), or one sub-folder per
   split each holding ``data.jsonl``;
3. a folder laid out like a Hub dataset (``data/train-*.parquet``, ``data/test-*.parquet``; splits inferred by
   ``datasets.load_dataset``);
4. a ``.json``, ``.jsonl`` or ``.parquet`` file;
5. otherwise a Hugging Face Hub dataset, ``name`` or ``name:split``.

In JSON and Parquet files, the ``image`` and ``images`` columns may hold image paths (relative to the file's
folder, or absolute). They are read eagerly and cast to datasets' ``Image`` feature, so rows come back with PIL
images and the loaded dataset does not depend on the files afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.table import InMemoryTable

from .formats import IMAGE_COLUMNS

JSONL_NAME = "data.jsonl"
IMAGE_DIR = "images"
DATA_FILE_SUFFIXES = (".json", ".jsonl", ".parquet")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# ---------------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------------


def save_dataset(ds: datasets.Dataset | datasets.DatasetDict, out_dir: str | Path, fmt: str = "disk") -> Path:
    """Save a dataset and return the output folder.

    ``fmt="disk"`` uses ``save_to_disk``. ``fmt="jsonl"`` writes ``out_dir/data.jsonl`` plus
    ``out_dir/images/<row>_<k>.png``; the jsonl rows store image paths relative to the jsonl file. A
    ``DatasetDict`` saved as jsonl gets one sub-folder per split.
    """
    out_dir = Path(out_dir)
    if fmt == "disk":
        ds.save_to_disk(str(out_dir))
    elif fmt == "jsonl":
        if isinstance(ds, datasets.DatasetDict):
            for split, part in ds.items():
                _save_jsonl(part, out_dir / split)
        else:
            _save_jsonl(ds, out_dir)
    else:
        raise ValueError(f"unknown save format {fmt!r}; expected 'disk' or 'jsonl'")
    return out_dir


def _is_image_feature(feature: Any) -> bool:
    """True for an ``Image`` feature or a list of them."""
    if isinstance(feature, datasets.Image):
        return True
    inner = getattr(feature, "feature", None)
    return isinstance(feature, (datasets.List, datasets.LargeList, datasets.Sequence)) and isinstance(
        inner, datasets.Image)


def _image_columns(ds: datasets.Dataset) -> list[str]:
    """Names of the columns that hold images (``Image`` features, or lists of them)."""
    return [name for name, feature in ds.features.items() if _is_image_feature(feature)]


def _raw_rows(ds: datasets.Dataset, batch_size: int = 256):
    """Yield rows as plain Python values, images left undecoded as ``{"bytes", "path"}`` dicts."""
    for batch in ds.with_format("arrow").iter(batch_size=batch_size):
        yield from batch.to_pylist()


def _write_png(value: dict | None, path: Path) -> None:
    """Write one undecoded image value as a PNG file (bytes copied as they are when already PNG)."""
    if value is None:
        raise ValueError(f"cannot save a missing image as {path}")
    data = value.get("bytes")
    if data is not None and data.startswith(PNG_MAGIC):
        path.write_bytes(data)
        return
    image = datasets.Image().decode_example(value)
    image.save(path, format="PNG")


def _save_jsonl(ds: datasets.Dataset, out_dir: Path) -> None:
    """Write ``out_dir/data.jsonl`` and the images under ``out_dir/images``."""
    columns = _image_columns(ds)
    (out_dir / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    with open(out_dir / JSONL_NAME, "w", encoding="utf-8") as handle:
        for index, row in enumerate(_raw_rows(ds)):
            for name in columns:
                row[name] = _save_row_images(row[name], index, out_dir)
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _save_row_images(value: dict | list | None, index: int, out_dir: Path) -> str | list[str] | None:
    """Save a row's image (or list of images) as PNG files; return the relative path(s)."""
    if value is None:
        return None
    single = isinstance(value, dict)
    paths = []
    for k, item in enumerate([value] if single else value):
        relative = f"{IMAGE_DIR}/{index}_{k}.png"
        _write_png(item, out_dir / relative)
        paths.append(relative)
    return paths[0] if single else paths


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def load_dataset_any(spec: str | Path, split: str | None = None) -> datasets.Dataset:
    """Load a dataset from a local folder or file, or from the Hub (see the module docstring for the order).

    Raises ``FileNotFoundError`` naming the path when a local-looking ``spec`` does not exist, or when neither a
    local path nor the Hub can provide ``spec``.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_folder(path, split)
    if path.is_file():
        return _load_file(path)
    if _looks_local(str(spec)):
        raise FileNotFoundError(f"dataset path not found: {spec}")
    return _load_hub(str(spec), split)


def _looks_local(spec: str) -> bool:
    """True when ``spec`` is clearly meant as a path (so it must not fall through to the Hub)."""
    return spec.startswith(("/", "./", "../", "~", ".\\")) or spec.endswith(DATA_FILE_SUFFIXES + (".arrow",))


def _pick_split(splits: dict, split: str | None, where: Path) -> Any:
    """``splits[split]`` (default ``"train"``) with an error naming the available splits."""
    name = split or "train"
    if name not in splits:
        raise ValueError(f"split {name!r} not found in {where}; available splits: {sorted(splits)}")
    return splits[name]


def _load_folder(path: Path, split: str | None) -> datasets.Dataset:
    """A ``save_to_disk`` folder, a folder with ``data.jsonl``, or one with a ``data.jsonl`` per split."""
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        loaded = datasets.load_from_disk(str(path))
        return _pick_split(loaded, split, path) if isinstance(loaded, datasets.DatasetDict) else loaded
    if (path / JSONL_NAME).is_file():
        return _load_file(path / JSONL_NAME)
    split_files = {child.name: child / JSONL_NAME for child in path.iterdir() if (child / JSONL_NAME).is_file()}
    if split_files:
        return _load_file(_pick_split(split_files, split, path))
    if any(path.glob("*.parquet")) or any(path.glob("*/*.parquet")):
        return _load_hub_layout(path, split)
    raise FileNotFoundError(
        f"no dataset found in folder {path}: expected a save_to_disk folder or a {JSONL_NAME} file")


def _load_hub_layout(path: Path, split: str | None) -> datasets.Dataset:
    """A folder laid out like a Hub dataset repository (``data/train-00000-of-00001.parquet``,
    ``train-*.parquet``, ``data/test/*.parquet``, ...): datasets' own split inference reads it."""
    loaded = datasets.load_dataset(str(path))
    return _pick_split(loaded, split, path)


def _load_file(path: Path) -> datasets.Dataset:
    """A ``.json`` / ``.jsonl`` / ``.parquet`` file, image paths resolved against its folder."""
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        return _dataset_from_rows(_read_json_rows(path), path.parent, path)
    if suffix == ".parquet":
        return _load_parquet(path)
    raise ValueError(f"cannot load {path}: unsupported file type {suffix!r} (use .json, .jsonl or .parquet)")


def _read_json_rows(path: Path) -> list[dict]:
    """Rows of a JSON array, a JSON object of equal-length columns, or JSON Lines."""
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".jsonl":  # one object per line, even a single line whose values are all lists
            raise json.JSONDecodeError("JSON Lines", text, 0)
        data = json.loads(text)
    except json.JSONDecodeError:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}: line {number} (row {len(rows)}) is not valid JSON: {error}") from None
        return rows
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        return [dict(zip(data, values)) for values in zip(*data.values())]
    return [data]  # a single JSON object on one line is a one-row JSON Lines file


def _load_parquet(path: Path) -> datasets.Dataset:
    """A Parquet file; image path columns are resolved like in JSON files."""
    ds = datasets.Dataset(InMemoryTable(pq.read_table(path)))
    if not any(name in ds.column_names and not _is_image_feature(ds.features[name]) for name in IMAGE_COLUMNS):
        return ds
    return _dataset_from_rows(ds.to_list(), path.parent, path)


def _image_value(item: Any, base_dir: Path) -> Any:
    """One image entry as a ``{"bytes", "path"}`` dict; a relative path is resolved against ``base_dir``."""
    if item is None or isinstance(item, dict) and item.get("bytes") is not None:
        return item
    reference = item.get("path") if isinstance(item, dict) else item
    if not isinstance(reference, str):
        raise TypeError(f"cannot read an image from {reference!r} (expected a path string)")
    if "://" in reference:
        return {"bytes": None, "path": reference}  # a URL: opened lazily by the Image feature
    file = Path(reference).expanduser()
    file = file if file.is_absolute() else base_dir / file
    if not file.is_file():
        raise FileNotFoundError(f"image file not found: {file}")
    return {"bytes": file.read_bytes(), "path": str(file)}


MESSAGE_COLUMNS = ("messages", "conversations", "prompt", "completion", "chosen", "rejected")


def _value_kind(value: Any) -> str | None:
    """The JSON type of a value, for the column type check (None: missing / null, compatible with anything)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}.get(type(value), type(value).__name__)


def _union_columns(rows: list[dict]) -> list[str]:
    """Every column that appears in any row, in order of first appearance. A row without a column gets None there."""
    names = list(dict.fromkeys(name for row in rows for name in row))
    for row in rows:
        for name in names:
            row.setdefault(name, None)
    return names


def _typed_content(rows: list[dict], names: list[str]) -> None:
    """In conversation columns, a message whose content is a string becomes one text block when other messages of
    the column hold block lists (both forms are documented; Arrow cannot store the mix)."""
    for name in names:
        if name not in MESSAGE_COLUMNS:
            continue
        messages = [m for row in rows if isinstance(row[name], list) for m in row[name] if isinstance(m, dict)]
        kinds = {type(m.get("content")) for m in messages} - {type(None)}
        if not (str in kinds and list in kinds):
            continue
        for message in messages:  # (ShareGPT "value" strings are left alone: their <image> tags are parsed later)
            if isinstance(message.get("content"), str):
                message["content"] = [{"type": "text", "text": message["content"]}]


def _check_column_types(rows: list[dict], names: list[str], source: Path) -> None:
    """Every column holds one JSON type (null aside), and Arrow can store it; else a ValueError naming the first
    row that conflicts with the rows before it."""
    for name in names:
        first = None
        for index, row in enumerate(rows):
            kind = _value_kind(row[name])
            if kind is None:
                continue
            if first is None:
                first = (index, kind)
            elif kind != first[1]:
                raise ValueError(f"{source}: row {index}, column {name!r}: a {kind} value ({_short(row[name])}), "
                                 f"but row {first[0]} holds a {first[1]}; a column must hold one type")
        values = [row[name] for row in rows]
        try:
            pa.array(values)
        except (pa.ArrowException, TypeError, ValueError, OverflowError) as error:
            index = _first_unstorable(values)
            raise ValueError(f"{source}: row {index}, column {name!r}: its value ({_short(values[index])}) does not "
                             f"have the structure of the rows before it ({type(error).__name__}: {error})") from None


def _first_unstorable(values: list) -> int:
    """The smallest k such that values[:k + 1] cannot be stored as one Arrow column (binary search)."""
    lo, hi = 0, len(values) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        try:
            pa.array(values[: mid + 1])
            lo = mid + 1
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            hi = mid
    return lo


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _dataset_from_rows(rows: list[dict], base_dir: Path, source: Path | None = None) -> datasets.Dataset:
    """A dataset from python rows, with ``image`` / ``images`` cast to datasets' ``Image`` feature.

    Columns are the union over all rows (a row without a column gets None there: nothing is dropped because the
    first row lacks it); a column holding two types (say a string in one row and a list in another) is an error
    naming the row."""
    source = source or base_dir
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{source}: row {index} is a {type(row).__name__}, expected a JSON object")
    if not rows:
        raise ValueError(f"{source}: the dataset is empty (0 rows)")
    names = _union_columns(rows)
    present = [name for name in IMAGE_COLUMNS if name in names]
    for index, row in enumerate(rows):
        for name in present:
            value = row.get(name)
            try:
                if isinstance(value, list):
                    row[name] = [_image_value(item, base_dir) for item in value]
                else:
                    row[name] = _image_value(value, base_dir)
            except (FileNotFoundError, TypeError) as error:
                raise type(error)(f"{source}: row {index}, column {name!r}: {error}") from None
    _typed_content(rows, names)
    _check_column_types(rows, [n for n in names if n not in present], source)
    features = datasets.Features.from_arrow_schema(pa.Table.from_pylist(rows).schema)
    for name in present:
        features[name] = datasets.Image() if name == "image" else datasets.List(datasets.Image())
    return datasets.Dataset.from_list(rows, features=features)


def _load_hub(spec: str, split: str | None) -> datasets.Dataset:
    """``name`` or ``name:split`` from the Hugging Face Hub, with a clear error when that fails (e.g. offline)."""
    name, _, spec_split = spec.partition(":")
    split = split or spec_split or "train"
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as error:  # offline, unknown name, gated, ...: all mean "cannot get this dataset"
        raise FileNotFoundError(
            f"could not load dataset {spec!r}: there is no local file or folder with that name, and loading "
            f"{name!r} (split {split!r}) from the Hugging Face Hub failed ({type(error).__name__}: {error}). "
            f"If you are offline, pass a local path: a save_to_disk folder, a folder with {JSONL_NAME}, or a "
            f".json/.jsonl/.parquet file.") from error
