"""Tests for the synthetic visual tasks (vlmalign.data.synthetic) and dataset I/O (vlmalign.data.io).

The answer checks are independent of the generator: they read the answer back from the image pixels with a
small flood fill (no scipy), and from the scene JSON with their own code.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter, deque

import datasets
import numpy as np
import pytest

from vlmalign.data.io import load_dataset_any, save_dataset
from vlmalign.data.synthetic import (
    ANSWER_TAGS,
    COLORS,
    KINDS,
    PALETTE,
    TASK_WORDS,
    TASKS,
    extract_answer,
    make_data,
    make_dataset,
)

ALL_TASKS = list(TASKS)
EXPECTED_COLUMNS = {
    "sft": {"messages", "images", "solution", "task", "scene"},
    "preference": {"prompt", "chosen", "rejected", "images", "solution", "task", "scene"},
    "prompt": {"prompt", "images", "solution", "task", "scene"},
}
ANSWER_SPACE = {
    "color": set(COLORS),
    "shape": set(KINDS),
    "count": {"1", "2", "3", "4"},
    "count_color": {"0", "1", "2", "3", "4"},
    "left_color": set(COLORS),
}
FORMAT_PATTERNS = {
    "answer": re.compile(r"^<answer>(\S+)</answer>$"),
    "think": re.compile(r"^<think>([^<>]+)</think><answer>(\S+)</answer>$"),
    "plain": re.compile(r"^(\S+)$"),
}


# ---------------------------------------------------------------------------------------------------------------
# Independent answer checks
# ---------------------------------------------------------------------------------------------------------------


def pixels(image) -> np.ndarray:
    """An image as an (H, W, 3) uint8 array."""
    return np.asarray(image.convert("RGB"))


def foreground(array: np.ndarray) -> np.ndarray:
    """Shape pixels: the background is pale (every channel >= 200), every palette colour has a channel < 200."""
    return array.min(axis=2) < 200


def components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """4-connected components of a boolean mask, by breadth-first flood fill."""
    height, width = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    found = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        seen[y, x] = True
        queue, component = deque([(y, x)]), []
        while queue:
            cy, cx = queue.popleft()
            component.append((cy, cx))
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        found.append(component)
    return found


def color_name(rgb) -> str:
    """The palette colour with exactly this RGB value."""
    names = [name for name, value in PALETTE.items() if tuple(int(v) for v in rgb) == value]
    assert names, f"pixel colour {tuple(rgb)} is not a palette colour"
    return names[0]


def component_color(array: np.ndarray, component) -> str:
    """The most common colour of a component's pixels."""
    counts = Counter(tuple(array[y, x]) for y, x in component)
    return color_name(counts.most_common(1)[0][0])


def kind_from_fill(mask: np.ndarray) -> str:
    """Square fills its bounding box (1.0), circle ~0.785, the apex-up triangle ~0.5."""
    ys, xs = np.nonzero(mask)
    ratio = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return "square" if ratio > 0.93 else "circle" if ratio > 0.65 else "triangle"


def question_word(question: str, after: str) -> str:
    """The word following ``after`` in the question (e.g. the asked colour or side)."""
    words = question.split()
    return words[words.index(after) + 1]


def answer_from_pixels(task: str, image, question: str) -> str:
    """Recompute the answer from the image alone (plus the asked colour or side read from the question)."""
    array = pixels(image)
    mask = foreground(array)
    if task == "color":
        counts = Counter(tuple(px) for px in array[mask])
        return color_name(counts.most_common(1)[0][0])
    if task == "shape":
        return kind_from_fill(mask)
    found = components(mask)
    if task == "count":
        return str(len(found))
    if task == "count_color":
        asked = question_word(question, "many")
        return str(sum(component_color(array, c) == asked for c in found))
    if task == "left_color":
        ordered = sorted(found, key=lambda c: min(x for _, x in c))
        side = question_word(question, "the")
        return component_color(array, ordered[0] if side == "left" else ordered[-1])
    raise AssertionError(task)


def answer_from_scene(task: str, scene: dict, question: str) -> str:
    """Recompute the answer from the scene JSON (plus the question), without the library's answer functions."""
    shapes = scene["shapes"]
    if task == "color":
        return shapes[0]["color"]
    if task == "shape":
        return shapes[0]["kind"]
    if task == "count":
        return str(len(shapes))
    if task == "count_color":
        return str(sum(s["color"] == question_word(question, "many") for s in shapes))
    if task == "left_color":
        ordered = sorted(shapes, key=lambda s: s["center"][0])
        return (ordered[0] if question_word(question, "the") == "left" else ordered[-1])["color"]
    raise AssertionError(task)


