"""Sampled completions -> forward batches, per-token log-probs, metrics and a JSONL log (shared by RL trainers).

A forward batch is rebuilt from the prompt *rows* (the processor runs on their prompts and images, left-padded)
plus the completion ids: vision tensors never have to be sliced or re-concatenated per sample, which is
family-specific (Qwen's flat patch list + grid, LLaVA's [B, C, H, W], Idefics' [B, N, C, H, W], ...).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch

from ..data.collate import Encoder, append_completions
from ..models.forward import token_logps


def forward_batch(encoder: Encoder, rows: list[dict], completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                  device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Left-padded prompts of `rows` (with their images) + right-padded completions [B, C] -> one batch [B, P + C]
    whose last C positions are the completions."""
    prompts = encoder.encode([r["prompt"] for r in rows], [r["images"] for r in rows], padding_side="left",
                             add_generation_prompt=True, with_labels=False)
    device = device if device is not None else completion_ids.device
    prompts = {k: v.to(device) for k, v in prompts.items()}
    return append_completions(prompts, completion_ids.to(device), completion_mask.to(device), encoder)


@torch.no_grad()
def completion_logps(model: torch.nn.Module, encoder: Encoder, rows: list[dict], completion_ids: torch.Tensor,
                     completion_mask: torch.Tensor, *, batch_size: int, temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probs [N, C] of the completions under `model` (no grad), `batch_size` rows per forward;
    0 on padding."""
    out = torch.zeros(completion_ids.shape, dtype=torch.float32, device=completion_ids.device)
    width = completion_ids.shape[1]
    for start in range(0, len(rows), batch_size):
        ids, mask = completion_ids[start:start + batch_size], completion_mask[start:start + batch_size]
        batch = forward_batch(encoder, rows[start:start + batch_size], ids, mask)
        logps, _, _ = token_logps(model, batch, mask, keep_last=width, temperature=temperature)
        out[start:start + batch_size] = logps.float()
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
