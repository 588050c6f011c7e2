"""Collation through each family's chat template: labels, token types, image-safe length policy."""

import pytest
import torch
from PIL import Image

from vlmalign.data.collate import Encoder, PreferenceCollator, SequenceTooLongError, SFTCollator
from vlmalign.data.dataset import prepare_rows
from vlmalign.data.formats import normalize_row
from vlmalign.models.families import family_names, get_family
from vlmalign.models.loading import load_processor
from transformers import AutoModelForImageTextToText


def _encoder(path):
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = load_processor(path)
    family = get_family(model)
    return model, Encoder(processor, family, family.image_token_id(model))


def _rows():
    red, blue, green = (Image.new("RGB", (28, 28), c) for c in ("red", "blue", "green"))
    two_images = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the left shape ?"},
                                         {"type": "image"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "<answer>red</answer>"}]},
        ],
        "images": [red, blue],
    }
    one_image_multi_turn = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the shape ?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "<answer>green</answer>"}]},
            {"role": "user", "content": [{"type": "text", "text": "how many shapes are there ?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "<answer>1</answer>"}]},
        ],
        "images": [green],
    }
    text_only = {"prompt": "what is the shape ?", "completion": "circle"}
    return [normalize_row(r, "sft", i) for i, r in enumerate([two_images, one_image_multi_turn, text_only])]


@pytest.mark.parametrize("family", family_names())
@pytest.mark.parametrize("side", ["left", "right"])
def test_labels_and_token_types_every_family(tiny_model_dir, family, side):
    model, encoder = _encoder(tiny_model_dir(family))
    rows = _rows()
    batch = encoder.encode([r["messages"] for r in rows], [r["images"] for r in rows], padding_side=side)
    tok = encoder.processor.tokenizer
    eos = encoder.family.eos_token
    # the official templates of Idefics3, SmolVLM and LLaVA put a space between the role and the answer, after the
    # generation prompt ("Assistant:", "ASSISTANT:"): that space is the first token the model generates
    sep = " " if family in ("idefics3", "smolvlm", "llava_clip", "llava_siglip") else ""
    # Qwen3.5's think template (the MoE family): the generation prompt opens "<think>\n", the final answer closes
    # the empty block first; earlier turns render without it (docs/supervision.md)
    last = "\n</think>\n\n" if family == "qwen3_5_moe" else sep
    expected = [last + "<answer>red</answer>" + eos,
                sep + "<answer>green</answer>" + eos + last + "<answer>1</answer>" + eos, last + "circle" + eos]
    for i, text in enumerate(expected):
        label_ids = batch["labels"][i][batch["labels"][i] != -100]
        assert tok.decode(label_ids) == text
    # image placeholders are never labels, and every row has the right number of them
    image_id = encoder.image_token_id
    assert not (batch["labels"] == image_id).any()
    per_image = int((batch["input_ids"][1] == image_id).sum())
    assert per_image > 0
    # OneVision encodes each image of a multi-image row without its anyres grid: 2 x 2 base features + 1 newline
    two_images = 2 * (4 + 1) if family == "llava_onevision" else 2 * per_image
    assert int((batch["input_ids"][0] == image_id).sum()) == two_images
    assert int((batch["input_ids"][2] == image_id).sum()) == 0
    # token-type ids line up with the placeholders whatever the padding side
    key = encoder.family.token_type_key
    if key is not None:
        assert torch.equal(batch[key].bool(), batch["input_ids"] == image_id)
    # the model accepts the batch
    loss = model(**{k: v for k, v in batch.items() if k != "labels"}, labels=batch["labels"]).loss
    assert torch.isfinite(loss)


def test_left_and_right_padding_give_the_same_loss(tiny_model_dir):
    model, encoder = _encoder(tiny_model_dir("qwen2_vl"))
    rows = _rows()
    losses = []
    for side in ("left", "right"):
        batch = encoder.encode([r["messages"] for r in rows], [r["images"] for r in rows], padding_side=side)
        losses.append(model(**batch).loss)
    assert torch.allclose(losses[0], losses[1], atol=1e-5)


def test_preference_collator_labels_only_the_answers(tiny_model_dir):
    _, encoder = _encoder(tiny_model_dir("qwen2_vl"))
    red = Image.new("RGB", (28, 28), "red")
    row = normalize_row({
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the shape ?"}]},
                   {"role": "assistant", "content": "<answer>blue</answer>"},
                   {"role": "user", "content": "are you sure ?"}],
        "chosen": "<answer>red</answer>", "rejected": "<answer>green</answer>", "images": [red]}, "preference")
    batch = PreferenceCollator(encoder)([row])
    tok = encoder.processor.tokenizer
    decoded = [tok.decode(l[l != -100]) for l in batch["labels"]]
    assert decoded == ["<answer>red</answer><|im_end|>", "<answer>green</answer><|im_end|>"]


def test_length_policy_drops_or_raises_whole_rows(tiny_model_dir):
    _, encoder = _encoder(tiny_model_dir("qwen2_vl"))
    rows = _rows()
    lengths = encoder.lengths([r["messages"] for r in rows], [r["images"] for r in rows])
    limit = sorted(lengths)[1]  # the longest row does not fit
    longest = lengths.index(max(lengths))
    raw = [{"messages": r["messages"], "images": r["images"]} for r in rows]
    kept = prepare_rows(raw, "sft", encoder, max_length=limit)
    assert longest not in kept.indices and len(kept) == 2
    with pytest.raises(SequenceTooLongError, match=f"row {longest}, column 'messages'"):
        prepare_rows(raw, "sft", encoder, max_length=limit, truncation_policy="raise")
    # the kept rows are collated whole: every image keeps all of its tokens
    batch = SFTCollator(encoder)([kept[i] for i in range(len(kept))])
    assert batch["input_ids"].shape[1] <= limit


def test_prepare_rows_reports_dropped_rows_by_dataset_index(tiny_model_dir, caplog):
    _, encoder = _encoder(tiny_model_dir("qwen2_vl"))
    from vlmalign.data.synthetic import make_dataset
    ds = make_dataset("color", "sft", n=6, seed=0)
    long_row = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what " * 80}]},
                             {"role": "assistant", "content": [{"type": "text", "text": "<answer>red</answer>"}]}],
                "images": [ds[0]["images"][0]]}
    rows = [ds[i] for i in range(3)] + [long_row] + [ds[i] for i in range(3, 6)]
    prepared = prepare_rows(rows, "sft", encoder, max_length=60)
    assert 3 not in prepared.indices and len(prepared) == 6
    with pytest.raises(SequenceTooLongError, match="row 3, column 'messages'"):
        prepare_rows(rows, "sft", encoder, max_length=60, truncation_policy="raise")
