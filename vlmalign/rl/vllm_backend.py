"""GRPO completions from vLLM: rows -> requests -> completion ids, masks and the sampling log-probs.

The counterpart of `vlmalign.rl.sampling.sample_completions` (same rows, per-completion seeds and sampling
settings; the trainer reads the same fields). Each row is one request: its prompt rendered by the processor's chat
template (vLLM expands the image placeholders itself), its images as multimodal data, `n=1` and the row's own seed,
so a completion does not depend on how many processes or rows generated along with it. vLLM's prefix caching lets
the G requests of a group share their prompt's KV (and its encoder cache the image). Vision special tokens get a
logit bias of -100 (never sampled in practice); completions stop at the family's end-of-turn token, which they
include, as with `generate`.

Log-probs: with temperature 1 and no top-k / top-p / min-p the engine returns raw log-probs, exactly the
distribution the trainer's log-probs describe; otherwise the processed ones (after temperature and filtering: the
distribution actually sampled from), which is what truncated importance sampling needs.

Engines: `VLLMEngine` in-process (colocate) or `VLLMClient` for `vlmalign vllm-serve` (server); both take
`generate(requests, params)` and `load_weights(named tensors)`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..data.collate import Encoder
from .rollout import SamplingConfig, group_consecutive

logger = logging.getLogger(__name__)

SUPPRESS_LOGIT_BIAS = -100.0


@dataclass
class VLLMRollout:
    """What the trainer reads from a rollout (`vlmalign.rl.rollout.Rollout`'s fields), plus `sampling_logps`."""

    completion_ids: torch.Tensor    # [N, C] right-padded with pad_token_id
    completion_mask: torch.Tensor   # [N, C] 1 up to and including the end-of-turn token
    truncated: torch.Tensor         # [N] bool
    texts: list[str]
    group_index: torch.Tensor       # [N] long
    sampling_logps: torch.Tensor    # [N, C] float32: the engine's log-probs of the sampled tokens, 0 on padding


def logprobs_mode(sampling: SamplingConfig) -> str:
    """raw when the trainer's log-probs (log_softmax(logits / T)) describe the sampling distribution exactly (apart
    from the suppressed vision tokens), processed otherwise."""
    plain = (sampling.temperature == 1.0 and not sampling.top_k and (sampling.top_p is None or sampling.top_p >= 1)
             and not sampling.min_p and sampling.repetition_penalty == 1.0)
    return "raw_logprobs" if plain else "processed_logprobs"


def prompt_text(encoder: Encoder, row: dict) -> str:
    """The prompt as the trainer renders it (`Supervisor.render`). vLLM tokenises text prompts with special tokens
    added: where the template renders BOS and the tokenizer adds it too (Idefics3, Gemma 3), the rendered BOS is
    dropped so vLLM sees it once, as the trainer does (never two BOS)."""
    text = encoder.supervisor.render(row["prompt"], True)
    tokenizer = encoder.processor.tokenizer
    bos = tokenizer.bos_token
    adds_bos = bos is not None and tokenizer("", add_special_tokens=True).input_ids[:1] == [tokenizer.bos_token_id]
    return text[len(bos):] if adds_bos and text.startswith(bos) else text


def sampling_params(encoder: Encoder, sampling: SamplingConfig, seed: int) -> dict:
    tokenizer = encoder.processor.tokenizer
    eos_id = tokenizer.convert_tokens_to_ids(encoder.family.eos_token)
    greedy = not sampling.do_sample
    return dict(
        n=1, max_tokens=sampling.max_completion_length, temperature=0.0 if greedy else sampling.temperature,
        top_p=1.0 if greedy or sampling.top_p is None else sampling.top_p, top_k=0 if greedy else sampling.top_k or 0,
        min_p=0.0 if greedy else sampling.min_p or 0.0, repetition_penalty=sampling.repetition_penalty,
        seed=int(seed), logprobs=0, stop_token_ids=[eos_id], ignore_eos=True, detokenize=False,
        logit_bias={int(i): SUPPRESS_LOGIT_BIAS for i in encoder.family.suppress_token_ids(tokenizer)},
    )


class VLLMGeneration:
    """Generates GRPO completions with an engine (`VLLMEngine` or `VLLMClient`) and keeps its weights in step."""

    def __init__(self, engine, encoder: Encoder):
        self.engine, self.encoder = engine, encoder
        self.synced_step: int | None = None
        self._checked_prompt = False

    def sync(self, model: torch.nn.Module, step: int) -> None:
        from .vllm_engine import policy_weights

        self.engine.load_weights(policy_weights(model, self.encoder.family))
        self.synced_step = step

    def generate(self, rows: list[dict], seeds: list[int], sampling: SamplingConfig,
                 device: torch.device | str = "cpu") -> VLLMRollout:
        if len(seeds) != len(rows):
            raise ValueError(f"{len(rows)} rows but {len(seeds)} seeds")
        requests = [{"prompt": prompt_text(self.encoder, r), "images": list(r["images"])} for r in rows]
        results = self.engine.generate(requests, [sampling_params(self.encoder, sampling, s) for s in seeds])
        if not self._checked_prompt:
            self._check_prompt_ids(rows[0], results[0]["prompt_token_ids"])
            self._checked_prompt = True
        tokenizer = self.encoder.processor.tokenizer
        eos_id = tokenizer.convert_tokens_to_ids(self.encoder.family.eos_token)
        width = max([len(r["token_ids"]) for r in results] + [1])
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        logps = torch.zeros((len(rows), width), dtype=torch.float32)
        truncated = torch.zeros(len(rows), dtype=torch.bool)
        for i, result in enumerate(results):
            n = len(result["token_ids"])
            if n:
                ids[i, :n] = torch.tensor(result["token_ids"])
                logps[i, :n] = torch.tensor(result["logprobs"], dtype=torch.float32)
            mask[i, :n] = 1
            truncated[i] = n == 0 or result["token_ids"][-1] != eos_id
        texts = tokenizer.batch_decode(ids * mask + tokenizer.pad_token_id * (1 - mask), skip_special_tokens=True)
        _, group_index = group_consecutive(rows)
        return VLLMRollout(ids.to(device), mask.to(device), truncated.to(device), texts, group_index.to(device),
                           logps.to(device))

    def _check_prompt_ids(self, row: dict, vllm_ids: list[int]) -> None:
        """vLLM must see the prompt the trainer scores: same ids, image tokens expanded the same way."""
        batch = self.encoder.encode_prompts([row])
        ours = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
        if ours != list(vllm_ids):
            first = next((k for k, (a, b) in enumerate(zip(ours, vllm_ids)) if a != b), min(len(ours), len(vllm_ids)))
            raise ValueError(f"vLLM tokenised the prompt of row {row.get('_index')} differently from the trainer "
                             f"({len(vllm_ids)} vs {len(ours)} tokens, first difference at position {first}); "
                             "the log-probs would not describe the same sequence. Use use_vllm=False for this model.")


def max_images_per_row(dataset) -> int:
    """Most images in one row of a `RowDataset` (read from the raw rows; at least 1), for vLLM's per-prompt limit."""
    raw = getattr(dataset, "dataset", None)
    indices = getattr(dataset, "indices", None)
    if raw is None or indices is None:
        return 1
    try:
        columns = getattr(raw, "column_names", None)
        if columns is not None and "images" in columns:   # a datasets.Dataset: list lengths from Arrow, no decoding
            import pyarrow.compute as pc

            lengths = pc.list_value_length(raw.data.column("images")).to_pylist()
            return max([1] + [int(lengths[i] or 0) for i in indices])
        count = 1
        for i in indices:
            row = raw[i]
            images = row.get("images") if isinstance(row, dict) else None
            count = max(count, len(images) if isinstance(images, (list, tuple)) else 1)
        return count
    except Exception:  # an unusual dataset: the engine's limit errors clearly if a row has more
        return 1


def build_vllm_generation(model, encoder: Encoder, args, accelerator, sampling: SamplingConfig,
                          max_images: int = 1) -> VLLMGeneration:
    """The engine `GRPOConfig.vllm_mode` asks for, checked at start: vLLM installed, the model supported, the server
    up and serving the same model type."""
    import atexit
    import os
    import shutil
    import tempfile

    from ..models.forward import unwrap_model
    from .vllm_engine import (EngineSettings, VLLMEngine, require_vllm, vllm_unsupported, write_engine_folder)

    require_vllm()
    base = unwrap_model(model)
    config = (base.get_base_model() if hasattr(base, "get_base_model") else base).config
    family = encoder.family
    if args.vllm_mode == "server":
        from .vllm_server import VLLMClient

        client = VLLMClient(args.vllm_server_url, timeout=args.vllm_server_timeout)
        info = client.wait_until_up()
        if info.get("model_type") != config.model_type:
            raise ValueError(f"the vLLM server at {args.vllm_server_url} serves a {info.get('model_type')!r} model, "
                             f"the policy is {config.model_type!r}: start it with `vlmalign vllm-serve --model` "
                             "the policy's starting checkpoint")
        wanted = logprobs_mode(sampling)
        if info.get("logprobs_mode") != wanted:
            logger.warning("the vLLM server returns %s, these sampling settings call for %s (start it with "
                           "`--logprobs-mode %s`)", info.get("logprobs_mode"), wanted, wanted)
        return VLLMGeneration(client, encoder)
    if getattr(accelerator, "num_processes", 1) > 1:
        # vLLM would join the trainer's torch.distributed world (TRL drives it with vLLM's external launcher and
        # tensor-parallel subgroups); not implemented here.
        raise ValueError(f"vllm_mode='colocate' runs one engine in a single training process; with "
                         f"{accelerator.num_processes} processes use vllm_mode='server' (start `vlmalign vllm-serve "
                         "--model ...` once, every process sends its prompts to it)")
    reason = vllm_unsupported(config, encoder.processor.tokenizer)
    if reason:
        raise ValueError(f"use_vllm=True: {reason}")
    if family.vllm_warning:
        logger.warning(family.vllm_warning)
    # One engine inside each training process, run in-process so weights can be handed over as tensors.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    folder = tempfile.mkdtemp(prefix="vlmalign-vllm-engine-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    write_engine_folder(model, encoder.processor, folder, family)
    dtype = str(next(base.parameters()).dtype).replace("torch.", "")
    max_len = args.vllm_max_model_length or (args.max_length + args.max_completion_length if args.max_length
                                             else None)
    settings = EngineSettings(dtype=dtype, max_model_len=max_len, max_images=max_images,
                              seed=args.seed + accelerator.process_index, logprobs_mode=logprobs_mode(sampling),
                              gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                              tensor_parallel_size=args.vllm_tensor_parallel_size, model_impl=args.vllm_model_impl,
                              extra=args.vllm_engine_kwargs)
    engine = VLLMEngine(folder, family, settings)
    os.remove(os.path.join(folder, "model.safetensors"))    # loaded; later updates come from memory
    return VLLMGeneration(engine, encoder)
