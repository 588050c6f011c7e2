"""Tiny random VLMs of every supported family: build -> save -> reload -> chat template -> forward -> generate.

One module-scoped fixture per family builds the tiny model once (in memory and saved to a temporary directory) and
reloads it with `AutoModelForImageTextToText` and `vlmalign.models.loading.load_processor`; the `small` size is
only built in memory (~0.2 s a family).
"""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from vlmalign.models.families import family_names, get_family
from vlmalign.models.loading import load_processor
from vlmalign.data.collate import Encoder
from vlmalign.models.tiny import build_tiny_model, make_tiny_model, official_template
from vlmalign.models.vocabulary import ANSWER_TAGS, TASK_WORDS

FAMILIES = family_names()

# family -> (model class, processor class, image processor class, image placeholder tokens per 28x28 image).
# Qwen: upscaled to min_pixels 56 x 56, 28 px per token -> 2 x 2; Idefics3 / SmolVLM: upscaled to 2 x 2 tiles plus
# the global view, 4 tokens each -> 20; LLaVA: 56 px / 14 px patches -> 16; Gemma3: 4 x 4 patches pooled to 2 x 2.
EXPECTED = {
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", "Qwen2VLImageProcessorPil", 4),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", "Qwen2VLImageProcessorPil", 4),
    "idefics3": ("Idefics3ForConditionalGeneration", "Idefics3Processor", "Idefics3ImageProcessorPil", 20),
    "smolvlm": ("SmolVLMForConditionalGeneration", "SmolVLMProcessor", "SmolVLMImageProcessorPil", 20),
    "llava_clip": ("LlavaForConditionalGeneration", "LlavaProcessor", "CLIPImageProcessorPil", 16),
    "llava_siglip": ("LlavaForConditionalGeneration", "LlavaProcessor", "SiglipImageProcessorPil", 16),
    "gemma3": ("Gemma3ForConditionalGeneration", "Gemma3Processor", "Gemma3ImageProcessorPil", 4),
    # Qwen3-VL: upscaled to min_pixels 64 x 64, 32 px per token -> 2 x 2
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", "Qwen2VLImageProcessorPil", 4),
    "qwen3_vl_moe": ("Qwen3VLMoeForConditionalGeneration", "Qwen3VLProcessor", "Qwen2VLImageProcessorPil", 4),
    # Gemma 4: resized to the 70-soft-token budget, 3 px patches: 16 x 16 patches pooled 2 x 2 -> 8 x 8
    "gemma4": ("Gemma4ForConditionalGeneration", "Gemma4Processor", "Gemma4ImageProcessorPil", 64),
    # OneVision: base 2 x 2 features + the 1 x 1 grid tile's 2 x 2 features + 2 newline features
    "llava_onevision": ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionProcessor",
                        "LlavaOnevisionImageProcessorPil", 10),
    # InternVL: one 28 px tile (no thumbnail for a single tile), 4 x 4 patches pixel-shuffled to 2 x 2
    "internvl": ("InternVLForConditionalGeneration", "InternVLProcessor", "GotOcr2ImageProcessorPil", 4),
    # Qwen3.5: the Qwen3-VL processor (16 px patches merged 2 x 2, min 64 x 64 px) -> 2 x 2
    "qwen3_5": ("Qwen3_5ForConditionalGeneration", "Qwen3VLProcessor", "Qwen2VLImageProcessorPil", 4),
    "qwen3_5_moe": ("Qwen3_5MoeForConditionalGeneration", "Qwen3VLProcessor", "Qwen2VLImageProcessorPil", 4),
}

# Image tokens of the two-image row where it is not twice one image's: OneVision encodes an image of a multi-image
# row without the anyres grid (base 2 x 2 features + one newline feature each).
TWO_IMAGES = {"llava_onevision": 2 * (4 + 1)}

