"""Sampled completions -> forward batches, per-token log-probs, metrics and a JSONL log (shared by RL trainers).

A forward batch is rebuilt from the prompt *rows* (the processor runs on their prompts and images, left-padded)
plus the completion ids: vision tensors never have to be sliced or re-concatenated per sample, which is
family-specific (Qwen's flat patch list + grid, LLaVA's [B, C, H, W], Idefics' [B, N, C, H, W], ...).

Two paths for the log-probs of completions:

* shared prefix (`group_ids` given): the processor runs on each group's prompt once and
  `vlmalign.models.shared_prefix.shared_prefix_logps` runs it (and its image) once for the group's completions;
* plain: the prompt row of every completion is encoded and run (`forward_batch` + `token_logps`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..data.collate import Encoder, append_completions
from ..models.forward import token_logps
from ..models.shared_prefix import plain_batch, select_prompt_rows, shared_prefix_logps
from .buffer import prompt_groups


def forward_batch(encoder: Encoder, rows: list[dict], completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                  device: torch.device | str | None = None, encoded: tuple[dict, torch.Tensor] | None = None
                  ) -> dict[str, torch.Tensor]:
    """Left-padded prompts of `rows` (with their images) + right-padded completions [B, C] -> one batch [B, P + C]
    whose last C positions are the completions (prompts from `encoded` when given: `prompt_batch`)."""
    device = device if device is not None else completion_ids.device
    prompts = prompt_batch(encoder, rows, list(range(len(rows))), device, encoded)
    return append_completions(prompts, completion_ids.to(device), completion_mask.to(device), encoder)


def prompt_batch(encoder: Encoder, rows: list[dict], positions: list[int], device: torch.device | str | None,
                 encoded: tuple[dict, torch.Tensor] | None = None) -> dict:
    """The generation prompts of `rows[positions]`, one row each. With `encoded` = (the prompts generation encoded,
    each distinct prompt once [U, P]; each row's index there [len(rows)]) they are selected from it (a tensor
    gather, no processor run) and their left padding cut to the longest selected prompt: the same tensors as
    `Encoder.encode_prompts` on those rows. Otherwise the processor runs."""
    if encoded is None:
        return encoder.encode_prompts([rows[i] for i in positions], device)
    unique, index = encoded
    picked = index.to(unique["input_ids"].device)[torch.as_tensor(positions, dtype=torch.long)]
    batch = select_prompt_rows(unique, picked, encoder.family, encoder.image_token_id)
    real = batch["attention_mask"].bool().any(dim=0)
    start = int(real.nonzero()[0]) if real.any() else 0
    shape = tuple(batch["input_ids"].shape)
    batch = {k: v[:, start:] if torch.is_tensor(v) and tuple(v.shape[:2]) == shape else v for k, v in batch.items()}
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()} if device is not None else batch


class MicroBatch(dict):
    """A training micro-batch (a dict). On the shared-prefix path it holds `prompt_inputs` (each group's prompt
    once) and `prompt_index`; the plain forward batch `inputs` [N, P + C] is then only built if someone reads it
    (a gather of the encoded prompts, no processor run)."""

    def __init__(self, *args, build_inputs: Callable[[], dict] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._build_inputs = build_inputs

    def __missing__(self, key):
        if key == "inputs" and self._build_inputs is not None:
            self["inputs"] = value = self._build_inputs()
            return value
        raise KeyError(key)


def micro_batch_inputs(encoder: Encoder, micro: dict, device: torch.device | str, *, shared_prefix: bool
                       ) -> MicroBatch:
    """Add the model inputs to a buffer micro-batch (`GenerationBatch.select`): with `shared_prefix` (and group ids)
    `prompt_inputs` + `prompt_index`, otherwise `inputs` (the plain forward batch)."""
    micro = MicroBatch(micro)
    ids, mask = micro["completion_ids"].to(device), micro["completion_mask"].to(device)
    groups = micro.get("group_ids")
    encoded = None if micro.get("encoded_prompts") is None or groups is None else (micro["encoded_prompts"], groups)
    if not shared_prefix or groups is None:
        micro["inputs"] = forward_batch(encoder, micro["rows"], ids, mask, device, encoded)
        return micro
    firsts, index = prompt_groups(groups, len(micro["rows"]))
    prompts = prompt_batch(encoder, micro["rows"], firsts, device, encoded)
    index = index.to(device)
    micro["prompt_inputs"], micro["prompt_index"] = prompts, index
    micro._build_inputs = lambda: plain_batch(prompts, ids, mask, index, encoder.family,  # noqa: E731
                                              encoder.image_token_id)
    return micro


def micro_batch_logps(model: torch.nn.Module, micro: dict, *, temperature: float = 1.0, with_entropy: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs [N, C] (and entropies) of a micro-batch's completions, on the path its inputs were
    built for (`micro_batch_inputs`)."""
    ids, mask = micro["completion_ids"], micro["completion_mask"]
    if "prompt_inputs" in micro:
        device = micro["prompt_index"].device
        return shared_prefix_logps(model, micro["prompt_inputs"], ids.to(device), mask.to(device),
                                   prompt_index=micro["prompt_index"], temperature=temperature,
                                   with_entropy=with_entropy)
    logps, entropy, _ = token_logps(model, micro["inputs"], mask, keep_last=mask.shape[1], temperature=temperature,
                                    with_entropy=with_entropy)
    return logps, entropy


