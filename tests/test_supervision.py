"""Supervision with the official chat templates: exactly the answer tokens plus the end-of-turn token closing each
answer, for every family and every kind of training row; zero supervision is an error naming the row.

The expected tokens are derived here independently of `vlmalign.data.supervision` (which takes the token
difference between the rendered prompt and the rendered conversation): from a hand-written table of what each
official template renders around an answer (../shared/reference/official-templates-facts.md), the expected
supervised text is `SEPARATOR + answer + END_OF_TURN`, and the text right before it must end with the template's
generation prompt.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from vlmalign.data.collate import Encoder, PreferenceCollator, SFTCollator
from vlmalign.data.dataset import prepare_rows
from vlmalign.data.formats import DataValidationError, normalize_row
from vlmalign.data.supervision import SupervisionError
from vlmalign.models.families import family_names, get_family
from vlmalign.models.loading import load_processor
from vlmalign.models.tiny import TEMPLATES

# The first 12 hex digits of each official template's SHA-256, as recorded in official-templates-facts.md (LLaVA-1.5:
# the JSON-decoded string of transformers' test, see chat_templates/SOURCES.md).
TEMPLATE_SHA = {"qwen2_5_vl": "a0bc6f6fc7a2", "qwen3_vl": "3636d0f0bd6b", "idefics3": "0d7e56ca4170",
                "smolvlm": "830005085ddd", "gemma3": "7de1c58e208e", "llava_1_5": "50c43d0ac06b",
                "gemma4": "87294f1fa94c", "llava_onevision": "fbf77862dcdd", "internvl": "b3e3fa7cdece",
                "qwen3_5_nothink": "273d8e0e683b", "qwen3_5_think": "a4aee8afcf2e"}

# family -> (generation prompt the template renders, separator it puts between role and answer, end-of-turn token)
RENDERED = {
    "qwen2_vl": ("<|im_start|>assistant\n", "", "<|im_end|>"),
    "qwen2_5_vl": ("<|im_start|>assistant\n", "", "<|im_end|>"),
    "idefics3": ("Assistant:", " ", "<end_of_utterance>"),
    "smolvlm": ("Assistant:", " ", "<end_of_utterance>"),
    "llava_clip": ("ASSISTANT:", " ", "</s>"),     # the template renders no </s>: vlmalign inserts it
    "llava_siglip": ("ASSISTANT:", " ", "</s>"),
    "gemma3": ("<start_of_turn>model\n", "", "<end_of_turn>"),
    "qwen3_vl": ("<|im_start|>assistant\n", "", "<|im_end|>"),
    "qwen3_vl_moe": ("<|im_start|>assistant\n", "", "<|im_end|>"),
    "gemma4": ("<|turn>model\n", "", "<turn|>"),  # the generation prompt's empty thought channel is not rendered
    "llava_onevision": ("<|im_start|>assistant \n", "", "<|im_end|>"),  # "assistant \n" in the conversation
    "internvl": ("<|im_start|>assistant\n", "", "<|im_end|>"),
    # Qwen3.5 (tuples: alternatives). The last assistant turn follows the generation prompt's reasoning block
    # (nothink: an empty "<think>\n\n</think>\n\n" in the prompt; think: the prompt opens "<think>\n" and the answer
    # closes it); earlier turns render without any (the template drops it before the last user message).
    "qwen3_5": (("<|im_start|>assistant\n<think>\n\n</think>\n\n", "<|im_start|>assistant\n"), "", "<|im_end|>"),
    "qwen3_5_moe": (("<|im_start|>assistant\n<think>\n", "<|im_start|>assistant\n"), ("", "\n</think>\n\n"),
                    "<|im_end|>"),
}


def test_official_templates_are_byte_exact():
    for name, sha in TEMPLATE_SHA.items():
        data = (TEMPLATES / f"{name}.jinja").read_bytes()
        assert hashlib.sha256(data).hexdigest()[:12] == sha, name


@pytest.fixture(scope="module")
def encoders(tiny_model_dir):
    cache = {}

    def get(family):
        if family not in cache:
            path = tiny_model_dir(family)
            model = AutoModelForImageTextToText.from_pretrained(path)
            fam = get_family(model)
            cache[family] = (model, Encoder(load_processor(path), fam, fam.image_token_id(model)))
        return cache[family]

    return get


def _img(color="red"):
    return Image.new("RGB", (28, 28), color)


def _check_spans(encoder, family, batch, row, answers):
    """The labels of `row` are exactly SEPARATOR + answer + END_OF_TURN for each answer, each span contiguous and
    right after the template's generation prompt."""
    gen, sep, eot = RENDERED[family]
    tok = encoder.processor.tokenizer
    ids, labels = batch["input_ids"][row], batch["labels"][row]
    supervised = (labels != -100).nonzero().flatten().tolist()
    assert torch.equal(labels[supervised], ids[supervised])
    spans, current = [], [supervised[0]]
    for i in supervised[1:]:
        if i == current[-1] + 1:
            current.append(i)
        else:
            spans.append(current)
            current = [i]
    spans.append(current)
    assert len(spans) == len(answers)
    for span, answer in zip(spans, answers):
        assert tok.decode(ids[span]) in {s + answer + eot for s in ((sep,) if isinstance(sep, str) else sep)}
        before = tok.decode(ids[:span[0]][batch["attention_mask"][row][:span[0]].bool()])
        assert before.endswith(gen), before[-40:]


