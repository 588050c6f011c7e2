"""Loading models and processors: the one processor loader every part of vlmalign uses.

Why a loader of our own: in transformers 5.x the Qwen2-VL, Qwen2.5-VL and SmolVLM processors declare a video
processor that needs torchvision; without it they can neither be constructed (``AttributeError ...
VIDEO_PROCESSOR_MAPPING ... _extra_content``, even with ``video_processor=None``) nor loaded through
``AutoProcessor`` (``ImportError: ... requires the Torchvision library``), transformers#48558. vlmalign trains on
images only, so `load_processor` falls back to the same processor class with the video slot removed. The
directory on disk stays a normal Hugging Face directory: where torchvision is installed, plain
``AutoProcessor.from_pretrained`` loads it too.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from functools import lru_cache
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForImageTextToText, AutoProcessor, ProcessorMixin

logger = logging.getLogger(__name__)


def torchvision_available() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # a CUDA build next to the CPU torch fails with errors other than ImportError
        return False
    return True


@lru_cache(maxsize=None)
def image_only_processor_class(cls: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """`cls` with its video slot removed, for processors whose video processor needs torchvision.

    transformers derives a processor's sub-processors from its ``__init__`` signature; the subclass's signature
    lists only the image processor and the tokenizer, and calls the parent with ``video_processor=None``. The
    subclass keeps the parent's name, so a saved ``processor_config.json`` names the real class.
    """
    params = inspect.signature(cls.__init__).parameters
    if "video_processor" not in params:
        return cls

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        cls.__init__(self, image_processor, tokenizer, video_processor=None, chat_template=chat_template, **kwargs)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__, "__doc__": cls.__doc__})


def _processor_class_name(path: Path) -> str | None:
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        file = path / name
        if file.is_file():
            data = json.loads(file.read_text())
            if data.get("processor_class"):
                return data["processor_class"]
    return None


def load_processor(name_or_path: str | os.PathLike, **kwargs) -> ProcessorMixin:
    """Load the processor of a saved model directory (or hub id), with or without torchvision."""
    try:
        return AutoProcessor.from_pretrained(name_or_path, **kwargs)
    except (ImportError, AttributeError, ValueError, TypeError, OSError) as err:
        path = Path(name_or_path)
        class_name = _processor_class_name(path) if path.is_dir() else None
        if class_name is None or not hasattr(transformers, class_name):
            raise
        cls = image_only_processor_class(getattr(transformers, class_name))
        logger.info("loading %s without its video processor (%s)", class_name, type(err).__name__)
        return cls.from_pretrained(name_or_path, **kwargs)


def load_model(
    model: str | os.PathLike | torch.nn.Module,
    *,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    **kwargs,
) -> torch.nn.Module:
    """A loaded model is returned unchanged; a path or hub id loads with `AutoModelForImageTextToText`
    (safetensors only; remote code only when asked)."""
    if isinstance(model, torch.nn.Module):
        return model
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    return AutoModelForImageTextToText.from_pretrained(
        model, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code, use_safetensors=True, **kwargs
    )


def save_processor(processor: ProcessorMixin, out_dir: str | os.PathLike) -> None:
    """`processor.save_pretrained`, plus the video-processor config that processors declaring one (Qwen2-VL,
    Qwen2.5-VL, SmolVLM) need for plain `AutoProcessor.from_pretrained` where torchvision is installed. Without
    torchvision the video processor cannot be instantiated, so its config is written from the image processor's."""
    out = Path(out_dir)
    processor.save_pretrained(out)
    names = {"Qwen2VLProcessor": "Qwen2VLVideoProcessor", "Qwen2_5_VLProcessor": "Qwen2VLVideoProcessor",
             "SmolVLMProcessor": "SmolVLMVideoProcessor"}
    video_type = names.get(type(processor).__name__)
    if video_type is None or getattr(processor, "video_processor", None) is not None:
        return
    keys = ("patch_size", "merge_size", "temporal_patch_size", "size", "image_mean", "image_std", "do_resize",
            "do_rescale", "rescale_factor", "do_normalize", "do_convert_rgb", "max_image_size")
    image_config = processor.image_processor.to_dict()
    config = {k: image_config[k] for k in keys if k in image_config}
    config["video_processor_type"] = video_type
    config["processor_class"] = type(processor).__name__
    (out / "video_preprocessor_config.json").write_text(json.dumps(config, indent=2))
