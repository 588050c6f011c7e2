"""The bad-input matrix, end to end: each case is caught when the trainer is built (before any training step) with
an error naming the row and the field, or handled by a documented policy (conversion, drop + count)."""

import io

import pytest
import torch
from datasets import Dataset
from PIL import Image

from vlmalign import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer
from vlmalign.data.collate import SequenceTooLongError
from vlmalign.data.formats import DataValidationError


def _png(color="red", mode="RGB", size=(28, 28)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG" if mode != "CMYK" else "JPEG")
    return buf.getvalue()


def _sft_row(image=None, text="what color is the shape ?", answer="<answer>red</answer>", placeholders=1):
    content = [{"type": "image"}] * placeholders + [{"type": "text", "text": text}]
    row = {"messages": [{"role": "user", "content": content},
                        {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}
    row["images"] = [Image.new("RGB", (28, 28), "red")] if image is None else image
    return row


def _sft(tiny_model_dir, tmp_path, rows, **kw):
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, save_strategy="no",
                     disable_tqdm=True, report_to="none", **kw)
    return SFTTrainer(model=str(tiny_model_dir("qwen2_vl")), args=args, train_dataset=rows)


def _expect(tiny_model_dir, tmp_path, rows, *fragments, **kw):
    with pytest.raises((DataValidationError, SequenceTooLongError)) as err:
        _sft(tiny_model_dir, tmp_path, rows, **kw)
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)
    return str(err.value)


def good(n=3):
    return [_sft_row() for _ in range(n)]


def test_missing_image_file(tiny_model_dir, tmp_path):
    _expect(tiny_model_dir, tmp_path, good() + [_sft_row(image=[str(tmp_path / "nope.png")])],
            "row 3", "'images'", "nope.png")


def test_more_images_than_placeholders(tiny_model_dir, tmp_path):
    two = [Image.new("RGB", (28, 28), "red")] * 2
    _expect(tiny_model_dir, tmp_path, [_sft_row(image=two)] + good(), "row 0", "'images'", "2 images")


def test_fewer_images_than_placeholders(tiny_model_dir, tmp_path):
    _expect(tiny_model_dir, tmp_path, good(2) + [_sft_row(placeholders=2)], "row 2", "'images'")


def test_unreadable_and_truncated_image_bytes(tiny_model_dir, tmp_path):
    data = _png()
    rows = good(1) + [_sft_row(image=[b"not an image"]), _sft_row(image=[data[: len(data) // 2]])]
    message = _expect(tiny_model_dir, tmp_path, rows, "row 1", "row 2", "'images'")
    assert "2 errors" in message  # every bad row listed, not only the first


def test_image_too_large_decompression_bomb(tiny_model_dir, tmp_path):
    big = _png(size=(200, 200))
    _expect(tiny_model_dir, tmp_path, good() + [_sft_row(image=[big])], "row 3", "'images'",
            max_image_pixels=100 * 100)


@pytest.mark.parametrize("mode,color", [("L", 128), ("RGBA", (255, 0, 0, 0)), ("CMYK", (0, 255, 255, 0)), ("P", 3)])
def test_non_rgb_images_are_converted_and_train(tiny_model_dir, tmp_path, mode, color):
    image = Image.new(mode, (28, 28), color)
    trainer = _sft(tiny_model_dir, tmp_path, good(1) + [_sft_row(image=[image])])
    assert trainer.train_dataset[1]["images"][0].mode == "RGB"
    trainer.train()


def test_empty_completion(tiny_model_dir, tmp_path):
    _expect(tiny_model_dir, tmp_path, good() + [{"prompt": "what color is the shape ?", "completion": "  "}],
            "row 3", "'completion'")


def test_non_string_content(tiny_model_dir, tmp_path):
    _expect(tiny_model_dir, tmp_path, good() + [_sft_row(text=42)], "row 3", "'messages'")


def test_none_values(tiny_model_dir, tmp_path):
    row = _sft_row()
    row["messages"] = None
    _expect(tiny_model_dir, tmp_path, good() + [row], "row 3", "'messages'")


def test_prompt_too_long_for_max_length_with_its_images(tiny_model_dir, tmp_path):
    long_row = _sft_row(text="what color is the shape ? " * 30)
    _expect(tiny_model_dir, tmp_path, good() + [long_row], "row 3", "'messages'", "max_length=40",
            max_length=40, truncation_policy="raise")
    trainer = _sft(tiny_model_dir, tmp_path, good() + [long_row], max_length=40)  # default policy: drop + count
    assert len(trainer.train_dataset) == 3 and 3 not in trainer.train_dataset.indices


def test_text_only_rows_mixed_with_image_rows(tiny_model_dir, tmp_path):
    text_only = {"messages": [{"role": "user", "content": "how many shapes are there ?"},
                              {"role": "assistant", "content": "<answer>2</answer>"}]}
    trainer = _sft(tiny_model_dir, tmp_path, good(2) + [text_only, text_only])
    trainer.train()
    assert trainer.train_dataset[2]["images"] == []


def test_dataset_missing_required_column(tiny_model_dir, tmp_path):
    rows = Dataset.from_list([{"prompt": "what color is the shape ?", "chosen": "red"}] * 2)
    args = DPOConfig(output_dir=str(tmp_path), max_steps=1, report_to="none")
    with pytest.raises(DataValidationError, match="'rejected'.*missing required column"):
        DPOTrainer(model=str(tiny_model_dir("qwen2_vl")), args=args, train_dataset=rows)


def test_chosen_identical_to_rejected(tiny_model_dir, tmp_path):
    image = Image.new("RGB", (28, 28), "red")
    rows = [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color ?"}]}],
             "chosen": "<answer>red</answer>", "rejected": answer, "images": [image]}
            for answer in ("<answer>blue</answer>", "<answer>red</answer>")]
    args = DPOConfig(output_dir=str(tmp_path), max_steps=1, report_to="none")
    with pytest.raises(DataValidationError, match="row 1, column 'rejected'"):
        DPOTrainer(model=str(tiny_model_dir("qwen2_vl")), args=args, train_dataset=rows)


def test_rl_prompt_with_assistant_turn(tiny_model_dir, tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "what color ?"}, {"role": "assistant", "content": "red"}],
             "images": []}] * 2
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2, max_steps=1,
                      report_to="none")
    with pytest.raises(DataValidationError, match="row 0, column 'prompt'"):
        GRPOTrainer(model=str(tiny_model_dir("qwen2_vl")), reward_funcs=["accuracy"], args=args, train_dataset=rows)