@pytest.mark.parametrize("family", family_names())
def test_sft_messages_every_turn_answer_plus_end_of_turn(encoders, family):
    _, encoder = encoders(family)
    row = normalize_row({"messages": [
        {"role": "system", "content": "answer with one word ."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the shape ?"}]},
        {"role": "assistant", "content": "<answer>red</answer>"},
        {"role": "user", "content": "how many shapes ?"},
        {"role": "assistant", "content": [{"type": "text", "text": "<answer>1</answer>"}]}],
        "images": [_img()]}, "sft")
    short = normalize_row({"messages": [{"role": "user", "content": "what is it ?"},
                                        {"role": "assistant", "content": "circle"}]}, "sft")
    for side in ("right", "left"):
        batch = encoder.encode([row["messages"], short["messages"]], [row["images"], []], padding_side=side)
        _check_spans(encoder, family, batch, 0, ["<answer>red</answer>", "<answer>1</answer>"])
        _check_spans(encoder, family, batch, 1, ["circle"])
        assert not torch.isin(batch["labels"], encoder.vision_token_ids).any()
        tok = encoder.processor.tokenizer
        if tok.bos_token is not None and family != "smolvlm":  # SmolVLM's "BOS" is its turn marker <|im_start|>
            assert ((batch["input_ids"] == tok.bos_token_id).sum(dim=1) == 1).all()  # never two BOS


@pytest.mark.parametrize("family", family_names())
def test_sft_prompt_completion_trains_the_completion_only(encoders, family):
    _, encoder = encoders(family)
    row = normalize_row({
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color ?"}]},
                   {"role": "assistant", "content": "<answer>blue</answer>"},
                   {"role": "user", "content": "are you sure ?"}],
        "completion": "<answer>red</answer>", "images": [_img()]}, "sft")
    batch = SFTCollator(encoder)([row])
    _check_spans(encoder, family, batch, 0, ["<answer>red</answer>"])


@pytest.mark.parametrize("family", family_names())
@pytest.mark.parametrize("method", ["dpo", "mpo"])
def test_preference_rows_answers_only(encoders, family, method):
    # DPO and MPO share the collator; MPO's SFT term reads the chosen labels, DPO both.
    _, encoder = encoders(family)
    row = normalize_row({"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color ?"}]}],
                         "chosen": "<answer>red</answer>", "rejected": "<answer>green</answer>", "images": [_img()]},
                        "preference")
    batch = PreferenceCollator(encoder, shared_prefix=method == "mpo", full_form=True)([row])
    _check_spans(encoder, family, batch, 0, ["<answer>red</answer>"])
    _check_spans(encoder, family, batch, 1, ["<answer>green</answer>"])
    if "shared" in batch:  # the shared-prefix form supervises the same tokens
        assert int(batch["shared"]["completion_mask"].sum()) == int((batch["labels"] != -100).sum())


