"""Batch geometry of GRPO / GSPO: which prompts a process gets, and how one generation batch is reused.

Terms (TRL's; ``W`` processes, ``G = num_generations``):

* a **generation batch** holds ``generation_batch_size`` completions over all processes, i.e.
  ``generation_batch_size / G`` prompts with ``G`` completions each;
* it is split into ``steps_per_generation`` **micro-batches** of ``per_device_train_batch_size`` completions per
  process (one micro-batch per `training_step`), and the whole pass is repeated ``num_iterations`` times (mu);
* so a new generation batch is sampled every ``steps_per_generation * num_iterations`` micro-steps.

Data loading (TRL's RepeatSampler): :class:`RepeatSampler` yields every prompt index ``G`` times in a row, and every
generation batch's index list ``steps_per_generation * num_iterations`` times; the data loader takes
``per_device_train_batch_size * steps_per_generation`` indices per process per micro-step, and accelerate gives
process ``p`` the ``p``-th contiguous slice of each generation batch. The trainer uses the batch it receives at the
first micro-step of each cycle (the repeats only keep the Trainer's step counting right; they are cheap because
the collator does no processing). One group's ``G`` copies may land on different processes: rewards and advantages
are computed on the gathered generation batch, so every group's statistics cover all ``G`` completions.

Shared prefix (`GRPOConfig.shared_prefix`): the training passes run each prompt (and its image) once for the
completions of its group that a micro-batch holds (`vlmalign.models.shared_prefix`), so the buffer then shuffles
*groups* (runs of completions of one prompt, ``GenerationBatch.group_ids``), not completions, and cuts the shuffled
order into contiguous micro-batches. With ``per_device_train_batch_size`` a multiple of ``G`` (and so of every
process's share) each micro-batch holds whole groups; otherwise a group may be split between two micro-batches
(each part still shares its prompt pass, it is just run once per part).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Sampler

from .sampling import derive_seed


class RepeatSampler(Sampler[int]):
    """Prompt indices for GRPO: ``[a, b] -> (a x G, b x G) x repeat_count``, per generation batch.

    Args:
        num_rows: rows in the dataset.
        num_generations: G, consecutive copies of each index (one group).
        prompts_per_batch: distinct prompts per generation batch (``generation_batch_size // G``); a last
            incomplete batch of prompts is dropped.
        repeat_count: how many times each generation batch's index list is yielded
            (``steps_per_generation * num_iterations``).
        shuffle / seed: the prompt order is a permutation seeded by ``(seed, epoch)``; every process builds the
            same one (each instance counts its own epochs).
    """

    def __init__(self, num_rows: int, num_generations: int, prompts_per_batch: int = 1, repeat_count: int = 1,
                 shuffle: bool = True, seed: int = 0):
        if prompts_per_batch < 1 or num_generations < 1 or repeat_count < 1:
            raise ValueError("num_generations, prompts_per_batch and repeat_count must be >= 1")
        if num_rows < prompts_per_batch:
            raise ValueError(f"the dataset has {num_rows} prompts, fewer than the {prompts_per_batch} prompts of one "
                             "generation batch")
        self.num_rows, self.num_generations = num_rows, num_generations
        self.prompts_per_batch, self.repeat_count = prompts_per_batch, repeat_count
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.randperm(self.num_rows, generator=generator).tolist()
        else:
            order = list(range(self.num_rows))
        self.epoch += 1
        num_batches = self.num_rows // self.prompts_per_batch
        for b in range(num_batches):
            chunk = order[b * self.prompts_per_batch:(b + 1) * self.prompts_per_batch]
            for _ in range(self.repeat_count):
                for index in chunk:
                    yield from [index] * self.num_generations

    def __len__(self) -> int:
        num_batches = self.num_rows // self.prompts_per_batch
        return num_batches * self.prompts_per_batch * self.num_generations * self.repeat_count


@dataclass
class GenerationBatch:
    """This process's share of one generation batch, everything the loss needs (tensors on the training device).

    ``rows[i]`` is the prompt row of completion ``i``; ``old_logps`` is None when the batch is used on-policy only
    (then the loss uses the current log-probs, detached), ``ref_logps`` is None when ``beta == 0``. ``group_ids``
    (optional) numbers the prompt groups: completions with the same id are consecutive and share their prompt
    and images (what generation found, `vlmalign.rl.rollout.Rollout.group_index`)."""

    rows: list[dict]
    completion_ids: torch.Tensor        # [N, C] right-padded
    completion_mask: torch.Tensor       # [N, C] 1 up to and including the end-of-turn token
    loss_mask: torch.Tensor             # [N, C] completion_mask, zeroed for truncated rows if asked
    advantages: torch.Tensor            # [N]
    num_items_in_batch: float           # loss tokens of the whole generation batch, all processes
    old_logps: torch.Tensor | None = None   # [N, C]
    ref_logps: torch.Tensor | None = None   # [N, C]
    group_ids: torch.Tensor | None = None   # [N] long, non-decreasing: completions of one prompt share an id
    sampling_weights: torch.Tensor | None = None  # [N, C] vLLM importance-sampling correction (TIS), if any
    encoded_prompts: dict | None = None  # the prompts generation encoded, each once [U, P]; group_ids index it
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, index: torch.Tensor | list[int]) -> dict[str, Any]:
        """The rows at `index` as a micro-batch, completions trimmed to the longest one among them."""
        index = torch.as_tensor(index, dtype=torch.long)
        mask = self.completion_mask[index.to(self.completion_mask.device)]
        width = max(int(mask.sum(dim=1).max()) if len(index) else 1, 1)
        on = lambda t: None if t is None else t[index.to(t.device)][:, :width]  # noqa: E731
        return {
            "rows": [self.rows[i] for i in index.tolist()],
            "completion_ids": on(self.completion_ids),
            "completion_mask": mask[:, :width],
            "loss_mask": on(self.loss_mask),
            "advantages": self.advantages[index.to(self.advantages.device)],
            "old_logps": on(self.old_logps),
            "ref_logps": on(self.ref_logps),
            "sampling_weights": on(self.sampling_weights),
            "group_ids": None if self.group_ids is None else self.group_ids[index.to(self.group_ids.device)],
            "num_items_in_batch": self.num_items_in_batch,
            "encoded_prompts": self.encoded_prompts,
        }


def group_runs(group_ids: torch.Tensor) -> list[torch.Tensor]:
    """The positions of each run of equal consecutive ids: [0, 0, 1, 1, 1, 0] -> [[0, 1], [2, 3, 4], [5]]."""
    counts = torch.unique_consecutive(group_ids.cpu(), return_counts=True)[1]
    return list(torch.arange(len(group_ids)).split(counts.tolist()))


def prompt_groups(group_ids: torch.Tensor | None, n: int) -> tuple[list[int], torch.Tensor]:
    """For a micro-batch of `n` completions: the position of the first completion of each run of equal group ids
    (the rows whose prompts to encode, once) and each completion's run number [n] (the `prompt_index` of
    `shared_prefix_logps`). Without group ids every completion is its own group."""
    if group_ids is None:
        return list(range(n)), torch.arange(n)
    runs = group_runs(group_ids)
    index = torch.cat([torch.full((len(r),), k, dtype=torch.long) for k, r in enumerate(runs)]) if runs else \
        torch.zeros(0, dtype=torch.long)
    return [int(r[0]) for r in runs], index


class GenerationBuffer:
    """One generation batch, served as ``steps_per_generation`` micro-batches per iteration.

    Each iteration (pass over the batch) uses its own permutation of the rows, seeded by ``(seed, iteration)``,
    cut into ``steps_per_generation`` equal contiguous chunks: reproducible, and every row is used exactly once
    per iteration. With ``by_group`` (the shared-prefix training passes) the permutation moves whole groups (runs
    of equal ``batch.group_ids``), keeping each group's completions together and in order."""

    def __init__(self, batch: GenerationBatch, steps_per_generation: int, seed: int = 0, shuffle: bool = True,
                 by_group: bool = False):
        if len(batch) % steps_per_generation != 0:
            raise ValueError(f"{len(batch)} completions cannot be split into {steps_per_generation} equal "
                             "micro-batches")
        if by_group and batch.group_ids is None:
            raise ValueError("by_group needs the batch's group_ids")
        self.batch, self.steps_per_generation, self.seed, self.shuffle = batch, steps_per_generation, seed, shuffle
        self.by_group = by_group

    def order(self, iteration: int) -> torch.Tensor:
        n = len(self.batch)
        if not self.shuffle:
            return torch.arange(n)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, iteration))
        if not self.by_group:
            return torch.randperm(n, generator=generator)
        runs = group_runs(self.batch.group_ids)
        return torch.cat([runs[k] for k in torch.randperm(len(runs), generator=generator).tolist()])

    def micro_batch(self, iteration: int, step: int) -> dict[str, Any]:
        if not 0 <= step < self.steps_per_generation:
            raise IndexError(f"micro-batch {step} of {self.steps_per_generation}")
        size = len(self.batch) // self.steps_per_generation
        return self.batch.select(self.order(iteration)[step * size:(step + 1) * size])


