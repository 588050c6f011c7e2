"""Tests for vlmalign.data.formats: accepted input variants, the internal form, and one test per bad input."""

import io
import pickle
import random

import pytest
from datasets import Dataset, Image as ImageFeature, Sequence
from PIL import Image

from vlmalign.data.formats import (
    DataValidationError,
    RowError,
    ValidationReport,
    detect_kind,
    load_image,
    normalize_row,
    validate_dataset,
)

IMG = {"type": "image"}


def txt(s):
    return {"type": "text", "text": s}


def user(*content):
    return {"role": "user", "content": list(content)}


def assistant(*content):
    return {"role": "assistant", "content": list(content)}


def rgb(color=(10, 20, 30), size=(8, 8)):
    return Image.new("RGB", size, color)


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def noise_png(size=(64, 64)):
    rng = random.Random(0)
    return png_bytes(Image.frombytes("RGB", size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * 3))))


def sft_row(images=None, **extra):
    row = {"messages": [user(IMG, txt("What is this?")), assistant(txt("A square."))]}
    row["images"] = [rgb()] if images is None else images
    return {**row, **extra}


def assert_row_error(excinfo, row, column, *fragments):
    """The error names the row index, the column and the problem."""
    err = excinfo.value
    assert (err.row, err.column) == (row, column)
    message = str(err)
    assert f"row {row}" in message and repr(column) in message, message
    for fragment in fragments:
        assert fragment in message, message


# ------------------------------------------------------------------------------------------- accepted inputs


def test_sft_messages_typed_blocks():
    image = rgb()
    row = {"messages": [user(IMG, txt("Q")), assistant(txt("A"))], "images": [image], "id": 7}
    out = normalize_row(row, "sft")
    assert out["messages"] == [user(IMG, txt("Q")), assistant(txt("A"))]
    assert out["images"][0].mode == "RGB" and out["images"][0].tobytes() == image.tobytes()
    assert out["id"] == 7 and set(out) == {"messages", "images", "id", "completion_start"}
    assert out["completion_start"] == 0


def test_string_content_becomes_text_block_and_input_not_mutated():
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello"}]}
    snapshot = repr(row)
    out = normalize_row(row, "sft")
    assert out["messages"] == [{"role": "system", "content": [txt("Be brief.")]}, user(txt("Hi")),
                               assistant(txt("Hello"))]
    assert out["images"] == [] and repr(row) == snapshot


def test_sft_prompt_completion_strings_and_lists():
    out = normalize_row({"prompt": "Describe.", "completion": "Red.", "images": [rgb()]}, "sft")
    assert out["messages"] == [user(IMG, txt("Describe.")), assistant(txt("Red."))]
    out = normalize_row({"prompt": [user(IMG, txt("Q"))], "completion": [assistant(txt("A"))],
                         "images": [rgb()]}, "sft")
    assert out["messages"] == [user(IMG, txt("Q")), assistant(txt("A"))] and "prompt" not in out


def test_sharegpt_conversations_with_image_tags():
    row = {"conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}],
           "images": [rgb()]}
    out = normalize_row(row, "sft")
    assert out["messages"] == [user(IMG, txt("\nWhat?")), assistant(txt("A cat."))]
    assert "conversations" not in out and len(out["images"]) == 1


def test_placeholder_inserted_at_start_of_first_user_turn():
    row = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Compare."},
                        {"role": "assistant", "content": "Same."}], "images": [rgb(), rgb((1, 1, 1))]}
    out = normalize_row(row, "sft")
    assert out["messages"][0]["content"] == [txt("S")]
    assert out["messages"][1]["content"] == [IMG, IMG, txt("Compare.")]
    assert out["images"][1].getpixel((0, 0)) == (1, 1, 1)


def test_single_image_column_and_image_none_is_text_only():
    out = normalize_row({"prompt": "What colour?", "image": rgb((255, 0, 0)), "answer": "red"}, "prompt")
    assert out["prompt"] == [user(IMG, txt("What colour?"))]
    assert out["images"][0].getpixel((0, 0)) == (255, 0, 0) and out["answer"] == "red"
    out = normalize_row({"prompt": "2+2?", "image": None}, "prompt")
    assert out["images"] == [] and out["prompt"] == [user(txt("2+2?"))] and "image" not in out