def question_of(row: dict) -> str:
    messages = row["messages"] if "messages" in row else row["prompt"]
    return messages[0]["content"][1]["text"]


def assistant_text(messages: list[dict]) -> str:
    return messages[-1]["content"][0]["text"]


def image_bytes(ds: datasets.Dataset) -> list[bytes]:
    """The stored (encoded) bytes of every row's images, without decoding."""
    table = ds.with_format("arrow")[:]
    return [item["bytes"] for images in table.column("images").to_pylist() for item in images]


def text_columns(ds: datasets.Dataset) -> dict:
    return {name: ds[name] for name in ds.column_names if name != "images"}


# ---------------------------------------------------------------------------------------------------------------
# Reproducibility and splits
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ALL_TASKS)
def test_same_seed_gives_identical_dataset(task):
    first = make_dataset(task, "preference", n=40, seed=3, answer_format="think")
    second = make_dataset(task, "preference", n=40, seed=3, answer_format="think")
    assert image_bytes(first) == image_bytes(second)
    assert text_columns(first) == text_columns(second)


def test_images_do_not_depend_on_row_format_or_answer_format():
    reference = image_bytes(make_dataset("count", "sft", n=30, seed=1))
    assert image_bytes(make_dataset("count", "preference", n=30, seed=1, answer_format="plain")) == reference
    assert image_bytes(make_dataset("count", "prompt", n=30, seed=1, answer_format="think")) == reference


def test_different_seeds_differ():
    a = make_dataset("color", "sft", n=50, seed=0)
    b = make_dataset("color", "sft", n=50, seed=1)
    assert set(image_bytes(a)).isdisjoint(image_bytes(b))
    assert a["scene"] != b["scene"]


@pytest.mark.parametrize("task", ["color", "count", "left_color"])
def test_train_validation_test_are_disjoint(task):
    hashes = {}
    for split in ("train", "validation", "test"):
        ds = make_dataset(task, "prompt", n=400, seed=0, split=split)
        hashes[split] = {hashlib.sha256(pixels(img).tobytes()).hexdigest() for img in
                         (row[0] for row in ds["images"])}
    assert hashes["train"].isdisjoint(hashes["test"])
    assert hashes["train"].isdisjoint(hashes["validation"])
    assert hashes["validation"].isdisjoint(hashes["test"])


def test_unknown_arguments_are_rejected():
    with pytest.raises(ValueError, match="task"):
        make_dataset("nope")
    with pytest.raises(ValueError, match="format"):
        make_dataset("color", "nope")
    with pytest.raises(ValueError, match="answer_format"):
        make_dataset("color", answer_format="nope")
    with pytest.raises(ValueError, match="split"):
        make_dataset("color", split="nope")


def test_generation_is_fast():
    start = time.perf_counter()
    make_dataset("count_color", "sft", n=2000, seed=0)  # the slowest task; about 0.5 s here
    assert time.perf_counter() - start < 5.0


# ---------------------------------------------------------------------------------------------------------------
# Answers are right: from the pixels, and from the scene
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ALL_TASKS)
def test_answers_match_image_pixels(task):
    ds = make_dataset(task, "sft", n=120, seed=5, split="test")
    for row in ds:
        assert answer_from_pixels(task, row["images"][0], question_of(row)) == row["solution"]


def test_answers_match_pixels_on_larger_images():
    for task in ("shape", "count"):
        ds = make_dataset(task, "sft", n=30, seed=2, image_size=56)
        for row in ds:
            assert row["images"][0].size == (56, 56)
            assert answer_from_pixels(task, row["images"][0], question_of(row)) == row["solution"]


@pytest.mark.parametrize("task", ALL_TASKS)
def test_scene_describes_the_image_and_gives_the_answer(task):
    ds = make_dataset(task, "sft", n=80, seed=6)
    for row in ds:
        scene = json.loads(row["scene"])
        array = pixels(row["images"][0])
        size = scene["image_size"]
        assert array.shape == (size, size, 3)
        assert all(200 <= c <= 255 for c in scene["background"])
        assert (array == scene["background"]).all(axis=2).any()  # the background is visible
        drawn = {color_name(px) for px in array[foreground(array)]}
        assert drawn == {s["color"] for s in scene["shapes"]}
        for shape in scene["shapes"]:
            assert tuple(shape["rgb"]) == PALETTE[shape["color"]] and shape["kind"] in KINDS
            for c in shape["center"]:
                assert shape["radius"] - 1e-6 <= c <= size - 1 - shape["radius"] + 1e-6  # fully inside
        assert answer_from_scene(task, scene, question_of(row)) == row["solution"]