@pytest.mark.parametrize("family", family_names())
def test_shared_preference_batch_processes_each_image_once(encoders, family, monkeypatch):
    """On the shared-prefix path the processor sees each row's images once (with its prompt), and the batch is
    tensor for tensor the shared form cut from the plain 2B-row batch (the previous collator: images processed for
    chosen, rejected, each answer's supervision prefix and the prompt); families whose generation prompt is not a
    prefix of the conversation get exactly the plain batch."""
    from vlmalign.data.collate import split_completions

    _, encoder = encoders(family)
    rows = [normalize_row({"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                           "chosen": c, "rejected": r, "images": [_img(color)]}, "preference")
            for q, c, r, color in (("what color ?", "<answer>red</answer>", "<answer>green, surely</answer>", "red"),
                                   ("name the color of this square please", "<answer>blue</answer>", "no", "blue"))]
    convs = [r["prompt"] + r["chosen"] for r in rows] + [r["prompt"] + r["rejected"] for r in rows]
    images, starts = [r["images"] for r in rows] * 2, [1, 1] * 2
    plain = encoder.encode(convs, images, supervise_from=starts)
    prompts = encoder.encode([r["prompt"] for r in rows], [r["images"] for r in rows], padding_side="left",
                             add_generation_prompt=True, with_labels=False)
    expected = split_completions(plain, prompts)
    seen = []
    processor_call = type(encoder.processor).__call__

    def counting(self, *args, images=None, **kwargs):
        seen.append(sum(len(im) for im in images or []))
        return processor_call(self, *args, images=images, **kwargs)

    monkeypatch.setattr(type(encoder.processor), "__call__", counting)
    batch = PreferenceCollator(encoder, shared_prefix=True)(rows)
    if expected is None:  # fallback: the plain batch, as before
        assert set(batch) == set(plain)
        for key in plain:
            torch.testing.assert_close(batch[key], plain[key], rtol=0, atol=0)
        return
    assert set(batch) == {"shared"} and sum(seen) == len(rows), seen  # one image per row, processed once
    got = batch["shared"]
    for key in ("completion_ids", "completion_mask", "prompt_index"):
        assert torch.equal(got[key], expected[key]), key
    assert set(got["prompt_inputs"]) == set(expected["prompt_inputs"])
    for key, value in expected["prompt_inputs"].items():
        assert torch.equal(got["prompt_inputs"][key], value), key


def test_onevision_style_generation_prompt_that_is_not_a_prefix(encoders):
    """LLaVA-OneVision renders "assistant\\n" as the generation prompt but "assistant \\n" in the conversation:
    the whitespace difference is skipped, the answer and <|im_end|> are supervised."""
    _, base = encoders("qwen2_vl")
    processor = base.processor
    template = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
                "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{% endfor %}"
                "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}{% endfor %}"
                "{{'<|im_end|>'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    saved = processor.chat_template
    processor.chat_template = template
    try:
        encoder = Encoder(processor, base.family, base.image_token_id)
        row = normalize_row({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what ?"}]},
                                          {"role": "assistant", "content": "red"}], "images": [_img()]}, "sft")
        batch = encoder.encode([row["messages"]], [row["images"]])
        labels = batch["labels"][0]
        assert processor.tokenizer.decode(labels[labels != -100]) == "red<|im_end|>"
    finally:
        processor.chat_template = saved


def _with_template(encoder, template):
    encoder.processor.chat_template = template
    return Encoder(encoder.processor, encoder.family, encoder.image_token_id)


def test_zero_supervision_is_a_validation_error_naming_the_row(encoders):
    _, base = encoders("qwen2_vl")
    saved = base.processor.chat_template
    rows = [{"messages": [{"role": "user", "content": "what ?"}, {"role": "assistant", "content": "red"}]}] * 2
    try:
        # a template that renders the assistant's turn without its content
        drops_answers = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] != 'assistant' %}"
                         "{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
        encoder = _with_template(base, drops_answers)
        with pytest.raises(DataValidationError, match=r"row 0, column 'messages': the chat template drops the text "
                                                      r"of message 1 \(assistant\)") as info:
            prepare_rows(rows, "sft", encoder)
        assert "row 1" in str(info.value)  # every bad row is listed
        # a template whose generation prompt is not what it renders before an answer
        other_prompt = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{{ c['text'] }}"
                        "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>bot\n{% endif %}")
        encoder = _with_template(base, other_prompt)
        with pytest.raises(DataValidationError, match=r"row 0, column 'messages': cannot be supervised.*generation "
                                                      r"prompt ends with 'bot\\n'"):
            prepare_rows(rows, "sft", encoder)
        # a template that never closes a turn: the end-of-turn token is inserted after each answer (LLaVA-1.5's case)
        never_ends = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{{ c['text'] }}"
                      "{% endfor %}\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
        encoder = _with_template(base, never_ends)
        batch = encoder.encode([normalize_row(rows[0], "sft")["messages"]], [[]])
        labels = batch["labels"][0]
        assert encoder.processor.tokenizer.decode(labels[labels != -100]) == "red<|im_end|>"
    finally:
        base.processor.chat_template = saved


def test_sft_conversation_must_end_with_the_answer():
    with pytest.raises(ValueError, match=r"row 0, column 'messages': the last turn is a user turn"):
        normalize_row({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                    {"role": "user", "content": "c"}]}, "sft")


def test_processor_without_chat_template_is_refused(encoders):
    _, base = encoders("qwen2_vl")
    saved = base.processor.chat_template
    try:
        base.processor.chat_template = None
        tok_template = base.processor.tokenizer.chat_template
        base.processor.tokenizer.chat_template = None
        with pytest.raises(SupervisionError, match="no chat template"):
            Encoder(base.processor, base.family, base.image_token_id)
    finally:
        base.processor.chat_template = saved
        base.processor.tokenizer.chat_template = tok_template
