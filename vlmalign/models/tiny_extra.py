"""Tiny-model builders of Gemma 4, LLaVA-OneVision and InternVL (the rest: `vlmalign.models.tiny`).

Each is the real checkpoint scaled down in sizes only, as in `tiny.py`: the official chat template
(`chat_templates/SOURCES.md`), the real special tokens, BOS behaviour, padding side and generation stops, and the
real processor structure (Gemma 4's aspect-ratio-preserving resize to a soft-token budget with 3 x 3 pooling and
boi/eoi markers; OneVision's anyres grids with newline features and unpadding; InternVL's dynamic tiling with a
thumbnail, <img>...</img> around the context tokens and pixel shuffle), with fewer pixels and smaller layers.
"""

from __future__ import annotations

import transformers

from .loading import image_only_processor_class
from .tiny import _TEXT, _VISION, Built, official_template
from .tokenizer import build_tokenizer


def _qwen2_text_config(size: str, tok, *, eos: str) -> dict:
    ids = tok.convert_tokens_to_ids
    return dict(model_type="qwen2", vocab_size=len(tok), **_TEXT[size], max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-6,
                bos_token_id=None, eos_token_id=ids(eos), pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
                layer_types=None)


# ----------------------------------------------------------------------------------------------------------- Gemma 4

