"""Tiny randomly initialised VLMs of real architectures, built offline.

`make_tiny_model(family, size, out_dir)` writes a normal Hugging Face directory (config, safetensors weights,
generation config, tokenizer, image processor, processor with chat template) that
`AutoModelForImageTextToText.from_pretrained` and `vlmalign.models.load_processor` load. Sizes:

* ``tiny``  - for tests and the demo: ~0.2-2M parameters, 4-16 image tokens per image (28x28 images);
* ``small`` - for benchmarks: hidden >= 256, >= 4 layers, >= 256 image tokens per image.

Each family's builder returns (model config, tokenizer, processor); the shared code below saves them. Traps handled
here: the vocabulary is exactly ``len(tokenizer)`` (padding it made random models sample undecodable ids), all-zero
weight matrices are re-drawn (transformers zero-initialises Gemma3's projector: step-1 grad norm ~1e5), and the
answer tags are single non-special tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import transformers
from transformers import AutoModelForImageTextToText, GenerationConfig

from .families import get_family
from .loading import image_only_processor_class, save_processor
from .tokenizer import build_tokenizer

SIZES = ("tiny", "small")


def _task_words() -> list[str]:
    try:
        from ..data.synthetic import TASK_WORDS
    except ImportError:  # pragma: no cover - the data layer is optional for the model builder
        return []
    return list(TASK_WORDS)


def chat_template(
    *,
    turn_start: dict[str, str],
    turn_end: str,
    image: str,
    bos: str = "",
    separator: str = "\n",
    user_turn_end: str | None = None,
) -> str:
    """A Jinja chat template rendering typed content (`{"type": "image"}` / `{"type": "text"}`) or string
    content, with assistant turns wrapped in `{% generation %}` (for `return_assistant_tokens_mask`).
    The end-of-turn token of an assistant turn is part of the generation (the model must learn to stop).
    `user_turn_end` (default: `turn_end`) ends the other turns, for formats like LLaVA's where only the
    assistant turn ends with a token.

    The assistant's turn start must end with a character that never merges with the first token of the answer
    (a newline, a colon, a special token): with a trailing space (``"ASSISTANT: "``) the space would be a token
    of its own in the generation prompt but merged into the answer's first word (``" red"``) in training."""
    starts = "{" + ", ".join(f"'{role}': {text!r}" for role, text in turn_start.items()) + "}"
    end = "{{- '" + turn_end + "' -}}"
    other_end = end if user_turn_end is None else ("{{- '" + user_turn_end + "' -}}" if user_turn_end else "")
    return (
        "{%- set starts = " + starts + " -%}"
        "{%- macro render(content) -%}"
        "{%- if content is string -%}{{- content -}}"
        "{%- else -%}{%- for block in content -%}"
        "{%- if block['type'] == 'image' -%}{{- '" + image + "' -}}"
        "{%- elif block['type'] == 'text' -%}{{- block['text'] -}}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{%- endmacro -%}"
        + (bos and "{{- '" + bos + "' -}}")
        + "{%- for message in messages -%}"
        "{{- starts[message['role']] -}}"
        "{%- if message['role'] == 'assistant' -%}"
        "{%- generation -%}{{- render(message['content']) -}}" + end + "{%- endgeneration -%}"
        "{%- else -%}{{- render(message['content']) -}}" + other_end + "{%- endif -%}"
        "{{- '" + separator.replace("\n", "\\n") + "' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- starts['assistant'] -}}{%- endif -%}"
    )


@dataclass
class Built:
    config: transformers.PretrainedConfig
    processor: transformers.ProcessorMixin


# --------------------------------------------------------------------------------------------------- Qwen2-VL family


