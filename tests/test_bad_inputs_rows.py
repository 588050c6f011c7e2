"""Bad inputs, round 2 (issue 16): rows the processor or tokenizer would reject (class 3), one image path with EXIF
everywhere (7), inputs used only when asked (4), and the messages of class 10. Each case asserts the exact outcome:
the error names the data set, row and field, or the documented conversion happens."""

import errno
import io
import logging
import math
import os

import numpy as np
import pytest
import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image

from vlmalign import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
from vlmalign.data.collate import SequenceTooLongError
from vlmalign.data.formats import DataValidationError, load_image, normalize_row, validate_dataset


def _row(text="what color is the shape ?", answer="<answer>red</answer>", image=None):
    return {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
            "images": [image if image is not None else Image.new("RGB", (28, 28), "red")]}


def _errors(rows, kind="sft"):
    with pytest.raises(DataValidationError) as err:
        validate_dataset(rows, kind)
    return str(err.value)


def _sft(tiny_model_dir, tmp_path, rows, eval_rows=None, **kw):
    kw = {"save_strategy": "no", **kw}
    args = SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=1, disable_tqdm=True,
                     report_to="none", **kw)
    return SFTTrainer(model=str(tiny_model_dir("qwen2_vl")), args=args, train_dataset=rows, eval_dataset=eval_rows)


# ----------------------------------------------------------------------- 3. what the processor / tokenizer rejects


@pytest.mark.parametrize("token", ["<image>", "<|image_pad|>", "<start_of_image>", "<image_soft_token>",
                                   "<fake_token_around_image>", "<|vision_start|>", "<row_1_col_1>"])
def test_image_placeholder_typed_in_text(token):
    message = _errors([_row(), _row(), _row(text=f"look {token} what color ?")])
    assert f"row 2, column 'messages': message 0 (user) block 1 text contains the image" in message
    assert repr(token) in message and "1 error" in message


def test_image_placeholder_in_string_content_and_in_dpo_answer():
    row = {"messages": [{"role": "user", "content": "<image> what color ?"}, {"role": "assistant", "content": "red"}]}
    assert "row 0, column 'messages': message 0 (user) text contains the image placeholder '<image>'" in _errors([row])
    pair = {"prompt": "what color ?", "chosen": "red <|image_pad|>", "rejected": "blue"}
    assert "row 0, column 'chosen': message 0 (assistant) text contains" in _errors([pair], "preference")


def test_sharegpt_image_tags_are_still_image_blocks():
    row = {"conversations": [{"from": "human", "value": "<image>what color ?"}, {"from": "gpt", "value": "red"}],
           "images": [Image.new("RGB", (28, 28), "red")]}
    out = normalize_row(row, "sft")
    assert out["messages"][0]["content"][0] == {"type": "image"} and len(out["images"]) == 1


def test_lone_surrogate_named_with_position():
    message = _errors([_row(), _row(answer="<answer>r\ud83ded</answer>")])
    assert ("row 1, column 'messages': message 1 (assistant) block 0 text has a lone surrogate character U+D83D "
            "at position 9") in message


@pytest.mark.parametrize("size,ok", [((28, 5600), True), ((28, 5628), False), ((6000, 20), False)])
def test_extreme_aspect_ratio(size, ok):
    rows = [_row(), _row(image=Image.new("RGB", size, "red"))]
    if ok:
        assert validate_dataset(rows, "sft").valid_indices == [0, 1]
    else:
        ratio = max(size) / min(size)
        assert f"row 1, column 'images': image 0: image is {size[0]}x{size[1]}, aspect ratio {ratio:.0f}:1, above " \
               "200:1" in _errors(rows)


def _png(array, mode=None):
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def test_16_bit_png_is_scaled_to_8_bits():
    values = np.array([[0, 256, 4096, 65535]] * 4, dtype=np.uint16)
    image = load_image(_png(values))
    assert image.mode == "RGB" and [image.getpixel((x, 0))[0] for x in range(4)] == [0, 1, 16, 255]


def test_32_bit_integer_image_is_scaled_not_clipped():
    image = load_image(Image.fromarray(np.array([[0, 512, 65280]], dtype=np.int32)))
    assert [image.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (2, 2, 2), (255, 255, 255)]


def test_typed_placeholder_caught_when_the_trainer_is_built(tiny_model_dir, tmp_path):
    with pytest.raises(DataValidationError, match=r"train_dataset failed.*\n  row 3, column 'messages'.*'<image>'"):
        _sft(tiny_model_dir, tmp_path, [_row()] * 3 + [_row(text="<image> what color ?")])


# ----------------------------------------------------------------------------------- 7. EXIF orientation, everywhere


def _exif_jpeg():
    """A 40x20 JPEG, left half red and right half blue, with EXIF orientation 6 (display rotated 90 deg cw)."""
    image = Image.new("RGB", (40, 20), "red")
    image.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif, quality=95)
    return buf.getvalue()


def test_exif_orientation_applied_for_every_source(tmp_path):
    data = _exif_jpeg()
    (tmp_path / "photo.jpg").write_bytes(data)
    column = Dataset.from_dict({"image": [{"bytes": data, "path": None}]}).cast_column("image", ImageFeature())
    sources = {"bytes": data, "path": str(tmp_path / "photo.jpg"), "pil": Image.open(io.BytesIO(data)),
               "dict": {"bytes": data, "path": None}, "datasets": column[0]["image"]}
    loaded = {name: load_image(source) for name, source in sources.items()}
    for name, image in loaded.items():
        assert image.size == (20, 40), name  # rotated to portrait
        top, bottom = image.getpixel((10, 5)), image.getpixel((10, 35))
        assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60, (name, top, bottom)
    reference = np.asarray(loaded["bytes"])
    assert all(np.array_equal(np.asarray(im), reference) for im in loaded.values())