GEMMA4_TOKENS = ["<|turn>", "<turn|>", "<|image>", "<image|>", "<|image|>", "<|video|>", "<|audio>", "<audio|>",
                 "<|audio|>", "<|channel>", "<channel|>", "<|think|>", "<|tool>", "<tool|>", "<|tool_call>",
                 "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>']


def gemma4(size: str, words) -> Built:
    # google/gemma-4-E2B-it: the template renders {{ bos_token }} and the tokenizer adds BOS too (never two), turns
    # are <|turn>role ... <turn|>, the generation prompt opens an empty thought channel (thinking off), eos <eos>,
    # pad <pad>, padding side left. Each <|image|> is expanded to <|image> + soft tokens + <image|>; the image is
    # resized (aspect ratio kept) to the largest size whose 16 px patches, pooled 3 x 3, fit the soft-token budget
    # (70 ... 1120; 280 by default). Scaled: budget 70 (the smallest allowed) with 3 px patches pooled 2 x 2 (tiny:
    # 16 x 16 patches -> 8 x 8 = 64 soft tokens for a square image; 3 x 3 pooling would make the tower run 630
    # patch slots, 5x slower), 280 with 4 px patches pooled 3 x 3 (small: 256 soft tokens for a square image).
    tok = build_tokenizer(
        GEMMA4_TOKENS, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>", unk_token="<unk>", extra_words=words,
        chat_template=official_template("gemma4"), add_bos=True, padding_side="left",
        extra_special={"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
                       "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"},
    )
    ids = tok.convert_tokens_to_ids
    patch, soft, pool = (3, 70, 2) if size == "tiny" else (4, 280, 3)
    text = _TEXT[size]
    layers = text["num_hidden_layers"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    text_config = transformers.Gemma4TextConfig(
        vocab_size=len(tok), **text, head_dim=head_dim, global_head_dim=head_dim, max_position_embeddings=4096,
        sliding_window=512, layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"],
        # per-layer input embeddings (E2B: 256 wide), scaled down. E2B's KV sharing (its last 20 of 35 layers reuse
        # earlier keys/values) is left out: measured with 4 layers / 2 shared, the shared-prefix path equals the
        # plain one (gradients 2.6e-6 relative) but sits at the tolerance edge under checkpointing + LoRA (1.2e-5)
        vocab_size_per_layer_input=len(tok), hidden_size_per_layer_input=16, num_kv_shared_layers=0,
        bos_token_id=ids("<bos>"), eos_token_id=[ids("<eos>"), ids("<turn|>")], pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True, final_logit_softcapping=30.0,  # as the real checkpoints
    )
    vision = _VISION[size]
    vision_config = transformers.Gemma4VisionConfig(
        hidden_size=vision["hidden_size"], intermediate_size=vision["intermediate_size"],
        num_hidden_layers=vision["num_hidden_layers"], num_attention_heads=vision["num_attention_heads"],
        num_key_value_heads=vision["num_attention_heads"], head_dim=vision["hidden_size"] // vision["num_attention_heads"],
        patch_size=patch, pooling_kernel_size=pool, position_embedding_size=soft * pool**2,
        default_output_length=soft,
    )
    config = transformers.Gemma4Config(
        text_config=text_config, vision_config=vision_config, audio_config=None,
        boi_token_id=ids("<|image>"), eoi_token_id=ids("<image|>"), image_token_id=ids("<|image|>"),
        video_token_id=ids("<|video|>"), boa_token_id=ids("<|audio>"), eoa_token_index=ids("<audio|>"),
        audio_token_id=ids("<|audio|>"), tie_word_embeddings=True,
    )
    image_processor = transformers.Gemma4ImageProcessorPil(patch_size=patch, max_soft_tokens=soft,
                                                           pooling_kernel_size=pool)
    processor = image_only_processor_class(transformers.Gemma4Processor)(
        feature_extractor=transformers.Gemma4AudioFeatureExtractor(), image_processor=image_processor,
        tokenizer=tok, image_seq_length=soft, chat_template=tok.chat_template,
    )
    return Built(config, processor, ("<eos>", "<turn|>"))


# --------------------------------------------------------------------------------------------------- LLaVA-OneVision


def llava_onevision(size: str, words) -> Built:
    # llava-hf/llava-onevision-qwen2-0.5b-ov-hf: ChatML-like with "<|im_start|>role " and no newline after
    # <|im_end|>, no BOS (Qwen2 tokenizer), eos <|im_end|>, pad <|endoftext|>; SigLIP 14 px patches at 384 px
    # (27 x 27 = 729 base features, "full" strategy) plus an anyres grid chosen among 36 pinpoints (1 x 1 ... 6 x 6
    # tiles of 384 px), unpadded to the image's aspect ratio with a newline feature after each row ("anyres_max_9":
    # pooled down when above 9 x 729). Scaled: 28 px tiles of 2 x 2 features (tiny) / 224 px of 16 x 16 (small),
    # pinpoints 1 x 1 ... 3 x 3 tiles.
    tok = build_tokenizer(
        ["<|im_start|>", "<|im_end|>", "<image>", "<video>"], eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_words=words, chat_template=official_template("llava_onevision"), padding_side="right",
        extra_special={"image_token": "<image>", "video_token": "<video>"},
    )
    ids = tok.convert_tokens_to_ids
    patch, tile = 14, 28 if size == "tiny" else 224
    vision = dict(_VISION[size], image_size=tile, patch_size=patch, model_type="siglip_vision_model",
                  vision_use_head=False)
    pinpoints = [[tile * i, tile * j] for i in range(1, 4) for j in range(1, 4)]
    config = transformers.LlavaOnevisionConfig(
        text_config=_qwen2_text_config(size, tok, eos="<|im_end|>"), vision_config=vision,
        image_token_index=ids("<image>"), video_token_index=ids("<video>"), vision_feature_select_strategy="full",
        vision_feature_layer=-1, image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )
    image_processor = transformers.LlavaOnevisionImageProcessorPil(
        size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints, do_pad=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    processor = image_only_processor_class(transformers.LlavaOnevisionProcessor)(
        image_processor=image_processor, tokenizer=tok, num_image_tokens=(tile // patch) ** 2,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9", chat_template=tok.chat_template,
    )
    return Built(config, processor, ("<|im_end|>", "<|endoftext|>"))


# ---------------------------------------------------------------------------------------------------------- InternVL


def internvl(size: str, words) -> Built:
    # OpenGVLab/InternVL3-1B-hf / InternVL3_5-1B-HF: ChatML without a default system prompt, each image rendered as
    # <IMG_CONTEXT> and expanded to <img> + 256 x tiles <IMG_CONTEXT> + </img>; no BOS (Qwen2 tokenizer), eos
    # <|im_end|>, pad <|endoftext|>, padding side left. Images are cut into 1-12 tiles of 448 px on the grid
    # closest to their aspect ratio, plus a thumbnail when there is more than one tile; InternViT 14 px patches
    # (CLS dropped), pixel shuffle 0.5: (448 / 14)^2 / 4 = 256 tokens a tile. Scaled: 28 px tiles of 7 px patches
    # -> 4 tokens a tile (tiny), 112 px tiles of 7 px patches -> 64 a tile, at most 12 tiles (small).
    tok = build_tokenizer(
        ["<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>", "<quad>", "</quad>", "<ref>",
         "</ref>", "<box>", "</box>"],
        eos_token="<|im_end|>", pad_token="<|endoftext|>", extra_words=words,
        chat_template=official_template("internvl"), padding_side="left",
        extra_special={"start_image_token": "<img>", "end_image_token": "</img>",
                       "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
    )
    ids = tok.convert_tokens_to_ids
    patch, tile = 7, 28 if size == "tiny" else 112
    vision = _VISION[size]
    vision_config = dict(
        hidden_size=vision["hidden_size"], intermediate_size=vision["intermediate_size"],
        num_hidden_layers=vision["num_hidden_layers"], num_attention_heads=vision["num_attention_heads"],
        image_size=[tile, tile], patch_size=[patch, patch], use_absolute_position_embeddings=True,
        use_qk_norm=False, attention_bias=True, use_mean_pooling=True, layer_scale_init_value=0.1,
    )
    seq = (tile // patch) ** 2 // 4
    config = transformers.InternVLConfig(
        text_config=_qwen2_text_config(size, tok, eos="<|im_end|>"), vision_config=vision_config,
        image_token_id=ids("<IMG_CONTEXT>"), image_seq_length=seq, downsample_ratio=0.5,
        projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    image_processor = transformers.GotOcr2ImageProcessorPil(
        size={"height": tile, "width": tile}, crop_to_patches=True, min_patches=1, max_patches=12,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    )
    processor = image_only_processor_class(transformers.InternVLProcessor)(
        image_processor=image_processor, tokenizer=tok, image_seq_length=seq, chat_template=tok.chat_template,
    )
    return Built(config, processor, ("<|im_end|>",))