def _qwen_tokenizer(words):
    specials = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    template = chat_template(
        turn_start={r: f"<|im_start|>{r}\n" for r in ("system", "user", "assistant")},
        turn_end="<|im_end|>",
        image="<|vision_start|><|image_pad|><|vision_end|>",
    )
    return build_tokenizer(
        specials, eos_token="<|im_end|>", pad_token="<|endoftext|>", extra_words=words, chat_template=template,
        extra_special={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )


def _qwen(size: str, words, *, v25: bool) -> Built:
    tok = _qwen_tokenizer(words)
    ids = tok.convert_tokens_to_ids
    if size == "tiny":
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, mrope_section=[4, 2, 2])
        vision = dict(depth=1, embed_dim=64, hidden_size=64, num_heads=4, patch_size=7, image=28)
    else:  # small: 224 px / (7 px * merge 2) = 16 x 16 = 256 image tokens
        text = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, mrope_section=[16, 8, 8])
        vision = dict(depth=2, embed_dim=128, hidden_size=256, num_heads=4, patch_size=7, image=224)
    image = vision.pop("image")
    text_config = dict(
        vocab_size=len(tok), hidden_size=text["hidden_size"], intermediate_size=text["intermediate_size"],
        num_hidden_layers=text["num_hidden_layers"], num_attention_heads=text["num_attention_heads"],
        num_key_value_heads=text["num_key_value_heads"], max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": text["mrope_section"]},
        bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    if v25:
        vision_config = dict(depth=vision["depth"], hidden_size=vision["embed_dim"], out_hidden_size=text["hidden_size"],
                             intermediate_size=2 * vision["embed_dim"], num_heads=vision["num_heads"],
                             patch_size=vision["patch_size"], spatial_merge_size=2, temporal_patch_size=2,
                             window_size=4 * vision["patch_size"], fullatt_block_indexes=[vision["depth"] - 1])
        config_cls, processor_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLProcessor
    else:
        vision_config = dict(depth=vision["depth"], embed_dim=vision["embed_dim"], hidden_size=text["hidden_size"],
                             num_heads=vision["num_heads"], mlp_ratio=2, patch_size=vision["patch_size"],
                             spatial_merge_size=2, temporal_patch_size=2)
        config_cls, processor_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLProcessor
    config = config_cls(
        text_config=text_config, vision_config=vision_config,
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    pixels = image * image
    image_processor = transformers.Qwen2VLImageProcessorPil(
        patch_size=vision["patch_size"], merge_size=2, temporal_patch_size=2,
        size={"shortest_edge": pixels, "longest_edge": pixels},
    )
    processor = image_only_processor_class(processor_cls)(
        image_processor=image_processor, tokenizer=tok, chat_template=tok.chat_template
    )
    return Built(config, processor)


# ------------------------------------------------------------------------------------------- shared text settings

# tiny: ~0.12M text parameters besides the embeddings (0.2-0.3M in all with the vision tower); small: hidden 256,
# 4 layers (~3.5M).
_TEXT = {
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2),
}
# Vision towers: tiny sees 28 px images in 7 px patches (4 x 4 patches), small 224 px (32 x 32) or 112 px (16 x 16).
_VISION = {
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4, patch_size=7),
    "small": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, patch_size=7),
}


def _llama_text_config(size: str, tok, *, bos: str | None, eos: str) -> dict:
    ids = tok.convert_tokens_to_ids
    return dict(
        model_type="llama", vocab_size=len(tok), **_TEXT[size], max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-5,
        bos_token_id=ids(bos) if bos else None, eos_token_id=ids(eos), pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )


# ------------------------------------------------------------------------------------------ Idefics3 and SmolVLM

# Every token the Idefics3 / SmolVLM processors can emit around an image (row/col markers only with image
# splitting, which the tiny models turn off; they are in the vocabulary all the same, as in the real tokenizers).
_IDEFICS_ROW_COL = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
_IDEFICS_IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<global-img>", *_IDEFICS_ROW_COL]