# The real checkpoints' tokenizer facts (../shared/reference/official-templates-facts.md): BOS added by the
# tokenizer, default padding side, eos and pad tokens, and the official template file each tiny model carries.
TOKENIZER_FACTS = {
    "qwen2_vl": (False, "left", "<|im_end|>", "<|endoftext|>", "qwen2_5_vl"),
    "qwen2_5_vl": (False, "right", "<|im_end|>", "<|endoftext|>", "qwen2_5_vl"),
    "idefics3": (True, "left", "<|end_of_text|>", "<|reserved_special_token_0|>", "idefics3"),
    "smolvlm": (False, "right", "<end_of_utterance>", "<|im_end|>", "smolvlm"),
    "llava_clip": (True, "left", "</s>", "<pad>", "llava_1_5"),
    "llava_siglip": (True, "left", "</s>", "<pad>", "llava_1_5"),
    "gemma3": (True, "left", "<eos>", "<pad>", "gemma3"),
    "qwen3_vl": (False, "right", "<|im_end|>", "<|endoftext|>", "qwen3_vl"),
    "qwen3_vl_moe": (False, "right", "<|im_end|>", "<|endoftext|>", "qwen3_vl"),
    "gemma4": (True, "left", "<eos>", "<pad>", "gemma4"),
    "llava_onevision": (False, "right", "<|im_end|>", "<|endoftext|>", "llava_onevision"),
    "internvl": (False, "left", "<|im_end|>", "<|endoftext|>", "internvl"),
    "qwen3_5": (False, "right", "<|im_end|>", "<|endoftext|>", "qwen3_5_nothink"),
    "qwen3_5_moe": (False, "right", "<|im_end|>", "<|endoftext|>", "qwen3_5_think"),
}

# Processor settings that must survive save -> load_processor (they fix the number of placeholder tokens).
PROCESSOR_SETTINGS = ("image_seq_len", "image_seq_length", "patch_size", "vision_feature_select_strategy",
                      "num_additional_image_tokens")

ANSWERS = ["red", "<think>the shape is blue .</think><answer>blue</answer>"]
# What the Qwen3.5 templates supervise of each answer (read off the templates): the reasoning goes into the block
# the generation prompt opens ("<think>\n" in think, an empty "<think>\n\n</think>\n\n" in nothink), so the labels
# start where the conversation leaves the prompt; the think template's answer closes the block itself.
_REASONING = "the shape is blue .\n</think>\n\n<answer>blue</answer>"
SUPERVISED = {"qwen3_5": {"red": "red", ANSWERS[1]: _REASONING},
              "qwen3_5_moe": {"red": "</think>\n\nred", ANSWERS[1]: _REASONING}}


def _image(color: str) -> Image.Image:
    return Image.new("RGB", (28, 28), color)


def _conversations(with_answers: bool = True) -> list[list[dict]]:
    """Two conversations: one image (plain answer), two images (think + answer tags)."""
    users = [
        [{"type": "image", "image": _image("red")}, {"type": "text", "text": "what color is the shape ?"}],
        [{"type": "image", "image": _image("blue")}, {"type": "image", "image": _image("green")},
         {"type": "text", "text": "what ?"}],
    ]
    convs = []
    for user, answer in zip(users, ANSWERS):
        conv = [{"role": "user", "content": user}]
        if with_answers:
            conv.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        convs.append(conv)
    return convs


def _model_inputs(batch) -> dict:
    return {k: v for k, v in batch.items() if k != "assistant_masks"}


def _xfail_on_smolvlm_loader_bug(processor, built_processor=None) -> None:
    """Known bug outside this module, checked for rather than assumed (the tests run in full once it is fixed)."""
    if type(processor).__name__ != "SmolVLMProcessor":
        return
    lost_setting = built_processor is not None and processor.image_seq_len != built_processor.image_seq_len
    if lost_setting or not hasattr(processor, "video_processor"):
        pytest.xfail(
            "vlmalign.models.loading.image_only_processor_class: the video-less SmolVLMProcessor neither saves "
            "image_seq_len (its generated __init__ lacks the argument) nor has a video_processor "
            "(SmolVLMProcessor.apply_chat_template reads video_processor.num_frames)"
        )


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    name = request.param
    family = get_family(name)
    built_model, built_processor = build_tiny_model(name, "tiny")
    path = make_tiny_model(name, "tiny", tmp_path_factory.mktemp(name))
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = load_processor(path)
    _xfail_on_smolvlm_loader_bug(processor, built_processor)
    return SimpleNamespace(name=name, family=family, path=path, model=model, processor=processor,
                           tokenizer=processor.tokenizer, built_model=built_model, built_processor=built_processor)