def test_inline_image_blocks_moved_into_images_in_order(tmp_path):
    path = tmp_path / "blue.png"
    rgb((0, 0, 255)).save(path)
    row = {"messages": [user({"type": "image", "image": rgb((255, 0, 0))}, txt("and"),
                             {"type": "image", "image": str(path)}), assistant(txt("red, blue"))]}
    out = normalize_row(row, "sft")
    assert out["messages"][0] == user(IMG, txt("and"), IMG)
    assert [im.getpixel((0, 0)) for im in out["images"]] == [(255, 0, 0), (0, 0, 255)]
    assert row["messages"][0]["content"][0]["image"].mode == "RGB"  # input untouched


def test_image_sources_path_pathlib_bytes_and_dict(tmp_path):
    path = tmp_path / "a.png"
    rgb((5, 6, 7)).save(path)
    data = path.read_bytes()
    for source in (str(path), path, data, {"bytes": data, "path": None}, {"bytes": None, "path": str(path)}):
        image = load_image(source)
        assert image.mode == "RGB" and image.getpixel((0, 0)) == (5, 6, 7)


def test_preference_explicit_prompt_strings():
    out = normalize_row({"prompt": "Q?", "chosen": "good", "rejected": "bad", "images": [rgb()]}, "preference")
    assert out["prompt"] == [user(IMG, txt("Q?"))]
    assert out["chosen"] == [assistant(txt("good"))] and out["rejected"] == [assistant(txt("bad"))]
    assert len(out["images"]) == 1


def test_preference_implicit_prompt_extracted():
    shared = [{"role": "system", "content": "S"}, {"role": "user", "content": [IMG, txt("Q")]}]
    row = {"chosen": shared + [{"role": "assistant", "content": "good"}],
           "rejected": shared + [{"role": "assistant", "content": "bad"}], "images": [rgb()]}
    out = normalize_row(row, "preference")
    assert out["prompt"] == [{"role": "system", "content": [txt("S")]}, user(IMG, txt("Q"))]
    assert out["chosen"] == [assistant(txt("good"))] and out["rejected"] == [assistant(txt("bad"))]


def test_implicit_prompt_is_cut_back_to_a_user_turn():
    start = [user(txt("Q")), assistant(txt("Hmm."))]
    out = normalize_row({"chosen": start + [assistant(txt("yes"))], "rejected": start + [assistant(txt("no"))]},
                        "preference")
    assert out["prompt"] == [user(txt("Q"))] and out["chosen"] == [assistant(txt("Hmm.")), assistant(txt("yes"))]


def test_prompt_copy_at_start_of_chosen_is_removed():
    row = {"prompt": [user(txt("Q"))], "chosen": [user(txt("Q")), assistant(txt("a"))],
           "rejected": [user(txt("Q")), assistant(txt("b"))]}
    out = normalize_row(row, "preference")
    assert out["chosen"] == [assistant(txt("a"))] and out["rejected"] == [assistant(txt("b"))]


def test_rl_prompt_message_list_keeps_other_columns():
    row = {"prompt": [{"role": "system", "content": "S"}, user(IMG, txt("Count."))], "images": [rgb()],
           "solution": "3", "meta": {"k": 1}}
    out = normalize_row(row, "prompt")
    assert out["prompt"][1] == user(IMG, txt("Count.")) and out["solution"] == "3" and out["meta"] == {"k": 1}


@pytest.mark.parametrize("mode", ["L", "CMYK", "I;16", "1"])
def test_non_rgb_modes_converted(mode):
    image = load_image(Image.new(mode, (4, 4)))
    assert image.mode == "RGB" and image.size == (4, 4)


def test_rgba_la_and_palette_transparency_composited_on_white():
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 255))
    out = load_image(png_bytes(rgba))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (255, 0, 0)
    assert load_image(Image.new("LA", (1, 1), (0, 0))).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (1, 1), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert load_image(palette).getpixel((0, 0)) == (255, 255, 255)


