"""The reference policy of DPO-family and KL-regularised RL trainers, and per-sequence log-probs from a batch.

Three ways to get reference log-probs, chosen by `make_reference_model`:

* an explicit `ref_model` (a module or a path): frozen, eval mode, prepared with accelerate;
* PEFT policy (a `PeftModel`, or `peft_config` given to the trainer): no second model. The reference is the
  policy with its adapters disabled (`reference_forward` enters `model.disable_adapter()`);
* otherwise a frozen deep copy of the policy at the start of training.

`reference_forward(model, ref_model)` yields the module to run for reference log-probs (under `torch.no_grad()`),
whichever case applies; `reference_logps` runs it on a batch. A trainer that precomputes reference log-probs once
before training (DPO's `precompute_ref_log_probs`) keeps no reference model: there `make_reference_model` returns
None for a full (non-PEFT) policy and `reference_forward(model, None)` yields the untrained policy itself.
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .engines.gather import fsdp2_modules, is_zero3_partitioned
from .engines.reference import deepspeed_stage, zero3_inference_engine
from ..losses.logprobs import IGNORE_INDEX
from ..models.forward import strip_engine_wrappers, token_logps
from ..models.packing import packed_sequence_logps, packing_unsupported

logger = logging.getLogger(__name__)

def is_peft_model(model: nn.Module) -> bool:
    model = strip_engine_wrappers(model)
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients for every parameter."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def make_reference_model(
    model: nn.Module,
    args,
    ref_model: nn.Module | str | None = None,
    accelerator=None,
) -> nn.Module | None:
    """The frozen reference model a trainer keeps, or None when it needs none.

    * `ref_model` given (module or path): that model, frozen (dropout disabled when `args.disable_dropout`);
    * PEFT policy: None (the reference is the policy inside `model.disable_adapter()`, see `reference_forward`);
    * `args.precompute_ref_log_probs` (when the config has it): None (log-probs are computed once up front);
    * otherwise a deep copy of the (unwrapped) policy, frozen, on the policy's device.

    With an `accelerator`, the model is placed with `accelerator.prepare_model(..., evaluation_mode=True)` (device
    placement; never DDP, which the reference does not need); under FSDP2 it is sharded like the policy, under
    ZeRO-3 it gets a DeepSpeed inference engine of its own (partitioned, `vlmalign.trainers.engines.reference`)."""
    if ref_model is not None:
        from ..models.loading import load_model

        ref = load_model(ref_model, **(getattr(args, "model_init_kwargs", None) or {}))
        if strip_engine_wrappers(ref) is strip_engine_wrappers(model):
            raise ValueError("ref_model is the policy itself; pass a separate model (or None for a frozen copy)")
    elif is_peft_model(model):
        return None
    elif getattr(args, "precompute_ref_log_probs", False):
        return None
    elif any(is_zero3_partitioned(p) for p in strip_engine_wrappers(model).parameters()):
        # ZeRO-3 loaded the policy partitioned (zero.Init): a copy would hold empty parameters and no hooks.
        # Load the same weights again, partitioned the same way, and give them their own inference engine.
        base = strip_engine_wrappers(model)
        path = getattr(base, "name_or_path", None)
        if not path:
            raise ValueError("ZeRO-3 with a reference model needs the policy loaded from a path (to load the "
                             "reference partitioned too); pass model as a path, or ref_model, or use PEFT")
        from ..models.loading import load_model

        ref = load_model(path, **(getattr(args, "model_init_kwargs", None) or {}))
    else:
        ref = copy.deepcopy(strip_engine_wrappers(model))
    if getattr(args, "disable_dropout", False):
        from .setup import disable_dropout

        disable_dropout(ref)
    freeze(ref)
    if accelerator is not None and deepspeed_stage(accelerator) == 3:
        ref = zero3_inference_engine(ref, accelerator, args)
    elif accelerator is not None and getattr(accelerator, "is_fsdp2", False):
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        ref = fsdp2_prepare_model(accelerator, ref)   # sharded like the policy (accelerate skips eval models)
    elif accelerator is not None:
        ref = accelerator.prepare_model(ref, evaluation_mode=True)
    else:
        device = next(strip_engine_wrappers(model).parameters()).device
        ref = ref.to(device)
    return ref


@contextmanager
def reference_forward(model: nn.Module, ref_model: nn.Module | None) -> Iterator[nn.Module]:
    """Yield the module whose forward gives reference log-probs, with gradients off:

    `ref_model` when there is one; else the PEFT policy inside `disable_adapter()`; else `model` itself (only right
    before any update, e.g. to precompute reference log-probs)."""
    with torch.no_grad():
        if ref_model is not None:
            try:
                yield ref_model
            finally:
                # FSDP2 keeps the root's parameters (and those of units not resharded after forward) gathered
                # until backward, which a reference model never runs: shard them again
                for module in fsdp2_modules(ref_model):
                    module.reshard()
        elif is_peft_model(model):
            peft_model = strip_engine_wrappers(model)
            with peft_model.disable_adapter():
                yield peft_model
        else:
            yield model


def sequence_logps(model: nn.Module, batch: dict, *, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of token log-probs over the labelled tokens (`labels != -100`), and their count.

    `batch` is a collated batch (`input_ids`, `attention_mask`, vision tensors, `labels` aligned with the ids);
    extra keys the model does not take must be removed first. Never builds [B, T, V] logits
    (`vlmalign.models.forward.token_logps`). Returns (logps [B] float, lengths [B] long)."""
    mask = batch["labels"] != IGNORE_INDEX                               # [B, T]
    logps, _, _ = token_logps(model, batch, mask, chunk_size=chunk_size)  # [B, T], 0 where unmasked
    return logps.sum(dim=1), mask.sum(dim=1)


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def shared_sequence_logps(model: nn.Module, shared: dict, *, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logps` on the shared-prefix form of a batch (`PreferenceCollator(shared_prefix=True)`): each prompt
    and its images run once for all the answers that continue it. Same values and gradients as the plain path."""
    from ..models.shared_prefix import shared_prefix_logps

    mask = shared["completion_mask"]
    logps, _ = shared_prefix_logps(model, shared["prompt_inputs"], shared["completion_ids"], mask,
                                   prompt_index=shared["prompt_index"], chunk_size=chunk_size)
    return (logps * mask).sum(dim=1), mask.sum(dim=1)


def batch_sequence_logps(model: nn.Module, batch: dict, *, padding_free: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared-prefix path when the batch carries it; else the packed path with `padding_free` (families that can be
    packed, `models.packing`); else the plain path."""
    if "shared" in batch:
        return shared_sequence_logps(model, batch["shared"])
    plain = {k: v for k, v in batch.items() if k != "shared"}
    if padding_free and packing_unsupported(model) is None:
        return packed_sequence_logps(model, plain)
    return sequence_logps(model, plain)


def reference_logps(model: nn.Module, ref_model: nn.Module | None, batch: dict, *, padding_free: bool = False
                    ) -> torch.Tensor:
    """Per-row summed reference log-probs [B] (no grad), from `ref_model` or the adapter-disabled PEFT policy."""
    with reference_forward(model, ref_model) as ref:
        return batch_sequence_logps(ref, batch, padding_free=padding_free)[0].detach()


# ------------------------------------------------------------------------------------ precomputed reference logps


@torch.no_grad()
def precompute_reference_logps(
    model: nn.Module,
    ref_model: nn.Module | None,
    rows,
    collator,
    *,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    desc: str = "reference log-probs",
) -> dict[int, tuple[float, float]]:
    """Reference log-probs of every preference row, once: `{row["_index"]: (chosen_logps, rejected_logps)}`.

    `rows` is a sequence of normalised preference rows carrying `_index` (a `vlmalign.data.dataset.RowDataset`);
    `collator` is a `PreferenceCollator` (2B rows: chosen then rejected, each with its own images), so image
    datasets work. The model runs in eval mode (restored afterwards)."""
    base = strip_engine_wrappers(ref_model if ref_model is not None else model)
    device = device or next(base.parameters()).device
    was_training = base.training
    base.eval()
    table: dict[int, tuple[float, float]] = {}
    try:
        for start in tqdm(range(0, len(rows), batch_size), desc=desc, disable=len(rows) <= 4 * batch_size):
            chunk = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
            batch = _to_device(collator(chunk), device)
            logps = reference_logps(model, ref_model, batch).float().cpu()
            n = len(chunk)
            for row, c, r in zip(chunk, logps[:n].tolist(), logps[n:].tolist()):
                table[row["_index"]] = (c, r)
    finally:
        base.train(was_training)
    return table


class RowsWithReferenceLogps(torch.utils.data.Dataset):
    """Rows of `rows` with `ref_chosen_logps` / `ref_rejected_logps` added from a precomputed table (keyed by the
    row's `_index`)."""

    def __init__(self, rows, table: dict[int, tuple[float, float]]):
        self.rows, self.table = rows, table

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        chosen, rejected = self.table[row["_index"]]
        return {**row, "ref_chosen_logps": chosen, "ref_rejected_logps": rejected}

    def __getattr__(self, name):  # indices, dataset, kind, ... of the wrapped RowDataset
        if name == "rows":
            raise AttributeError(name)
        return getattr(self.rows, name)


__all__ = [
    "RowsWithReferenceLogps",
    "freeze",
    "is_peft_model",
    "make_reference_model",
    "precompute_reference_logps",
    "reference_forward",
    "reference_logps",
    "sequence_logps",
    "shared_sequence_logps",
    "batch_sequence_logps",
]