def test_model_without_vision_tower_given_image_data(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    text_model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to="none")
    with pytest.raises(ValueError, match="not a supported vision-language family"):
        SFTTrainer(model=text_model, args=args, train_dataset=good(), processing_class=object())


def test_right_padding_processor_still_generates_left_padded(tiny_model_dir):
    """Generation always pads on the left, whatever the processor's own padding side says."""
    from transformers import AutoModelForImageTextToText

    from vlmalign.data.formats import normalize_row
    from vlmalign.eval.evaluate import make_encoder
    from vlmalign.models.loading import load_processor
    from vlmalign.rl.rollout import SamplingConfig, generate

    path = tiny_model_dir("qwen2_vl")
    model = AutoModelForImageTextToText.from_pretrained(path)
    rows = [normalize_row({"prompt": "what color is the shape ?" + " ?" * k, "images": [Image.new("RGB", (28, 28), c)]},
                          "prompt") for k, c in enumerate(["red", "blue"])]
    outputs = []
    for side in ("left", "right"):
        processor = load_processor(path)
        processor.tokenizer.padding_side = side
        out = generate(model, make_encoder(model, processor), rows,
                       sampling=SamplingConfig(max_completion_length=4, do_sample=False))
        assert (out.prompt_inputs["attention_mask"][:, -1] == 1).all()  # the last prompt position is real: left padding
        outputs.append(out.completion_ids)
    assert torch.equal(outputs[0], outputs[1])