def test_conversions_counted_in_report():
    rows = [sft_row([Image.new("L", (4, 4))]), sft_row([Image.new("CMYK", (4, 4))]), sft_row()]
    report = validate_dataset(rows, "sft")
    assert report.num_converted_images == 2 and report.valid_indices == [0, 1, 2] and not report.errors
    assert "3 of 3 rows valid" in report.summary()


def test_detect_kind():
    assert detect_kind(["messages", "images"]) == "sft"
    assert detect_kind(["prompt", "completion"]) == "sft"
    assert detect_kind(["prompt", "chosen", "rejected", "images"]) == "preference"
    assert detect_kind(["chosen", "rejected"]) == "preference"
    assert detect_kind(["prompt", "image", "solution"]) == "prompt"
    with pytest.raises(ValueError, match="cannot tell"):
        detect_kind(["text"])


# ---------------------------------------------------------------------------------------- one test per bad input


def test_missing_required_column_is_dataset_level_and_lists_columns():
    ds = Dataset.from_list([{"prompt": "Q", "chosen": "a"}])
    with pytest.raises(DataValidationError) as excinfo:
        validate_dataset(ds, "preference")
    (err,) = excinfo.value.errors
    assert err.row is None and err.column == "rejected"
    assert "'rejected'" in str(excinfo.value) and "'prompt', 'chosen'" in str(excinfo.value)


def test_missing_column_in_one_row():
    with pytest.raises(RowError) as excinfo:
        normalize_row({"prompt": "Q", "chosen": "a"}, "preference", 4)
    assert_row_error(excinfo, 4, "rejected", "missing")


def test_none_where_value_required():
    with pytest.raises(RowError) as excinfo:
        normalize_row({"prompt": None, "images": []}, "prompt", 2)
    assert_row_error(excinfo, 2, "prompt", "None")
    row = {"messages": [user(txt("Q")), {"role": "assistant", "content": None}]}
    with pytest.raises(RowError) as excinfo:
        normalize_row(row, "sft", 3)
    assert_row_error(excinfo, 3, "messages", "message 1 (assistant) content is None")


def test_unknown_role():
    row = {"messages": [{"role": "bot", "content": "hi"}, assistant(txt("A"))]}
    with pytest.raises(RowError) as excinfo:
        normalize_row(row, "sft", 5)
    assert_row_error(excinfo, 5, "messages", "unknown role 'bot'")


def test_empty_turn():
    row = {"messages": [user(txt("  ")), assistant(txt("A"))], "images": []}
    with pytest.raises(RowError) as excinfo:
        normalize_row(row, "sft", 6)
    assert_row_error(excinfo, 6, "messages", "message 0 (user) is empty")


@pytest.mark.parametrize("column, kind, row", [
    ("completion", "sft", {"prompt": "Q", "completion": ""}),
    ("chosen", "preference", {"prompt": "Q", "chosen": " ", "rejected": "b"}),
    ("rejected", "preference", {"prompt": "Q", "chosen": "a", "rejected": [assistant(txt(""))]}),
])
def test_empty_answer_text(column, kind, row):
    with pytest.raises(RowError) as excinfo:
        normalize_row(row, kind, 8)
    assert_row_error(excinfo, 8, column, f"empty {column} text")


def test_non_string_text():
    row = {"messages": [user({"type": "text", "text": 42}), assistant(txt("A"))]}
    with pytest.raises(RowError) as excinfo:
        normalize_row(row, "sft", 9)
    assert_row_error(excinfo, 9, "messages", "message 0 (user) block 0 text is a int", "expected a string")


def test_chosen_identical_to_rejected():
    with pytest.raises(RowError) as excinfo:
        normalize_row({"prompt": "Q", "chosen": "same", "rejected": "same"}, "preference", 10)
    assert_row_error(excinfo, 10, "rejected", "identical to 'chosen'")
    same = [user(txt("Q")), assistant(txt("same"))]
    with pytest.raises(RowError) as excinfo:  # implicit-prompt form
        normalize_row({"chosen": same, "rejected": list(same)}, "preference", 11)
    assert_row_error(excinfo, 11, "rejected", "identical to 'chosen'")