def test_color_task_follows_the_learnable_recipe():
    ds = make_dataset("color", "sft", n=600, seed=0)
    assert set(ds["task"]) == {"color"}
    counts = Counter(ds["solution"])
    assert set(counts) == set(COLORS) and min(counts.values()) > 60  # roughly balanced, chance 1/6
    for row in ds.select(range(100)):
        scene = json.loads(row["scene"])
        assert len(scene["shapes"]) == 1 and scene["image_size"] == 28
        assert 0.20 * 28 - 0.01 <= scene["shapes"][0]["radius"] <= 0.35 * 28 + 0.01
        assert question_of(row) == "what color is the shape ?"
        assert assistant_text(row["messages"]) == f"<answer>{row['solution']}</answer>"


def test_answer_distributions_cover_the_answer_space():
    assert set(make_dataset("count", "prompt", n=300)["solution"]) == {"1", "2", "3", "4"}
    assert {"0", "1", "2"} <= set(make_dataset("count_color", "prompt", n=300)["solution"])
    assert set(make_dataset("shape", "prompt", n=300)["solution"]) == set(KINDS)
    questions = {question_of(row) for row in make_dataset("left_color", "prompt", n=50)}
    assert questions == {"what color is the left shape ?", "what color is the right shape ?"}


# ---------------------------------------------------------------------------------------------------------------
# Row formats and answer formats
# ---------------------------------------------------------------------------------------------------------------


def check_message(message: dict, role: str) -> None:
    assert message["role"] == role
    types = [block["type"] for block in message["content"]]
    if role == "user":
        assert types == ["image", "text"]
    else:
        assert types == ["text"]


@pytest.mark.parametrize("row_format", ["sft", "preference", "prompt"])
def test_row_formats_have_the_documented_columns(row_format):
    ds = make_dataset("count_color", row_format, n=10, seed=0)
    assert set(ds.column_names) == EXPECTED_COLUMNS[row_format]
    for row in ds:
        assert len(row["images"]) == 1 and row["images"][0].mode == "RGB"
        assert row["task"] == "count_color" and isinstance(json.loads(row["scene"]), dict)
        if row_format == "sft":
            assert len(row["messages"]) == 2
            check_message(row["messages"][0], "user")
            check_message(row["messages"][1], "assistant")
        else:
            assert len(row["prompt"]) == 1
            check_message(row["prompt"][0], "user")
        if row_format == "preference":
            check_message(row["chosen"][0], "assistant")
            check_message(row["rejected"][0], "assistant")


@pytest.mark.parametrize("task", ALL_TASKS)
@pytest.mark.parametrize("answer_format", ["answer", "think", "plain"])
def test_preference_pairs_are_gold_versus_plausible_wrong(task, answer_format):
    ds = make_dataset(task, "preference", n=30, seed=4, answer_format=answer_format)
    for row in ds:
        chosen, rejected = assistant_text(row["chosen"]), assistant_text(row["rejected"])
        assert FORMAT_PATTERNS[answer_format].match(chosen) and FORMAT_PATTERNS[answer_format].match(rejected)
        assert extract_answer(chosen) == row["solution"]
        wrong = extract_answer(rejected)
        assert wrong != row["solution"] and wrong in ANSWER_SPACE[task]


@pytest.mark.parametrize("answer_format", ["answer", "think", "plain"])
def test_answer_formats_render_as_documented(answer_format):
    for task in ALL_TASKS:
        for row in make_dataset(task, "sft", n=10, seed=0, answer_format=answer_format):
            text = assistant_text(row["messages"])
            match = FORMAT_PATTERNS[answer_format].match(text)
            assert match, text
            assert match.groups()[-1] == row["solution"]
            assert extract_answer(text) == row["solution"]
            if answer_format == "think":
                assert match.group(1).strip()  # a non-empty reasoning


def test_extract_answer():
    assert extract_answer("<answer>red</answer>") == "red"
    assert extract_answer("<think>the shape is red .</think><answer> blue </answer>") == "blue"
    assert extract_answer("<answer>red</answer> no <answer>green</answer>") == "green"
    assert extract_answer("  red \n") == "red"
    assert extract_answer("<answer>red") is None
    assert extract_answer("") is None
    assert extract_answer(None) is None