def _idefics(size: str, words, *, smolvlm: bool) -> Built:
    # The real templates: Idefics3 "<|begin_of_text|>User:<image>...<end_of_utterance>\nAssistant: ...", SmolVLM the
    # same after "<|im_start|>". The assistant start has no trailing space (see `chat_template`).
    bos = "<|im_start|>" if smolvlm else "<|begin_of_text|>"
    pad = "<|endoftext|>" if smolvlm else "<|end_of_text|>"
    eos = "<end_of_utterance>"
    template = chat_template(
        turn_start={"system": "System:", "user": "User:", "assistant": "Assistant:"},
        turn_end=eos, image="<image>", bos=bos,
    )
    extra = {"fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
             "end_of_utterance_token": eos, "global_image_token": "<global-img>"}
    specials = ["<|im_end|>"] if smolvlm else []
    tok = build_tokenizer(
        [*specials, eos, *_IDEFICS_IMAGE_TOKENS], eos_token=eos, pad_token=pad, bos_token=bos, extra_words=words,
        chat_template=template, extra_special=extra,
    )
    # One image = one block of image_seq_len tokens: no splitting; pixel shuffle by 2 ->
    # tiny (28 / 7)^2 / 4 = 4 tokens, small (224 / 7)^2 / 4 = 256 tokens.
    image, scale = (28, 2) if size == "tiny" else (224, 2)
    vision = dict(_VISION[size], image_size=image)
    image_seq_len = (image // vision["patch_size"]) ** 2 // scale**2
    config_cls = transformers.SmolVLMConfig if smolvlm else transformers.Idefics3Config
    text_config = _llama_text_config(size, tok, bos=bos, eos=eos)
    config = config_cls(
        text_config=text_config, vision_config=vision, scale_factor=scale,
        image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    ip_cls = transformers.SmolVLMImageProcessorPil if smolvlm else transformers.Idefics3ImageProcessorPil
    image_processor = ip_cls(
        do_image_splitting=False, size={"longest_edge": image}, max_image_size={"longest_edge": image},
    )
    processor_cls = transformers.SmolVLMProcessor if smolvlm else transformers.Idefics3Processor
    processor = image_only_processor_class(processor_cls)(
        image_processor=image_processor, tokenizer=tok, image_seq_len=image_seq_len, chat_template=tok.chat_template
    )
    return Built(config, processor)


# ------------------------------------------------------------------------------------------------------------ LLaVA


def _llava(size: str, words, *, siglip: bool) -> Built:
    # LLaVA-1.5's "<s>USER: <image>\n... ASSISTANT: ...</s>USER: ..."; only the assistant turn ends with </s>.
    # The assistant start has no trailing space (see `chat_template`).
    template = chat_template(
        turn_start={"system": "", "user": "USER: ", "assistant": "ASSISTANT:"},
        turn_end="</s>", user_turn_end=" ", image="<image>\n", bos="<s>", separator="",
    )
    tok = build_tokenizer(
        ["<image>"], eos_token="</s>", pad_token="<pad>", bos_token="<s>", unk_token="<unk>", extra_words=words,
        chat_template=template, extra_special={"image_token": "<image>"},
    )
    # tiny: 28 px / 7 px = 4 x 4 = 16 tokens; small: 112 px / 7 px = 16 x 16 = 256 tokens. CLIP adds a CLS token
    # that the "default" feature strategy drops again; SigLIP has none ("full").
    image = 28 if size == "tiny" else 112
    vision = dict(_VISION[size], image_size=image, model_type="siglip_vision_model" if siglip else "clip_vision_model")
    if siglip:
        vision["vision_use_head"] = False  # the pooling head is unused by LLaVA (no gradients)
    else:
        vision["projection_dim"] = vision["hidden_size"]
    strategy = "full" if siglip else "default"
    num_tokens = (image // vision["patch_size"]) ** 2
    config = transformers.LlavaConfig(
        text_config=_llama_text_config(size, tok, bos="<s>", eos="</s>"), vision_config=vision,
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=num_tokens,
        vision_feature_select_strategy=strategy,
        # The last layer (real checkpoints take the penultimate of a deep tower; with one layer that would be the
        # patch embeddings and leave the layer without gradients).
        vision_feature_layer=-1, projector_hidden_act="gelu", tie_word_embeddings=False,
    )
    if siglip:
        image_processor = transformers.SiglipImageProcessorPil(size={"height": image, "width": image})
    else:
        image_processor = transformers.CLIPImageProcessorPil(
            size={"shortest_edge": image}, crop_size={"height": image, "width": image}
        )
    processor = transformers.LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=vision["patch_size"],
        vision_feature_select_strategy=strategy, num_additional_image_tokens=0 if siglip else 1,
        chat_template=tok.chat_template,
    )
    return Built(config, processor)


# ----------------------------------------------------------------------------------------------------------- Gemma3


def _gemma3(size: str, words) -> Built:
    # "<bos><start_of_turn>user\n...<end_of_turn>\n<start_of_turn>model\n...<end_of_turn>\n"; the image slot is
    # <start_of_image>, which the processor expands to "\n\n<start_of_image><image_soft_token>*N<end_of_image>\n\n".
    template = chat_template(
        turn_start={"system": "<start_of_turn>user\n", "user": "<start_of_turn>user\n",
                    "assistant": "<start_of_turn>model\n"},
        turn_end="<end_of_turn>", image="<start_of_image>", bos="<bos>",
    )
    tok = build_tokenizer(
        ["<start_of_turn>", "<end_of_turn>", "<eos>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"],
        eos_token="<end_of_turn>", pad_token="<pad>", bos_token="<bos>", unk_token="<unk>", extra_words=words,
        chat_template=template,
        extra_special={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                       "image_token": "<image_soft_token>"},
    )
    ids = tok.convert_tokens_to_ids
    # tiny: 28 px / 7 px = 4 x 4 patches pooled 2 x 2 -> 4 tokens; small: 224 / 7 = 32 x 32 pooled -> 16 x 16 = 256.
    image, mm_tokens = (28, 4) if size == "tiny" else (224, 256)
    text = _TEXT[size]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    layers = text["num_hidden_layers"]
    text_config = dict(
        vocab_size=len(tok), **text, head_dim=head_dim, query_pre_attn_scalar=head_dim,
        max_position_embeddings=4096, sliding_window=512,
        # Gemma3's 5:1 local/global pattern, shortened: the last layer global.
        layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"],
        bos_token_id=ids("<bos>"), eos_token_id=ids("<end_of_turn>"), pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    vision = dict(_VISION[size], image_size=image, model_type="siglip_vision_model", vision_use_head=False)
    config = transformers.Gemma3Config(
        text_config=text_config, vision_config=vision, mm_tokens_per_image=mm_tokens,
        boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"), tie_word_embeddings=True,
    )
    image_processor = transformers.Gemma3ImageProcessorPil(size={"height": image, "width": image})
    processor = transformers.Gemma3Processor(
        image_processor=image_processor, tokenizer=tok, image_seq_length=mm_tokens, chat_template=tok.chat_template
    )
    return Built(config, processor)


BUILDERS: dict[str, Callable[[str, list[str]], Built]] = {
    "qwen2_vl": lambda size, words: _qwen(size, words, v25=False),
    "qwen2_5_vl": lambda size, words: _qwen(size, words, v25=True),
    "idefics3": lambda size, words: _idefics(size, words, smolvlm=False),
    "smolvlm": lambda size, words: _idefics(size, words, smolvlm=True),
    "llava_clip": lambda size, words: _llava(size, words, siglip=False),
    "llava_siglip": lambda size, words: _llava(size, words, siglip=True),
    "gemma3": _gemma3,
}


# ------------------------------------------------------------------------------------------------------ shared part


def _redraw_zero_matrices(model: torch.nn.Module, std: float = 0.02) -> None:
    """Re-draw weight matrices that were initialised to all zeros (e.g. Gemma3's projector)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and not param.any():
                param.normal_(0.0, std)


def build_tiny_model(family: str, size: str = "tiny", *, seed: int = 0, words: list[str] | None = None):
    """Build (model, processor) in memory: random init of the family's real transformers class."""
    fam = get_family(family)
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if fam.name not in BUILDERS:
        raise NotImplementedError(f"no tiny-model builder for family {fam.name!r} yet; have: {', '.join(BUILDERS)}")
    built = BUILDERS[fam.name](size, _task_words() if words is None else list(words))
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(built.config, dtype=torch.float32)
    _redraw_zero_matrices(model)
    tok = built.processor.tokenizer
    eos_id = tok.convert_tokens_to_ids(fam.eos_token)
    model.generation_config = GenerationConfig(
        eos_token_id=eos_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id
    )
    model.eval()
    return model, built.processor


def make_tiny_model(family: str, size: str = "tiny", out_dir: str | os.PathLike = "tiny-model", *, seed: int = 0,
                    words: list[str] | None = None) -> Path:
    """Build a tiny random VLM and save model + processor to `out_dir` (safetensors). Returns the path."""
    model, processor = build_tiny_model(family, size, seed=seed, words=words)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    save_processor(processor, out)
    return out