# ------------------------------------------------------------------------------------------- checkpointing

_BUFFER_TENSORS = ("completion_ids", "completion_mask", "loss_mask", "advantages", "old_logps", "ref_logps",
                   "group_ids", "sampling_weights")


def row_fingerprint(row: dict) -> str:
    """A short hash of what a buffered completion was sampled from: the row's prompt and its images' pixels."""
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(row.get("prompt"), sort_keys=True, default=str).encode("utf-8", "replace"))
    for image in row.get("images") or []:
        digest.update(f"{image.mode}{image.size}".encode())
        digest.update(image.tobytes())
    return digest.hexdigest()[:16]


def save_buffer(buffer: GenerationBuffer, path: str) -> None:
    """Write a buffered generation batch to a safetensors file (no pickle): its tensors, and its rows as dataset
    indices (`row["_index"]`), so a run resumed inside a generation batch trains on the same completions."""
    from safetensors.torch import save_file

    batch = buffer.batch
    tensors = {k: getattr(batch, k).detach().cpu().clone() for k in _BUFFER_TENSORS if getattr(batch, k) is not None}
    meta = {"row_indices": [int(r["_index"]) for r in batch.rows], "num_items_in_batch": float(batch.num_items_in_batch),
            "steps_per_generation": buffer.steps_per_generation, "seed": buffer.seed, "shuffle": buffer.shuffle,
            "by_group": buffer.by_group, "row_fingerprints": [row_fingerprint(r) for r in batch.rows]}
    import json

    save_file(tensors, path, metadata={"vlmalign": json.dumps(meta)})


def load_buffer(path: str, row_by_index, device) -> GenerationBuffer:
    """Inverse of `save_buffer`; `row_by_index(i)` returns the normalised dataset row `i`."""
    import json

    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["vlmalign"])
        tensors = {k: f.get_tensor(k).to(device) for k in f.keys()}
    rows = [row_by_index(i) for i in meta["row_indices"]]
    for index, row, saved in zip(meta["row_indices"], rows, meta.get("row_fingerprints") or [None] * len(rows)):
        if saved is not None and row_fingerprint(row) != saved:
            raise ValueError(
                f"{path}: the generation batch saved in this checkpoint was sampled from dataset row {index}, whose "
                f"prompt or images are different now (the dataset changed since the checkpoint). Resuming would "
                f"train the saved completions against other prompts: resume with the original dataset, or resume "
                f"from a checkpoint taken at a generation-batch boundary.")
    batch = GenerationBatch(rows=rows,
                            num_items_in_batch=meta["num_items_in_batch"],
                            **{k: tensors.get(k) for k in _BUFFER_TENSORS})
    return GenerationBuffer(batch, meta["steps_per_generation"], seed=meta["seed"], shuffle=meta["shuffle"],
                            by_group=meta["by_group"])