def test_every_question_and_answer_word_is_a_task_word():
    assert len(TASK_WORDS) == len(set(TASK_WORDS))
    assert all(word and not any(ch.isspace() for ch in word) for word in TASK_WORDS)
    assert set(str(d) for d in range(10)) <= set(TASK_WORDS)
    assert ANSWER_TAGS == ["<think>", "</think>", "<answer>", "</answer>"]
    vocabulary = set(TASK_WORDS)
    for task in ALL_TASKS:
        for row in make_dataset(task, "preference", n=40, seed=0, answer_format="think"):
            texts = [question_of(row), assistant_text(row["chosen"]), assistant_text(row["rejected"])]
            for text in texts:
                for tag in ANSWER_TAGS:
                    text = text.replace(tag, " ")
                assert set(text.split()) <= vocabulary, text


# ---------------------------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------------------------


def assert_same_rows(original: datasets.Dataset, loaded: datasets.Dataset) -> None:
    assert len(loaded) == len(original)
    assert text_columns(loaded) == text_columns(original)
    for a, b in zip(original["images"], loaded["images"]):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert np.array_equal(pixels(x), pixels(y))


@pytest.mark.parametrize("fmt", ["disk", "jsonl"])
def test_io_round_trip(tmp_path, fmt):
    ds = make_dataset("left_color", "preference", n=12, seed=0, answer_format="think")
    out = save_dataset(ds, tmp_path / "data", fmt=fmt)
    loaded = load_dataset_any(str(out))
    assert_same_rows(ds, loaded)
    assert isinstance(loaded.features["images"].feature, datasets.Image)
    if fmt == "jsonl":
        first = json.loads((out / "data.jsonl").read_text().splitlines()[0])
        assert first["images"] == ["images/0_0.png"] and (out / "images" / "0_0.png").is_file()
        assert_same_rows(ds, load_dataset_any(str(out / "data.jsonl")))


def test_load_json_and_parquet_with_relative_image_paths(tmp_path):
    ds = make_dataset("color", "sft", n=5, seed=0)
    save_dataset(ds, tmp_path / "src", fmt="jsonl")
    rows = [json.loads(line) for line in (tmp_path / "src" / "data.jsonl").read_text().splitlines()]
    (tmp_path / "src" / "rows.json").write_text(json.dumps(rows))  # a JSON array
    assert_same_rows(ds, load_dataset_any(str(tmp_path / "src" / "rows.json")))
    single = [{"image": r["images"][0], "solution": r["solution"]} for r in rows]  # one `image` column
    datasets.Dataset.from_list(single).to_parquet(str(tmp_path / "src" / "single.parquet"))
    loaded = load_dataset_any(str(tmp_path / "src" / "single.parquet"))
    assert isinstance(loaded.features["image"], datasets.Image)
    assert np.array_equal(pixels(loaded[2]["image"]), pixels(ds[2]["images"][0]))
    ds.to_parquet(str(tmp_path / "embedded.parquet"))  # images embedded as bytes
    assert_same_rows(ds, load_dataset_any(str(tmp_path / "embedded.parquet")))


def test_load_dataset_dict_folder_picks_the_split(tmp_path):
    both = datasets.DatasetDict(train=make_dataset("color", "sft", n=4), test=make_dataset("color", "sft", n=3,
                                                                                            split="test"))
    for fmt in ("disk", "jsonl"):
        out = save_dataset(both, tmp_path / fmt, fmt=fmt)
        assert len(load_dataset_any(str(out))) == 4
        assert len(load_dataset_any(str(out), split="test")) == 3
        with pytest.raises(ValueError, match="validation"):
            load_dataset_any(str(out), split="validation")


def test_make_data_saves_one_split(tmp_path):
    out = make_data("shape", "prompt", n=6, seed=1, out=tmp_path / "shape", split="test", fmt="jsonl")
    loaded = load_dataset_any(str(out))
    assert_same_rows(make_dataset("shape", "prompt", n=6, seed=1, split="test"), loaded)


def test_missing_paths_raise_errors_naming_them(tmp_path):
    for missing in (tmp_path / "nowhere", tmp_path / "rows.jsonl", "./no/such/dir"):
        with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
            load_dataset_any(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "empty"))):
        load_dataset_any(str(tmp_path / "empty"))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"images": ["pics/missing.png"]}) + "\n")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_dataset_any(str(tmp_path / "bad.jsonl"))


def test_hub_failure_gives_a_clear_error(monkeypatch):
    calls = []

    def offline(name, split=None, **kwargs):
        calls.append((name, split))
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match="some-org/some-set") as info:
        load_dataset_any("some-org/some-set:validation")
    assert calls == [("some-org/some-set", "validation")]
    assert "offline" in str(info.value)