# ---------------------------------------------------------------------------------------- 4. explicit use only


def test_prompt_completion_sft_trains_the_completion_only(tiny_model_dir, tmp_path):
    prompt = [{"role": "user", "content": "what color ?"}, {"role": "assistant", "content": "maybe green"},
              {"role": "user", "content": "look again ?"}]
    row = {"prompt": prompt, "completion": [{"role": "assistant", "content": "<answer>red</answer>"}],
           "images": [Image.new("RGB", (28, 28), "red")]}
    trainer = _sft(tiny_model_dir, tmp_path, [row, row])
    batch = trainer.data_collator([trainer.train_dataset[0]])
    labels = batch["labels"][0]
    trained = trainer.processing_class.tokenizer.decode(labels[labels != -100])
    assert "red" in trained and "green" not in trained and "maybe" not in trained
    # the same conversation as `messages` trains both assistant turns (documented difference)
    messages = {"messages": prompt + row["completion"], "images": row["images"]}
    both = trainer.data_collator([normalize_row(messages, "sft")])["labels"][0]
    assert "maybe green" in trainer.processing_class.tokenizer.decode(both[both != -100])


def test_stray_reference_columns_are_ignored_without_precompute(tiny_model_dir, tmp_path, caplog):
    image = Image.new("RGB", (28, 28), "red")
    rows = [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color ?"}]}],
             "chosen": "<answer>red</answer>", "rejected": "<answer>blue</answer>", "images": [image],
             "ref_chosen_logps": -100.0, "ref_rejected_logps": 0.0}] * 2
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, logging_steps=1,
                     save_strategy="no", report_to="none", disable_tqdm=True)
    with caplog.at_level(logging.WARNING, logger="vlmalign"):
        trainer = DPOTrainer(model=str(tiny_model_dir("qwen2_vl")), args=args, train_dataset=rows)
    assert "['ref_chosen_logps', 'ref_rejected_logps']; they are ignored" in caplog.text
    assert "ref_chosen_logps" not in trainer.data_collator([trainer.train_dataset[0]])
    trainer.train()
    first = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    assert first == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1: -log sigmoid(0)


# ----------------------------------------------------------------------------------------------- 10. messages


def test_empty_dataset_says_empty(tiny_model_dir, tmp_path):
    with pytest.raises(DataValidationError, match=r"(?s)data validation of train_dataset failed.*dataset: the dataset "
                                                  r"is empty \(0 rows\)"):
        _sft(tiny_model_dir, tmp_path, [])


def test_eval_dataset_errors_name_the_eval_set(tiny_model_dir, tmp_path):
    bad = [_row(), {"messages": None}]
    with pytest.raises(DataValidationError, match=r"data validation of eval_dataset failed.*\n  row 1, column "
                                                  r"'messages'") as err:
        _sft(tiny_model_dir, tmp_path, [_row()] * 2, eval_rows=bad)
    assert err.value.dataset == "eval_dataset"


def test_every_row_too_long_is_an_error_not_an_empty_run(tiny_model_dir, tmp_path):
    with pytest.raises(SequenceTooLongError, match=r"train_dataset: every row is longer than max_length=8"):
        _sft(tiny_model_dir, tmp_path, [_row()] * 2, max_length=8)


def test_disk_full_while_saving(tiny_model_dir, tmp_path, monkeypatch):
    trainer = _sft(tiny_model_dir, tmp_path, [_row()] * 2, save_strategy="steps", save_steps=1)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(OSError, match=r"No space left on the disk of .* while writing checkpoint checkpoint-1 .*"
                                      r"earlier checkpoints are intact") as err:
        trainer.train()
    assert err.value.errno == errno.ENOSPC
    assert not [n for n in os.listdir(tmp_path / "out") if "checkpoint" in n]  # nothing half-written left


def test_no_pickle_training_args_written(tiny_model_dir, tmp_path):
    import json

    trainer = _sft(tiny_model_dir, tmp_path, [_row()] * 2, save_strategy="steps", save_steps=1)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "out" / "checkpoint-1", tmp_path / "final"):
        files = os.listdir(folder)
        assert "training_args.bin" not in files and "training_args.json" in files, files
        assert json.loads((folder / "training_args.json").read_text())["max_steps"] == 1


def test_grpo_rewards_get_every_rows_columns_and_cannot_edit_the_rows(tiny_model_dir, tmp_path):
    from vlmalign import GRPOConfig, GRPOTrainer

    images = [Image.new("RGB", (28, 28), c) for c in ("red", "blue")]
    rows = [{"prompt": "what color ?", "images": [images[0]]},                      # no 'solution' in row 0
            {"prompt": "what color ?", "images": [images[1]], "solution": "blue"}]
    seen = []

    def recording_reward(completions, solution, images, **kwargs):
        seen.extend(solution)
        for row_images in images:
            row_images[0].paste((0, 255, 0), (0, 0, 28, 28))  # an in-place edit of its copy
        return [1.0] * len(completions)

    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2, max_steps=1,
                      max_completion_length=3, shuffle_dataset=False, save_strategy="no", report_to="none",
                      disable_tqdm=True)
    GRPOTrainer(model=str(tiny_model_dir("qwen2_vl")), reward_funcs=[recording_reward], args=args,
                train_dataset=rows).train()
    assert sorted(seen, key=str) == [None, None, "blue", "blue"]
    assert images[0].getpixel((0, 0)) == (255, 0, 0) and images[1].getpixel((0, 0)) == (0, 0, 255)