def test_real_classes_and_roundtrip(tiny):
    model_cls, processor_cls, image_processor_cls, _ = EXPECTED[tiny.name]
    assert type(tiny.model).__name__ == model_cls
    assert type(tiny.processor).__name__ == processor_cls
    assert type(tiny.processor.image_processor).__name__ == image_processor_cls
    assert get_family(tiny.model) is tiny.family
    # save -> reload keeps every weight (incl. the re-drawn zero-initialised ones) and the processor settings
    saved = dict(tiny.model.named_parameters())
    for key, value in tiny.built_model.named_parameters():
        assert torch.equal(saved[key], value), key
    for key in PROCESSOR_SETTINGS:
        if hasattr(tiny.built_processor, key):
            assert getattr(tiny.processor, key) == getattr(tiny.built_processor, key), key
    assert tiny.processor.chat_template == tiny.built_processor.chat_template


def test_config_matches_tokenizer(tiny):
    tok, config = tiny.tokenizer, tiny.model.config
    text = config.get_text_config()
    assert text.vocab_size == len(tok)
    assert tiny.model.get_input_embeddings().weight.shape[0] == len(tok)
    assert text.pad_token_id == tok.pad_token_id is not None
    assert text.bos_token_id == tok.bos_token_id
    add_bos, side, eos, pad, template = TOKENIZER_FACTS[tiny.name]
    assert (tok.eos_token, tok.pad_token, tok.padding_side) == (eos, pad, side)
    assert tiny.processor.chat_template == official_template(template)
    # generation stops at the end of a turn (and at the tokenizer's eos, as the real generation configs say)
    stops = tiny.model.generation_config.eos_token_id
    stops = [stops] if isinstance(stops, int) else stops
    assert tok.convert_tokens_to_ids(tiny.family.eos_token) in stops and tok.eos_token_id in stops
    assert tiny.model.generation_config.pad_token_id == tok.pad_token_id
    image_id = tiny.family.image_token_id(tiny.model)
    assert tok.convert_tokens_to_ids(tiny.family.image_token) == image_id
    # no all-zero weight matrix left (transformers zero-initialises Gemma3's projector)
    for key, value in tiny.model.named_parameters():
        assert value.dim() < 2 or value.any(), key


def test_parameter_count(tiny):
    n = sum(p.numel() for p in tiny.model.parameters())
    assert 0.2e6 <= n <= 2e6, n


