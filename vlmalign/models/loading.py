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
from types import SimpleNamespace

import torch
import transformers
from transformers import AutoModelForImageTextToText, AutoProcessor, ProcessorMixin

from .families import Family

logger = logging.getLogger(__name__)


@lru_cache(maxsize=None)
def image_only_processor_class(cls: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """`cls` with its video slot removed, for processors whose video processor needs torchvision.

    transformers reads a processor's ``__init__`` three ways: its sub-processors (``get_attributes``) and the
    settings ``to_dict`` saves from ``inspect.signature(cls.__init__)``, and the saved settings ``from_args_and_dict``
    passes back on loading from the ``__init__`` code's positional argument names, handed to
    ``cls.validate_init_kwargs``. The subclass's ``__init__`` takes ``*args, **kwargs`` and carries the parent's
    signature minus ``video_processor`` as ``__signature__`` (so ``get_attributes`` and ``to_dict`` see it), binds
    its arguments to that signature and calls the parent by keyword with ``video_processor=None``; its
    ``validate_init_kwargs`` accepts that signature's names, so settings such as SmolVLM's ``image_seq_len`` are
    reloaded. ``video_processor`` then reads as a stub whose settings are ``None`` (SmolVLM's
    ``apply_chat_template`` reads ``video_processor.num_frames`` / ``.fps`` unconditionally). The subclass keeps the
    parent's name, so a saved ``processor_config.json`` names the real class.
    """
    parent = inspect.signature(cls.__init__)
    if "video_processor" not in parent.parameters:
        return cls
    signature = parent.replace(parameters=[p for n, p in parent.parameters.items() if n != "video_processor"])
    settings = tuple(n for n, p in list(signature.parameters.items())[1:]
                     if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))

    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        named = {n: v for n, v in bound.arguments.items() if n != "self"}
        extra = {}
        for n, p in signature.parameters.items():
            if p.kind is p.VAR_KEYWORD:
                extra = named.pop(n, {})
            elif p.kind is p.VAR_POSITIONAL:
                raise TypeError(f"{cls.__name__}: a processor taking *{n} is not supported without its video slot")
        cls.__init__(self, **named, **extra, video_processor=None)

    __init__.__signature__ = signature
    __init__.__qualname__ = f"{cls.__name__}.__init__"

    def validate_init_kwargs(processor_config, valid_kwargs):
        # `valid_kwargs` comes from `__init__.__code__`, whose only named argument is `self`: use the signature's.
        return ProcessorMixin.validate_init_kwargs(processor_config, settings)

    attrs = {
        "__init__": __init__, "__module__": cls.__module__, "__doc__": cls.__doc__,
        "validate_init_kwargs": staticmethod(validate_init_kwargs),
        # A class attribute: read when the instance has none; never saved (`to_dict` reads the instance's dict).
        "video_processor": SimpleNamespace(num_frames=None, fps=None),
    }
    # Processors that hand `video_processor=...` to ProcessorMixin by keyword (Gemma 4) would be refused there (the
    # subclass's signature has no such slot): `_NoVideoSlot` sits between them and ProcessorMixin and drops it.
    return type(cls.__name__, (cls, _NoVideoSlot), attrs)


class _NoVideoSlot(ProcessorMixin):
    def __init__(self, *args, **kwargs):
        if "video_processor" in kwargs and kwargs["video_processor"] is None:
            del kwargs["video_processor"]
        super().__init__(*args, **kwargs)


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
    check_model_folder(model)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    return AutoModelForImageTextToText.from_pretrained(
        model, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code, use_safetensors=True, **kwargs
    )


def check_model_folder(path: str | os.PathLike) -> None:
    """Refuse, with the reason, local folders that are not a loadable model: a PEFT adapter folder, a folder with
    pickle weights only (refused on purpose: unpickling can run code), or one without config.json."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return  # a hub id, or a path that from_pretrained reports itself
    names = {p.name for p in folder.iterdir()}
    if "adapter_config.json" in names and "config.json" not in names:
        try:
            base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except (OSError, ValueError):
            base = None
        raise ValueError(
            f"{folder} is a PEFT adapter folder (adapter_config.json, no config.json), not a model: give the base "
            f"model ({base or 'see base_model_name_or_path in adapter_config.json'}) as the model, and either merge "
            f"the adapter into it first or load it with peft.PeftModel.from_pretrained(base, {str(folder)!r}, "
            f"is_trainable=True) and pass that model")
    if "config.json" not in names:
        raise ValueError(f"{folder} is not a model folder: it has no config.json")
    safetensors = [n for n in names if n.endswith(".safetensors") or n == "model.safetensors.index.json"]
    pickles = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt")) and "training_args" not in n)
    if not safetensors and pickles:
        raise ValueError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}). vlmalign loads safetensors only, on purpose: "
            f"loading a pickle can run arbitrary code. If you trust the file, convert it once: "
            f"AutoModelForImageTextToText.from_pretrained(folder, use_safetensors=False).save_pretrained(new_folder)")


def save_processor(processor: ProcessorMixin, out_dir: str | os.PathLike, family: Family | None = None) -> None:
    """`processor.save_pretrained`, plus the video-processor config that the processors of some families
    (`Family.video_processor_type`: Qwen2-VL, Qwen2.5-VL, SmolVLM) need for plain `AutoProcessor.from_pretrained`
    where torchvision is installed. Without torchvision the video processor cannot be instantiated, so its config is
    written from the image processor's."""
    out = Path(out_dir)
    processor.save_pretrained(out)
    video_type = family.video_processor_type if family is not None else None
    if video_type is None or "video_processor" in vars(processor):  # a real video processor saved its own config
        return
    keys = ("patch_size", "merge_size", "temporal_patch_size", "size", "image_mean", "image_std", "do_resize",
            "do_rescale", "rescale_factor", "do_normalize", "do_convert_rgb", "max_image_size")
    image_config = processor.image_processor.to_dict()
    config = {k: image_config[k] for k in keys if k in image_config}
    config["video_processor_type"] = video_type
    config["processor_class"] = type(processor).__name__
    (out / "video_preprocessor_config.json").write_text(json.dumps(config, indent=2))
