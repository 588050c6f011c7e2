"""Tiny randomly initialised VLMs of real architectures, built offline.

`make_tiny_model(family, size, out_dir)` writes a normal Hugging Face directory (config, safetensors weights,
generation config, tokenizer, image processor, processor with chat template) that
`AutoModelForImageTextToText.from_pretrained` and `vlmalign.models.load_processor` load. Sizes:

* ``tiny``  - for tests and the demo: ~0.2-2M parameters, 4-24 image tokens per image (the synthetic 28 px images);
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

from .families import IDEFICS_IMAGE_TOKENS, get_family
from .loading import image_only_processor_class, save_processor
from .tokenizer import build_tokenizer
from .vocabulary import TASK_WORDS

SIZES = ("tiny", "small")


TEMPLATES = Path(__file__).parent / "chat_templates"


def official_template(name: str) -> str:
    """An official chat template shipped with vlmalign (`chat_templates/SOURCES.md` names each source), byte for
    byte."""
    with open(TEMPLATES / f"{name}.jinja", encoding="utf-8", newline="") as f:
        return f.read()


@dataclass
class Built:
    config: transformers.PretrainedConfig
    processor: transformers.ProcessorMixin
    eos_token_ids: tuple[str, ...]  # generation_config.eos_token_id, as the real checkpoint's (token strings)


# Each builder below is the real checkpoint scaled down in sizes only: the official chat template, the real special
# tokens (BOS added by the tokenizer or not, EOS, pad, image tokens), the real default padding side, the real
# patch / merge / pooling structure that decides the image token counts, with fewer pixels and smaller layers.
# The reference for each fact: ../shared/reference/official-templates-facts.md (sources named there).

# --------------------------------------------------------------------------------------------------- Qwen2-VL family


def _qwen_tokenizer(words, template: str, padding_side: str):
    """The Qwen-VL tokenizer: ChatML turn markers and vision tokens, eos <|im_end|>, pad <|endoftext|>, no BOS."""
    specials = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                "<|image_pad|>", "<|video_pad|>"]
    return build_tokenizer(
        specials, eos_token="<|im_end|>", pad_token="<|endoftext|>", extra_words=words,
        chat_template=official_template(template), padding_side=padding_side,
        extra_special={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                       "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"},
    )


def _qwen_built(tok, config_cls, processor_cls, text_config: dict, vision_config: dict, patch: int,
                pixels: tuple[int, int], mean_std: tuple[list, list]) -> Built:
    """A Qwen-VL model config and processor: patches merged 2 x 2, temporal patch 2, images resized to between
    `pixels[0]` and `pixels[1]` pixels."""
    ids = tok.convert_tokens_to_ids
    config = config_cls(
        text_config=text_config, vision_config=vision_config,
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    image_processor = transformers.Qwen2VLImageProcessorPil(
        patch_size=patch, merge_size=2, temporal_patch_size=2,
        size={"shortest_edge": pixels[0], "longest_edge": pixels[1]}, image_mean=mean_std[0], image_std=mean_std[1],
    )
    processor = image_only_processor_class(processor_cls)(
        image_processor=image_processor, tokenizer=tok, chat_template=tok.chat_template
    )
    return Built(config, processor, ("<|im_end|>", "<|endoftext|>"))


def _qwen(size: str, words, *, v25: bool) -> Built:
    # Qwen/Qwen2-VL-2B-Instruct, Qwen/Qwen2.5-VL-3B-Instruct: ChatML with a default system prompt, no BOS, eos
    # <|im_end|>, pad <|endoftext|>; padding side left (Qwen2-VL) / right (Qwen2.5-VL); 14 px patches merged 2 x 2,
    # temporal patch 2: one image token per 28 x 28 px, at least 56 x 56 px (min_pixels 3136).
    tok = _qwen_tokenizer(words, "qwen2_5_vl", "right" if v25 else "left")
    ids = tok.convert_tokens_to_ids
    if size == "tiny":  # 56-112 px: 4-16 image tokens
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, mrope_section=[4, 2, 2])
        vision = dict(depth=1, embed_dim=64, hidden_size=64, num_heads=4)
        min_pixels, max_pixels = 56 * 56, 112 * 112
    else:  # small: 448 x 448 px = 16 x 16 = 256 image tokens
        text = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, mrope_section=[16, 8, 8])
        vision = dict(depth=2, embed_dim=128, hidden_size=256, num_heads=4)
        min_pixels = max_pixels = 448 * 448
    patch = 14
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
                             patch_size=patch, spatial_merge_size=2, temporal_patch_size=2,
                             window_size=8 * patch, fullatt_block_indexes=[vision["depth"] - 1])
        config_cls, processor_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLProcessor
    else:
        vision_config = dict(depth=vision["depth"], embed_dim=vision["embed_dim"], hidden_size=text["hidden_size"],
                             num_heads=vision["num_heads"], mlp_ratio=2, patch_size=patch,
                             spatial_merge_size=2, temporal_patch_size=2)
        config_cls, processor_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLProcessor
    return _qwen_built(tok, config_cls, processor_cls, text_config, vision_config, patch, (min_pixels, max_pixels),
                       ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]))


def _qwen3(size: str, words, *, moe: bool) -> Built:
    # Qwen/Qwen3-VL-2B-Instruct (and the -30B-A3B mixture of experts): ChatML without a default system prompt, no
    # BOS, eos <|im_end|>, pad <|endoftext|>, padding side right; 16 px patches merged 2 x 2 (one token per 32 x 32
    # px), interleaved 3-D rotary positions, DeepStack features of intermediate vision layers. Scaled: 64-128 px
    # (4-16 image tokens) in `tiny`, 512 x 512 px (256 tokens) in `small`; MoE: 4 experts, 2 per token.
    tok = _qwen_tokenizer(words, "qwen3_vl", "right")
    ids = tok.convert_tokens_to_ids
    text = dict(_TEXT[size], head_dim=16 if size == "tiny" else 64)
    if size == "tiny":
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, deepstack_visual_indexes=[0],
                      num_position_embeddings=64)
        min_pixels, max_pixels, mrope = 64 * 64, 128 * 128, [4, 2, 2]
    else:
        vision = dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4, deepstack_visual_indexes=[0],
                      num_position_embeddings=1024)
        min_pixels = max_pixels = 512 * 512
        mrope = [16, 8, 8]
    text_config = dict(
        vocab_size=len(tok), **text, max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0, "mrope_section": mrope,
                         "mrope_interleaved": True},
        bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    if moe:
        # Router settings as the released Qwen3 MoE configs (Qwen3-30B-A3B: router_aux_loss_coef 0.001,
        # output_router_logits false, so no load-balancing loss unless a run turns it on; models/moe.py).
        text_config.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=text["intermediate_size"] // 2,
                           decoder_sparse_step=1, router_aux_loss_coef=0.001, output_router_logits=False,
                           mlp_only_layers=[])
    vision_config = dict(vision, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                         out_hidden_size=text["hidden_size"], hidden_act="gelu_pytorch_tanh")
    config_cls = transformers.Qwen3VLMoeConfig if moe else transformers.Qwen3VLConfig
    return _qwen_built(tok, config_cls, transformers.Qwen3VLProcessor, text_config, vision_config, 16,
                       (min_pixels, max_pixels), ([0.5] * 3, [0.5] * 3))


def _qwen3_5_pretokenizer(tok) -> None:
    """The Qwen3.5 tokenizer's own normaliser (NFC) and pre-tokenizer (its split regex: each digit alone, a space
    before a digit a token of its own), which transformers' `Qwen3_5Tokenizer` puts back on any saved vocabulary
    when it loads a qwen3_5 model's tokenizer; set here too, so the in-memory and the saved tokenizer agree."""
    from tokenizers import Regex, normalizers, pre_tokenizers
    from transformers.models.qwen3_5.tokenization_qwen3_5 import PRETOKENIZE_REGEX

    backend = tok.backend_tokenizer
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _qwen3_5(size: str, words, *, moe: bool) -> Built:
    # Qwen/Qwen3.5-0.8B / -2B (dense) and Qwen/Qwen3.5-35B-A3B (mixture of experts): natively multimodal, the
    # Qwen3-VL tokenizer layout and processor (no BOS, eos <|im_end|>, pad <|endoftext|>, padding side right; 16 px
    # patches merged 2 x 2, temporal patch 2, mean/std 0.5), no DeepStack. Chat template: the official Qwen3.5 one,
    # "nothink" as the <= 2B checkpoints ship it (generation prompt ends with an empty <think></think> block) for the
    # dense family, "think" as the >= 4B checkpoints (the MoE ones) ship it (generation prompt ends with <think>).
    # Hybrid text layers: three gated-DeltaNet (linear attention) layers then one full-attention layer, the real
    # `full_attention_interval` 4; gated attention output, rotary on a quarter of each head (partial_rotary_factor
    # 0.25), interleaved 3-D rotary positions. Scaled: 4 layers, 64-128 px (4-16 image tokens) in `tiny`, 512 x 512
    # px (256 tokens) in `small`; MoE: 4 experts, 2 per token, plus the shared expert.
    tok = _qwen_tokenizer(words, "qwen3_5_think" if moe else "qwen3_5_nothink", "right")
    _qwen3_5_pretokenizer(tok)
    ids = tok.convert_tokens_to_ids
    hidden, inter = (64, 256) if size == "tiny" else (256, 688)
    head_dim = 32 if size == "tiny" else 64
    text_config = dict(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"], num_attention_heads=4, num_key_value_heads=2,
        head_dim=head_dim, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=head_dim // 2,
        linear_value_head_dim=head_dim // 2, linear_conv_kernel_dim=4, max_position_embeddings=4096, rms_norm_eps=1e-6,
        # rotary on head_dim / 4 dims = head_dim / 8 frequency pairs, split 2:1:1 over (t, h, w) as [11, 11, 10] of 32
        rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                         "mrope_section": [2, 1, 1] if size == "tiny" else [4, 2, 2], "mrope_interleaved": True},
        bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    if moe:
        del text_config["intermediate_size"]
        text_config.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=inter // 2,
                           shared_expert_intermediate_size=inter // 2, router_aux_loss_coef=0.001)
    if size == "tiny":
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, num_position_embeddings=64)
        min_pixels, max_pixels = 64 * 64, 128 * 128
    else:
        vision = dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4, num_position_embeddings=1024)
        min_pixels = max_pixels = 512 * 512
    vision_config = dict(vision, patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden,
                         hidden_act="gelu_pytorch_tanh")
    config_cls = transformers.Qwen3_5MoeConfig if moe else transformers.Qwen3_5Config
    return _qwen_built(tok, config_cls, transformers.Qwen3VLProcessor, text_config, vision_config, 16,
                       (min_pixels, max_pixels), ([0.5] * 3, [0.5] * 3))