@torch.no_grad()
def completion_logps(model: torch.nn.Module, encoder: Encoder, rows: list[dict], completion_ids: torch.Tensor,
                     completion_mask: torch.Tensor, *, batch_size: int, temperature: float = 1.0,
                     group_ids: torch.Tensor | None = None, encoded: tuple[dict, torch.Tensor] | None = None
                     ) -> torch.Tensor:
    """Per-token log-probs [N, C] of the completions under `model` (no grad), `batch_size` rows per forward;
    0 on padding. With `group_ids` [N] (consecutive completions sharing an id share their prompt) each chunk's
    prompts run once per group (shared-prefix path). `encoded` (`prompt_batch`): the prompts generation encoded,
    reused instead of running the processor again."""
    out = torch.zeros(completion_ids.shape, dtype=torch.float32, device=completion_ids.device)
    width = completion_ids.shape[1]
    for start in range(0, len(rows), batch_size):
        end = start + batch_size
        ids, mask = completion_ids[start:end], completion_mask[start:end]
        chunk = None if encoded is None else (encoded[0], encoded[1][start:end])
        if group_ids is not None:
            firsts, index = prompt_groups(group_ids[start:end], len(ids))
            prompts = prompt_batch(encoder, rows[start:end], firsts, ids.device, chunk)
            logps, _ = shared_prefix_logps(model, prompts, ids, mask, prompt_index=index.to(ids.device),
                                           temperature=temperature)
        else:
            batch = forward_batch(encoder, rows[start:end], ids, mask, encoded=chunk)
            logps, _, _ = token_logps(model, batch, mask, keep_last=width, temperature=temperature)
        out[start:end] = logps.float()
    return out


def completion_metrics(lengths: torch.Tensor, truncated: torch.Tensor) -> dict[str, float]:
    """TRL's completion statistics over a (gathered) generation batch: lengths count the end-of-turn token."""
    lengths = lengths.float()
    terminated = lengths[~truncated.bool()]
    metrics = {
        "completions/mean_length": lengths.mean().item(),
        "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": truncated.float().mean().item(),
    }
    if terminated.numel():
        metrics["completions/mean_terminated_length"] = terminated.mean().item()
    return metrics


def prompt_text(prompt: list[dict]) -> str:
    """A readable one-line rendering of a conversational prompt (`<image>` for each image block)."""
    parts = []
    for message in prompt:
        content = message["content"]
        if isinstance(content, str):
            text = content
        else:
            text = "".join("<image>" if b.get("type") == "image" else (b.get("text") or "") for b in content)
        parts.append(f"{message['role']}: {text}")
    return " | ".join(parts)


def write_completions_log(path: str | Path, step: int, rows: Sequence[dict], completions: Sequence[str],
                          rewards: torch.Tensor, reward_names: Sequence[str], total: torch.Tensor,
                          advantages: torch.Tensor) -> None:
    """Append one JSON line per completion: step, prompt text, image reference (dataset row index and image
    count), completion, each reward, the total and the advantage (NaN rewards written as null)."""
    clean = lambda x: None if x is None or (isinstance(x, float) and math.isnan(x)) else x  # noqa: E731
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for i, (row, text) in enumerate(zip(rows, completions)):
            record = {
                "step": int(step),
                "prompt": prompt_text(row["prompt"]),
                "image": {"row": row.get("_index"), "num_images": len(row.get("images") or [])},
                "completion": text,
                "rewards": {name: clean(rewards[i, j].item()) for j, name in enumerate(reward_names)},
                "reward": clean(total[i].item()),
                "advantage": advantages[i].item(),
            }
            f.write(json.dumps(record) + "\n")