def test_tokenizer_words_and_tags(tiny):
    tok = tiny.tokenizer
    for word in TASK_WORDS:
        assert len(tok.encode(word, add_special_tokens=False)) == 1, word
        # Qwen3.5's pre-tokenizer (put back by transformers' Qwen3_5Tokenizer on load) splits a space off a digit
        split_digit = tiny.name.startswith("qwen3_5") and word.isdigit()
        assert len(tok.encode(" " + word, add_special_tokens=False)) == (2 if split_digit else 1), word
    for tag in ANSWER_TAGS:
        assert len(tok.encode(tag, add_special_tokens=False)) == 1, tag
    text = "<think>the shape is red .</think><answer>red</answer>"
    ids = tok.encode(tiny.family.eos_token + text + tiny.family.eos_token, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == text
    plain = tok.encode("what color", add_special_tokens=False)
    bos = [tok.bos_token_id] if TOKENIZER_FACTS[tiny.name][0] else []
    assert tok.encode("what color", add_special_tokens=True) == bos + plain


def test_registry(tiny):
    fam = tiny.family
    names = [name for name, _ in tiny.model.named_parameters()]
    vision = [n for n in names if fam.is_vision_param(n)]
    projector = [n for n in names if fam.is_projector_param(n)]
    # the language model's module, by transformers' naming (Idefics3 / SmolVLM: `text_model`)
    text_module = "text_model" if fam.name in ("idefics3", "smolvlm") else "language_model"
    language = [n for n in names if re.search(rf"(^|\.){text_module}\.", n)]
    assert vision and projector and language
    assert not set(vision) & set(projector)
    assert not (set(vision) | set(projector)) & set(language)
    # every parameter belongs to one part (the LM head sits outside the language model module)
    assert set(names) - set(vision) - set(projector) - set(language) <= {"lm_head.weight"}
    vocab = tiny.tokenizer.get_vocab()
    special = {t.content for t in tiny.tokenizer.added_tokens_decoder.values() if t.special}
    for token in fam.vision_special_tokens:
        assert token in vocab and token in special, token
        assert tiny.tokenizer.decode([vocab[token]], skip_special_tokens=True) == "", token
    suppressed = fam.suppress_token_ids(tiny.tokenizer)
    assert fam.image_token_id(tiny.model) in suppressed
    assert tiny.tokenizer.convert_tokens_to_ids(fam.eos_token) not in suppressed


@pytest.mark.parametrize("side", ["left", "right"])
def test_chat_batch_forward(tiny, side):
    fam, tok = tiny.family, tiny.tokenizer
    encoder = Encoder(tiny.processor, fam, fam.image_token_id(tiny.model))
    convs = _conversations()
    batch = encoder.encode(convs, [[b["image"] for m in c for b in m["content"] if b["type"] == "image"] for c in convs],
                           padding_side=side)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pad_column = mask[:, 0] if side == "left" else mask[:, -1]
    assert (pad_column == 0).any()  # the shorter row is padded on the requested side
    image_id = fam.image_token_id(tiny.model)
    per_image = EXPECTED[tiny.name][3]
    assert 4 <= per_image <= 64
    for row, answer in enumerate(ANSWERS):
        labels = batch["labels"][row]
        expected = SUPERVISED.get(tiny.name, {}).get(answer, answer)
        assert tok.decode(labels[labels != -100]).strip() == expected + fam.eos_token
        expected = TWO_IMAGES.get(tiny.name, 2 * per_image) if row else per_image
        assert int((ids[row] == image_id).sum()) == expected
        if tok.bos_token_id is not None and tok.bos_token != "<|im_start|>":  # BOS exactly once
            assert int((ids[row] == tok.bos_token_id).sum()) == 1
    if fam.token_type_key is not None:
        expected = fam.token_type_ids(ids, image_id) * mask
        assert torch.equal(batch[fam.token_type_key] * mask, expected)
    tiny.model.zero_grad()
    out = tiny.model(**batch)
    assert out.logits.shape[:2] == ids.shape
    assert torch.isfinite(out.logits).all()
    loss = out.loss.item()
    assert math.isfinite(loss) and abs(loss - math.log(len(tok))) < 0.6, (loss, math.log(len(tok)))
    out.loss.backward()
    grad_norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in tiny.model.parameters() if p.grad is not None))
    tiny.model.zero_grad()
    assert 0 < grad_norm.item() < 100


def test_generate(tiny):
    fam, tok = tiny.family, tiny.tokenizer
    prompts = tiny.processor.apply_chat_template(
        _conversations(with_answers=False), tokenize=True, return_dict=True, add_generation_prompt=True,
        return_tensors="pt", processor_kwargs=dict(padding=True, padding_side="left"),
    )
    suppressed = fam.suppress_token_ids(tok)
    torch.manual_seed(0)
    out = tiny.model.generate(**prompts, max_new_tokens=4, min_new_tokens=4, do_sample=True,
                              suppress_tokens=suppressed)
    new = out[:, prompts["input_ids"].shape[1]:]
    assert new.shape == (2, 4)
    assert not set(new.flatten().tolist()) & set(suppressed)
    assert all(0 <= i < len(tok) for i in new.flatten().tolist())


@pytest.mark.parametrize("name", FAMILIES)
def test_small_size(name):
    family = get_family(name)
    model, processor = build_tiny_model(name, "small")
    _xfail_on_smolvlm_loader_bug(processor)
    text = model.config.get_text_config()
    assert text.hidden_size >= 256 and text.num_hidden_layers >= 4
    assert text.vocab_size == len(processor.tokenizer)
    conv = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (64, 48), "red")},
                                         {"type": "text", "text": "what color ?"}]}]
    batch = processor.apply_chat_template(conv, tokenize=True, return_dict=True, add_generation_prompt=True,
                                          return_tensors="pt")
    assert int((batch["input_ids"] == family.image_token_id(model)).sum()) >= 256
    with torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out.logits).all()
