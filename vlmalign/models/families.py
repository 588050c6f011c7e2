"""Per-architecture facts, in one place.

Everything in vlmalign that depends on the model family asks this registry: which token the model replaces with
image features, which vision special tokens must never be sampled, which token-type ids the forward needs, which
modules form the vision tower and the projector (for freezing and for excluding them from LoRA), and how the
family's chat turns look. Nothing else in the code sniffs config keys or module names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]          # config.model_type values that belong to this family
    image_token: str                      # placeholder the model replaces with image features
    vision_special_tokens: tuple[str, ...]  # never sampled: placeholder, start/end, row/col markers, ...
    token_type_key: str | None            # extra ids the forward needs, aligned with the placeholders
    vision_module_patterns: tuple[str, ...]  # regexes on parameter/module names: the vision tower
    projector_module_patterns: tuple[str, ...]  # regexes: the vision->text projector
    eos_token: str                        # end of an assistant turn (generation stops here)
    # Qwen's 3-D rotary positions, computed by the model from the ids (`get_rope_index`). A cached forward must be
    # given them explicitly: left to itself the model continues from a `rope_deltas` stashed by an earlier call.
    mrope: bool = False
    # How a processor batch lays out its vision tensors, for selecting / repeating prompt rows
    # (`vlmalign.models.shared_prefix.select_prompt_rows`): "per_row" (leading dim = batch row, e.g. Idefics3's
    # [B, images, C, H, W]), "per_image" (leading dim = image, rows' images in order, e.g. LLaVA's [images, C, H, W])
    # or "per_patch" (Qwen: `pixel_values` [patches, D] in image order, `image_grid_thw` [images, 3]), or "per_tile"
    # (InternVL: `pixel_values` [tiles, C, H, W], each image's tiles in order, the same tokens per tile).
    vision_batch_layout: str = "per_image"
    # Padding-free packing (`vlmalign.models.packing`, causal attention inside each row). False where the language
    # model's attention is more than causal (Gemma3: bidirectional inside an image; transformers 5.24 builds that
    # overlay wrongly for packed rows in its sliding layers): such models run the padded batch instead.
    packing: bool = True
    packing_refusal: str = "attends beyond causal inside a row"   # why, when `packing` is False
    # (regex, replacement) applied to transformers weight names before they are loaded into vLLM
    # (`vlmalign.rl.vllm_engine`): vLLM 0.32 names the CLIP/SigLIP towers `vision_tower.vision_model.*`.
    vllm_weight_renames: tuple[tuple[str, str], ...] = ()
    # Tested with vLLM (`vlmalign.rl.vllm_engine.vllm_unsupported` refuses the others).
    vllm: bool = False
    # Tokens vLLM's processor for the family looks up in the tokenizer (refused, naming them, when absent).
    vllm_required_tokens: tuple[str, ...] = ()
    # A known difference between vLLM's log-probs and the trainer's, logged when vLLM generates for this family.
    vllm_warning: str = ""
    # The video processor class named in the `video_preprocessor_config.json` that `models.loading.save_processor`
    # writes beside a processor saved without torchvision (None: nothing written).
    video_processor_type: str | None = None

    def is_vision_param(self, name: str) -> bool:
        return any(re.search(p, name) for p in self.vision_module_patterns)

    def is_projector_param(self, name: str) -> bool:
        return any(re.search(p, name) for p in self.projector_module_patterns)

    def image_token_id(self, model_or_config) -> int:
        """The id the model replaces with image features (`config.image_token_id`, which for Gemma3 is NOT
        `processor.image_token_id`: that one is the begin-of-image marker)."""
        config = getattr(model_or_config, "config", model_or_config)
        for key in ("image_token_id", "image_token_index"):
            value = getattr(config, key, None)
            if value is not None:
                return int(value)
        raise ValueError(f"{self.name}: the model config has no image_token_id")

    def suppress_token_ids(self, tokenizer) -> list[int]:
        """Ids of every vision special token known to the tokenizer: they must never be sampled (a sampled
        placeholder makes the next forward fail with "Image features and image tokens do not match")."""
        vocab = tokenizer.get_vocab()
        ids = {vocab[t] for t in self.vision_special_tokens if t in vocab}
        # Idefics3 / SmolVLM row and column markers: <row_1_col_1>, ... <global-img>
        ids |= {i for t, i in vocab.items() if re.fullmatch(r"<row_\d+_col_\d+>|<global-img>", t)}
        return sorted(ids)

    def token_type_ids(self, input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor | None:
        """Token-type ids rebuilt from the ids themselves, so they line up with the placeholders whatever the
        padding side or BOS handling: 1 at image placeholders, 0 elsewhere."""
        if self.token_type_key is None:
            return None
        return (input_ids == image_token_id).long()


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


QWEN_VISION = (r"(^|\.)visual\.(?!merger)",)
QWEN_PROJECTOR = (r"(^|\.)visual\.merger\.",)

register(Family(
    name="qwen2_vl",
    model_types=("qwen2_vl",),
    image_token="<|image_pad|>",
    vision_special_tokens=("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"),
    token_type_key="mm_token_type_ids",
    vision_module_patterns=QWEN_VISION,
    projector_module_patterns=QWEN_PROJECTOR,
    eos_token="<|im_end|>",
    mrope=True,
    vision_batch_layout="per_patch",
    vllm=True,
    video_processor_type="Qwen2VLVideoProcessor",
))
register(replace(FAMILIES["qwen2_vl"], name="qwen2_5_vl", model_types=("qwen2_5_vl",)))
# Idefics3 / SmolVLM: the placeholder, the image block's wrapper and global-image tag, and the row/column
# markers of split images (<row_1_col_1> ... <row_6_col_6>; emitted only with image splitting, which the tiny
# models turn off).
# (The tiny models' tokenizers add them in this order: `vlmalign.models.tiny`.)
IDEFICS_IMAGE_TOKENS = ("<fake_token_around_image>", "<image>", "<global-img>") + tuple(
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)
)

register(Family(
    name="idefics3",
    model_types=("idefics3",),
    image_token="<image>",
    vision_special_tokens=IDEFICS_IMAGE_TOKENS,
    token_type_key=None,
    vision_module_patterns=(r"(^|\.)vision_model\.",),
    projector_module_patterns=(r"(^|\.)connector\.",),
    eos_token="<end_of_utterance>",
    vision_batch_layout="per_row",
    vllm=True,
))
# SmolVLM is Idefics3 with another processor.
register(replace(FAMILIES["idefics3"], name="smolvlm", model_types=("smolvlm",),
                 video_processor_type="SmolVLMVideoProcessor"))
VISION_MODEL_RENAME = ((r"(^|\.)vision_tower\.(?!vision_model\.)", r"\1vision_tower.vision_model."),)
register(Family(
    name="llava_clip",
    model_types=("llava",),
    image_token="<image>",
    vision_special_tokens=("<image>",),
    token_type_key=None,
    vision_module_patterns=(r"(^|\.)vision_tower\.",),
    projector_module_patterns=(r"(^|\.)multi_modal_projector\.",),
    eos_token="</s>",
    vllm_weight_renames=VISION_MODEL_RENAME,
    vllm=True,
))
# LLaVA with a SigLIP tower: the same model class; `get_family` tells them apart by the vision config.
register(replace(FAMILIES["llava_clip"], name="llava_siglip"))
register(Family(
    name="gemma3",
    model_types=("gemma3",),
    image_token="<image_soft_token>",
    vision_special_tokens=("<image_soft_token>", "<start_of_image>", "<end_of_image>"),
    token_type_key="token_type_ids",
    vision_module_patterns=(r"(^|\.)vision_tower\.",),
    projector_module_patterns=(r"(^|\.)multi_modal_projector\.",),
    eos_token="<end_of_turn>",
    packing=False,
    vllm_weight_renames=VISION_MODEL_RENAME,
    vllm=True,
    vllm_required_tokens=("\n", "\n\n"),
    vllm_warning=("Gemma 3 on vLLM's CPU backend attends causally over the image block (transformers: "
                  "bidirectionally), so its log-probs differ from the trainer's (measured per token: mean 0.09, "
                  "max 0.45 with 256 image tokens); keep vllm_importance_sampling_correction=True, or generate "
                  "with transformers (use_vllm=False)"),
))


# Qwen3-VL: the Qwen2-VL layout, with DeepStack mergers (intermediate vision features) beside the final merger.
register(replace(FAMILIES["qwen2_vl"], name="qwen3_vl", model_types=("qwen3_vl",), vllm=False,
                 video_processor_type=None,
                 vision_module_patterns=(r"(^|\.)visual\.(?!merger|deepstack_merger_list)",),
                 projector_module_patterns=(r"(^|\.)visual\.(merger|deepstack_merger_list)\.",)))
# Qwen3-VL-MoE (e.g. 30B-A3B): the same, with mixture-of-experts text layers.
register(replace(FAMILIES["qwen3_vl"], name="qwen3_vl_moe", model_types=("qwen3_vl_moe",)))
# Gemma 4 (E2B-it): soft tokens wrapped in <|image> ... <image|>; causal text attention (the E2B/E4B checkpoints
# set no `use_bidirectional_attention`), per-layer input embeddings in the language model.
register(Family(
    name="gemma4", model_types=("gemma4",), image_token="<|image|>",
    vision_special_tokens=("<|image|>", "<|image>", "<image|>", "<|video|>", "<|audio|>", "<|audio>", "<audio|>"),
    token_type_key="mm_token_type_ids", vision_module_patterns=(r"(^|\.)vision_tower\.",),
    projector_module_patterns=(r"(^|\.)embed_vision\.",), eos_token="<turn|>",
))
# LLaVA-OneVision: anyres grids; the newline feature (`image_newline`) belongs to the projector side.
register(Family(
    name="llava_onevision", model_types=("llava_onevision",), image_token="<image>",
    vision_special_tokens=("<image>", "<video>"), token_type_key=None,
    vision_module_patterns=(r"(^|\.)vision_tower\.",),
    projector_module_patterns=(r"(^|\.)multi_modal_projector\.", r"(^|\.)image_newline$"), eos_token="<|im_end|>",
))
# InternVL (3 / 3.5 -hf): `pixel_values` holds tiles, an image's tiles in order ("per_tile").
register(Family(
    name="internvl", model_types=("internvl",), image_token="<IMG_CONTEXT>",
    vision_special_tokens=("<IMG_CONTEXT>", "<img>", "</img>", "<video>"), token_type_key=None,
    vision_module_patterns=(r"(^|\.)vision_tower\.",), projector_module_patterns=(r"(^|\.)multi_modal_projector\.",),
    eos_token="<|im_end|>", vision_batch_layout="per_tile",
))

# Qwen3.5 (natively multimodal; dense and mixture of experts): the Qwen3-VL layout without DeepStack mergers, hybrid
# text layers (gated-DeltaNet linear attention + full attention). The linear-attention layers' conv and recurrent
# states ride in the cache beside the full-attention keys/values; `vlmalign.models.prefix_cache` shares them across
# a group like the keys/values. Packing is off: transformers' torch kernels of the causal conv1d and of the chunked
# gated delta rule cannot keep packed rows apart (the states would run on from one row into the next), and
# transformers refuses row boundaries (`cu_seq_lens_q`) for them without flash-linear-attention.
register(replace(FAMILIES["qwen2_vl"], name="qwen3_5", model_types=("qwen3_5",), packing=False, vllm=False,
                 video_processor_type=None,
                 packing_refusal="has linear-attention layers whose conv / recurrent states transformers' torch "
                                 "kernels cannot keep apart across packed rows"))
register(replace(FAMILIES["qwen3_5"], name="qwen3_5_moe", model_types=("qwen3_5_moe",)))


def family_names() -> list[str]:
    return list(FAMILIES)


def get_family(name_or_model) -> Family:
    """Look a family up by its registry name, or from a model / config (by `model_type`, and for LLaVA by the
    vision tower's type)."""
    if isinstance(name_or_model, str):
        key = name_or_model.lower().replace("-", "_").replace(".", "_")
        aliases = {"qwen2vl": "qwen2_vl", "qwen2_5vl": "qwen2_5_vl", "qwen25_vl": "qwen2_5_vl", "llava": "llava_clip"}
        key = aliases.get(key, key)
        if key not in FAMILIES:
            raise ValueError(f"unknown model family {name_or_model!r}; known: {', '.join(FAMILIES)}")
        return FAMILIES[key]
    config = getattr(name_or_model, "config", name_or_model)
    model_type = getattr(config, "model_type", None)
    if model_type == "llava":
        vision_type = getattr(getattr(config, "vision_config", None), "model_type", "")
        return FAMILIES["llava_siglip" if "siglip" in vision_type else "llava_clip"]
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise ValueError(
        f"model type {model_type!r} is not a supported vision-language family; supported: {', '.join(FAMILIES)}"
    )