# ------------------------------------------------------------------------------------------- shared text settings

# tiny: ~0.12M text parameters besides the embeddings (0.2-0.3M in all with the vision tower); small: hidden 256,
# 4 layers (~3.5M).
_TEXT = {
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2),
}
_VISION = {
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4),
    "small": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
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



def _idefics(size: str, words, *, smolvlm: bool) -> Built:
    eos = "<end_of_utterance>"
    extra = {"fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
             "end_of_utterance_token": eos, "global_image_token": "<global-img>"}
    if smolvlm:
        # HuggingFaceTB/SmolVLM-256M-Instruct: the template starts with a literal <|im_start|> (= bos token text),
        # the tokenizer adds no BOS; eos <end_of_utterance>, pad <|im_end|>, unk <|endoftext|>. SigLIP 16 px
        # patches, pixel shuffle 4: 512 px tiles of 64 tokens; scaled: 128 px tiles of (128/16)^2/4^2 = 4 tokens.
        tok = build_tokenizer(
            ["<|im_end|>", eos, *IDEFICS_IMAGE_TOKENS], eos_token=eos, pad_token="<|im_end|>",
            bos_token="<|im_start|>", unk_token="<|endoftext|>", extra_words=words,
            chat_template=official_template("smolvlm"), extra_special=extra,
        )
        patch, scale, tile = 16, 4, 128 if size == "tiny" else 512
        text_bos, eos_ids = "<|im_start|>", (eos,)
    else:
        # HuggingFaceM4/Idefics3-8B-Llama3: the template starts with a literal <|begin_of_text|> and the tokenizer
        # adds BOS too (never two: see data/supervision.py); pads left. SigLIP 14 px patches, pixel shuffle 2:
        # 364 px tiles of 169 tokens; scaled: 56 px tiles of (56/14)^2/2^2 = 4 tokens.
        tok = build_tokenizer(
            ["<|reserved_special_token_0|>", eos, *IDEFICS_IMAGE_TOKENS], eos_token="<|end_of_text|>",
            pad_token="<|reserved_special_token_0|>", bos_token="<|begin_of_text|>", extra_words=words,
            chat_template=official_template("idefics3"), extra_special=extra, add_bos=True, padding_side="left",
        )
        patch, scale, tile = 14, 2, 56 if size == "tiny" else 224
        text_bos, eos_ids = "<|begin_of_text|>", ("<|end_of_text|>", eos)
    # Image splitting as the real processors do it: the image is resized to at most 2 x 2 tiles (4 x 4 in the
    # real ones), each tile plus a downscaled global view is encoded, with <row_i_col_j> / <global-img> markers.
    vision = dict(_VISION[size], image_size=tile, patch_size=patch)
    image_seq_len = (tile // patch) ** 2 // scale**2
    config_cls = transformers.SmolVLMConfig if smolvlm else transformers.Idefics3Config
    text_config = _llama_text_config(size, tok, bos=text_bos, eos=eos)
    config = config_cls(
        text_config=text_config, vision_config=vision, scale_factor=scale,
        image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    ip_cls = transformers.SmolVLMImageProcessorPil if smolvlm else transformers.Idefics3ImageProcessorPil
    image_processor = ip_cls(
        do_image_splitting=True, size={"longest_edge": 2 * tile}, max_image_size={"longest_edge": tile},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    processor_cls = transformers.SmolVLMProcessor if smolvlm else transformers.Idefics3Processor
    processor = image_only_processor_class(processor_cls)(
        image_processor=image_processor, tokenizer=tok, image_seq_len=image_seq_len, chat_template=tok.chat_template
    )
    return Built(config, processor, eos_ids)


# ------------------------------------------------------------------------------------------------------------ LLaVA


def _llava(size: str, words, *, siglip: bool) -> Built:
    # llava-hf/llava-1.5-7b-hf: "USER: <image>\n... ASSISTANT: ..." (the template renders no BOS and no </s>; the
    # tokenizer adds <s>), pad <pad>, padding side left; CLIP ViT-L/14 at 336 px: one token per 14 px patch, the
    # CLS token added and dropped again ("default" strategy), features of the penultimate layer. Scaled: 56 px
    # (tiny, 16 tokens) or 224 px (small, 256 tokens). The SigLIP variant (no CLS, "full") shares the rest.
    tok = build_tokenizer(
        ["<image>"], eos_token="</s>", pad_token="<pad>", bos_token="<s>", unk_token="<unk>", extra_words=words,
        chat_template=official_template("llava_1_5"), extra_special={"image_token": "<image>"},
        add_bos=True, padding_side="left",
    )
    patch, image = 14, 56 if size == "tiny" else 224
    vision = dict(_VISION[size], image_size=image, patch_size=patch, num_hidden_layers=2,
                  model_type="siglip_vision_model" if siglip else "clip_vision_model")
    if siglip:
        vision["vision_use_head"] = False  # the pooling head is unused by LLaVA (no gradients)
    else:
        vision["projection_dim"] = vision["hidden_size"]
    strategy = "full" if siglip else "default"
    num_tokens = (image // patch) ** 2
    config = transformers.LlavaConfig(
        text_config=_llama_text_config(size, tok, bos="<s>", eos="</s>"), vision_config=vision,
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=num_tokens,
        vision_feature_select_strategy=strategy, vision_feature_layer=-2, projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    if siglip:
        image_processor = transformers.SiglipImageProcessorPil(size={"height": image, "width": image})
    else:
        image_processor = transformers.CLIPImageProcessorPil(
            size={"shortest_edge": image}, crop_size={"height": image, "width": image}
        )
    processor = transformers.LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=patch,
        vision_feature_select_strategy=strategy, num_additional_image_tokens=0 if siglip else 1,
        chat_template=tok.chat_template,
    )
    return Built(config, processor, ("</s>",))


# ----------------------------------------------------------------------------------------------------------- Gemma3


def _gemma3(size: str, words) -> Built:
    # google/gemma-3-4b-it: the template renders {{ bos_token }} and the tokenizer adds BOS too (never two); turns
    # end with <end_of_turn>, the tokenizer's eos is <eos>, pad <pad>, padding side left. Each <start_of_image> is
    # expanded by the processor to "\n\n<start_of_image>" + soft tokens + "<end_of_image>\n\n"; SigLIP 14 px patches
    # at 896 px average-pooled to 16 x 16 = 256 soft tokens. Scaled: 56 px, 4 x 4 patches pooled to 2 x 2 = 4
    # tokens (tiny), or 224 px, 16 x 16 patches kept at 16 x 16 = 256 (small).
    tok = build_tokenizer(
        ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"],
        eos_token="<eos>", pad_token="<pad>", bos_token="<bos>", unk_token="<unk>", extra_words=words,
        chat_template=official_template("gemma3"), add_bos=True, padding_side="left",
        extra_special={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                       "image_token": "<image_soft_token>"},
    )
    ids = tok.convert_tokens_to_ids
    image, mm_tokens = (56, 4) if size == "tiny" else (224, 256)
    text = _TEXT[size]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    layers = text["num_hidden_layers"]
    text_config = dict(
        vocab_size=len(tok), **text, head_dim=head_dim, query_pre_attn_scalar=head_dim,
        max_position_embeddings=4096, sliding_window=512,
        # Gemma3's 5:1 local/global pattern, shortened: the last layer global.
        layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"],
        bos_token_id=ids("<bos>"), eos_token_id=[ids("<eos>"), ids("<end_of_turn>")], pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    vision = dict(_VISION[size], image_size=image, patch_size=14, model_type="siglip_vision_model",
                  vision_use_head=False)
    config = transformers.Gemma3Config(
        text_config=text_config, vision_config=vision, mm_tokens_per_image=mm_tokens,
        boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"), tie_word_embeddings=True,
    )
    image_processor = transformers.Gemma3ImageProcessorPil(size={"height": image, "width": image})
    processor = transformers.Gemma3Processor(
        image_processor=image_processor, tokenizer=tok, image_seq_length=mm_tokens, chat_template=tok.chat_template
    )
    return Built(config, processor, ("<eos>", "<end_of_turn>"))


def _extra(name: str) -> Callable[[str, list[str]], Built]:
    from . import tiny_extra  # Gemma 4, LLaVA-OneVision, InternVL (kept apart: file size)

    return getattr(tiny_extra, name)


BUILDERS: dict[str, Callable[[str, list[str]], Built]] = {
    "qwen2_vl": lambda size, words: _qwen(size, words, v25=False),
    "qwen2_5_vl": lambda size, words: _qwen(size, words, v25=True),
    "idefics3": lambda size, words: _idefics(size, words, smolvlm=False),
    "smolvlm": lambda size, words: _idefics(size, words, smolvlm=True),
    "llava_clip": lambda size, words: _llava(size, words, siglip=False),
    "llava_siglip": lambda size, words: _llava(size, words, siglip=True),
    "gemma3": _gemma3,
    "qwen3_vl": lambda size, words: _qwen3(size, words, moe=False),
    "qwen3_vl_moe": lambda size, words: _qwen3(size, words, moe=True),
    "gemma4": lambda size, words: _extra("gemma4")(size, words),
    "llava_onevision": lambda size, words: _extra("llava_onevision")(size, words),
    "internvl": lambda size, words: _extra("internvl")(size, words),
    "qwen3_5": lambda size, words: _qwen3_5(size, words, moe=False),
    "qwen3_5_moe": lambda size, words: _qwen3_5(size, words, moe=True),
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
    built = BUILDERS[fam.name](size, list(TASK_WORDS if words is None else words))
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(built.config, dtype=torch.float32)
    _redraw_zero_matrices(model)
    tok = built.processor.tokenizer
    eos_ids = [tok.convert_tokens_to_ids(t) for t in built.eos_token_ids]
    model.generation_config = GenerationConfig(
        eos_token_id=eos_ids[0] if len(eos_ids) == 1 else eos_ids, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
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
    save_processor(processor, out, get_family(family))
    return out