def test_image_placeholder_count_mismatch():
    with pytest.raises(RowError) as excinfo:
        normalize_row(sft_row([rgb(), rgb()]), "sft", 3)
    assert_row_error(excinfo, 3, "images", "2 images but 1 image placeholder")
    with pytest.raises(RowError) as excinfo:
        normalize_row(sft_row([]), "sft", 4)
    assert_row_error(excinfo, 4, "images", "0 images but 1 image placeholder")


def test_image_path_missing_names_the_path(tmp_path):
    missing = str(tmp_path / "nope.png")
    with pytest.raises(RowError) as excinfo:
        normalize_row(sft_row([missing]), "sft", 12)
    assert_row_error(excinfo, 12, "images", "image 0", "not found", missing)


def test_unreadable_image_bytes():
    with pytest.raises(RowError) as excinfo:
        normalize_row({"prompt": "Q", "image": b"not an image"}, "prompt", 13)
    assert_row_error(excinfo, 13, "image", "cannot read image")


def test_truncated_png_caught():
    data = noise_png()
    with pytest.raises(RowError) as excinfo:
        normalize_row(sft_row([data[: len(data) // 2]]), "sft", 14)
    assert_row_error(excinfo, 14, "images", "truncated")


def test_decompression_bomb_checked_before_decoding():
    with pytest.raises(RowError) as excinfo:
        normalize_row(sft_row([png_bytes(rgb(size=(40, 30)))]), "sft", 15, max_image_pixels=1000)
    assert_row_error(excinfo, 15, "images", "40x30", "max_image_pixels=1,000")
    # Header-only check: a truncated file whose header claims too many pixels is refused as too large.
    data = noise_png()
    with pytest.raises(ValueError, match="above max_image_pixels"):
        load_image(data[: len(data) // 2], max_image_pixels=100)
    assert normalize_row(sft_row([png_bytes(rgb(size=(40, 30)))]), "sft", max_image_pixels=1200)["images"]


def test_preference_prompt_must_end_with_user_turn():
    row = {"prompt": [user(txt("Q")), assistant(txt("hm"))], "chosen": "a", "rejected": "b"}
    with pytest.raises(RowError) as excinfo:
        normalize_row(row, "preference", 16)
    assert_row_error(excinfo, 16, "prompt", "must end with a user turn")


def test_rl_prompt_with_assistant_turn():
    row = {"prompt": [user(txt("Q")), assistant(txt("A")), user(txt("Again?"))]}
    with pytest.raises(RowError) as excinfo:
        normalize_row(row, "prompt", 17)
    assert_row_error(excinfo, 17, "prompt", "message 1 is an assistant turn")


def test_sft_without_assistant_turn():
    with pytest.raises(RowError) as excinfo:
        normalize_row({"messages": [user(txt("Q"))]}, "sft", 18)
    assert_row_error(excinfo, 18, "messages", "no assistant turn")


def test_image_block_in_chosen_rejected():
    row = {"prompt": "Q", "chosen": [assistant(IMG, txt("a"))], "rejected": "b", "images": [rgb()]}
    with pytest.raises(RowError) as excinfo:
        normalize_row(row, "preference", 19)
    assert_row_error(excinfo, 19, "chosen", "images belong to the prompt")


@pytest.mark.parametrize("column, row, fragment", [
    ("image", {"prompt": "Q", "image": rgb(), "images": [rgb()]}, "both 'image' and a non-empty 'images'"),
    ("images", {"prompt": "Q", "images": rgb()}, "expected a list of images"),
    ("prompt", {"prompt": [user({"type": "video"})]}, "unsupported type 'video'"),
    ("prompt", {"prompt": ["hi"]}, "message 0 is a str"),
    ("prompt", {"prompt": 3}, "expected a string or a list of messages, got int"),
    ("images", {"prompt": "Q", "images": [None]}, "image 0 is None"),
])
def test_other_malformed_rows(column, row, fragment):
    with pytest.raises(RowError) as excinfo:
        normalize_row(row, "prompt", 20)
    assert_row_error(excinfo, 20, column, fragment)


# --------------------------------------------------------------------------------------- datasets and reports


def test_multiple_errors_all_listed_and_drop_returns_valid_indices(tmp_path):
    rows = [sft_row(), sft_row([rgb(), rgb()]), sft_row(), {"messages": [user(txt("Q"))], "images": []},
            sft_row([str(tmp_path / "gone.png")])]
    with pytest.raises(DataValidationError) as excinfo:
        validate_dataset(rows, "sft")
    err = excinfo.value
    assert [(e.row, e.column) for e in err.errors] == [(1, "images"), (3, "messages"), (4, "images")]
    message = str(err)
    assert "3 errors in 5 rows" in message
    assert "row 1, column 'images': 2 images but 1 image placeholder" in message
    assert "row 3, column 'messages'" in message and "row 4, column 'images'" in message
    report = validate_dataset(rows, "sft", on_error="drop")
    assert isinstance(report, ValidationReport) and report.valid_indices == [0, 2] and report.num_rows == 5
    assert len(report.errors) == 3 and "2 of 5 rows valid, 3 invalid" in report.summary()


def test_error_list_truncated_after_50_lines():
    err = DataValidationError([RowError(i, "images", "bad") for i in range(60)], 60)
    assert "row 49, column 'images': bad" in str(err) and "row 50," not in str(err)
    assert "... and 10 more" in str(err)
    assert pickle.loads(pickle.dumps(err)).errors[3].row == 3


def test_hf_dataset_with_decoded_images_and_truncated_row():
    """datasets casts PIL images to its Image feature; a truncated image must be a row error, not a crash."""
    good = noise_png((16, 16))
    rows = [sft_row([Image.open(io.BytesIO(good))]), sft_row([]), sft_row([Image.new("RGBA", (4, 4))])]
    ds = Dataset.from_list(rows)
    assert isinstance(ds[0]["images"][0], Image.Image)  # rows come back decoded
    assert normalize_row(ds[0], "sft")["images"][0].size == (16, 16)
    report = validate_dataset(ds, "sft", on_error="drop")
    assert report.valid_indices == [0, 2] and report.num_converted_images == 1
    assert (report.errors[0].row, report.errors[0].column) == (1, "images")

    truncated = Dataset.from_dict({"messages": [r["messages"] for r in rows[:2]],
                                   "images": [[{"bytes": good, "path": None}],
                                              [{"bytes": good[: len(good) // 2], "path": None}]]}
                                  ).cast_column("images", Sequence(ImageFeature(decode=False)))
    with pytest.raises(DataValidationError) as excinfo:
        validate_dataset(truncated, "sft")
    (err,) = excinfo.value.errors
    assert (err.row, err.column) == (1, "images") and "truncated" in str(excinfo.value)


def test_hf_dataset_undecoded_images_and_text_only_rows():
    ds = Dataset.from_list([sft_row(), {"messages": [user(txt("Hi")), assistant(txt("Yo"))], "images": []}])
    ds = ds.cast_column("images", Sequence(ImageFeature(decode=False)))
    assert isinstance(ds[0]["images"][0], dict)
    assert normalize_row(ds[0], "sft")["images"][0].mode == "RGB"  # arrow's None-filled struct fields are fine
    report = validate_dataset(ds, "sft")
    assert report.valid_indices == [0, 1] and report.num_rows == 2
    report = validate_dataset(ds.to_iterable_dataset(), "sft")
    assert report.valid_indices == [0, 1] and report.num_rows == 2


def test_hf_dataset_single_image_column_with_none():
    ds = Dataset.from_list([{"prompt": "Q", "image": rgb(), "answer": "a"}, {"prompt": "Q2", "image": None,
                                                                              "answer": "b"}])
    report = validate_dataset(ds, "prompt")
    assert report.valid_indices == [0, 1]
    with pytest.raises(DataValidationError) as excinfo:
        validate_dataset(ds.select([0, 1, 0]), "prompt", max_image_pixels=10)
    assert [(e.row, e.column) for e in excinfo.value.errors] == [(0, "image"), (2, "image")]
