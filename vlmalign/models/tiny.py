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

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import transformers
from transformers import AutoModelForImageTextToText, GenerationConfig

from .families import get_family
from .loading import image_only_processor_class
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
) -> str:
    """A Jinja chat template rendering typed content (`{"type": "image"}` / `{"type": "text"}`) or string
    content, with assistant turns wrapped in `{% generation %}` (for `return_assistant_tokens_mask`).
    The end-of-turn token of an assistant turn is part of the generation (the model must learn to stop)."""
    starts = "{" + ", ".join(f"'{role}': {text!r}" for role, text in turn_start.items()) + "}"
    end = "{{- '" + turn_end + "' -}}"
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
        "{%- else -%}{{- render(message['content']) -}}" + end + "{%- endif -%}"
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


BUILDERS: dict[str, Callable[[str, list[str]], Built]] = {
    "qwen2_vl": lambda size, words: _qwen(size, words, v25=False),
    "qwen2_5_vl": lambda size, words: _qwen(size, words, v25=True),
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
    processor.save_pretrained(out)
    _write_video_processor_config(out, processor)
    return out


def _write_video_processor_config(out: Path, processor) -> None:
    """Processors that declare a video processor (Qwen2-VL, Qwen2.5-VL, SmolVLM) need its config on disk for
    plain `AutoProcessor.from_pretrained` (with torchvision installed). Without torchvision the video processor
    cannot be instantiated, so its config is written from the image processor's settings."""
    names = {"Qwen2VLProcessor": "Qwen2VLVideoProcessor", "Qwen2_5_VLProcessor": "Qwen2VLVideoProcessor",
             "SmolVLMProcessor": "SmolVLMVideoProcessor"}
    video_type = names.get(type(processor).__name__)
    if video_type is None:
        return
    keys = ("patch_size", "merge_size", "temporal_patch_size", "size", "image_mean", "image_std", "do_resize",
            "do_rescale", "rescale_factor", "do_normalize", "do_convert_rgb", "max_image_size")
    ip = processor.image_processor.to_dict()
    config = {k: ip[k] for k in keys if k in ip}
    config["video_processor_type"] = video_type
    config["processor_class"] = type(processor).__name__
    (out / "video_preprocessor_config.json").write_text(json.dumps(config, indent=2))
