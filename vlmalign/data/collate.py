"""Rows -> model inputs, through the processor's chat template.

One path for every trainer: conversations (typed content, images in order) are rendered by the processor's chat
template and tokenised with their images, which gives `input_ids`, `attention_mask`, every vision tensor the family
needs, and the assistant-token mask (`{% generation %}` spans). On top of that:

* `labels`: assistant (or completion) tokens only; image placeholders and other vision tokens never count;
* token-type ids rebuilt from the ids (Qwen's `mm_token_type_ids`, Gemma3's `token_type_ids`), so they line up with
  the placeholders whatever the processor's padding side or BOS handling;
* lengths measured with the images expanded: a row longer than `max_length` is dropped or rejected as a whole
  (see `LengthFilter`), never cut inside an image's tokens.

Rows reaching this module are already normalised by `vlmalign.data.formats` (messages with typed blocks + `images`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..models.families import Family
from .formats import PROMPT_ASSISTANT_TURNS

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def _with_inline_images(conversation: list[dict], images: list) -> list[dict]:
    """Copy a conversation, putting each image into its `{"type": "image"}` block (in order), as the processor's
    `apply_chat_template(tokenize=True)` expects."""
    images = iter(images)
    out = []
    for message in conversation:
        content = message["content"]
        if isinstance(content, str):
            out.append({"role": message["role"], "content": [{"type": "text", "text": content}]})
            continue
        blocks = []
        for block in content:
            if block.get("type") == "image":
                blocks.append({"type": "image", "image": next(images)})
            else:
                blocks.append({"type": "text", "text": block.get("text") or ""})
        out.append({"role": message["role"], "content": blocks})
    return out


@dataclass
class Encoder:
    """Runs the processor on conversations and finishes the batch (labels, token types) for one family."""

    processor: object
    family: Family
    image_token_id: int

    def __post_init__(self):
        self.vision_token_ids = torch.tensor(self.family.suppress_token_ids(self.processor.tokenizer))

    def encode(
        self,
        conversations: list[list[dict]],
        images: list[list],
        *,
        padding_side: str = "right",
        add_generation_prompt: bool = False,
        with_labels: bool = True,
        skip_assistant_turns: list[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Tokenise a batch of conversations with their images.

        `skip_assistant_turns[i]` leading assistant turns of row i get no labels (a preference prompt's own
        assistant turns: only the completion counts)."""
        convs = [_with_inline_images(c, im) for c, im in zip(conversations, images)]
        out = self.processor.apply_chat_template(
            convs,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            add_generation_prompt=add_generation_prompt,
            return_assistant_tokens_mask=with_labels,
            processor_kwargs=dict(padding=True, padding_side=padding_side),
        )
        batch = dict(out)
        assistant = batch.pop("assistant_masks", None)
        self.fix_token_types(batch)
        if with_labels:
            mask = torch.as_tensor(assistant).bool() & batch["attention_mask"].bool()
            if skip_assistant_turns:
                for i, k in enumerate(skip_assistant_turns):
                    mask[i] = _drop_leading_runs(mask[i], k)
            mask &= ~torch.isin(batch["input_ids"], self.vision_token_ids)
            batch["labels"] = torch.where(mask, batch["input_ids"], IGNORE_INDEX)
        return batch

    def fix_token_types(self, batch: dict) -> None:
        """Rebuild the family's token-type ids from the ids themselves (1 at image placeholders)."""
        key = self.family.token_type_key
        if key is not None:
            batch[key] = self.family.token_type_ids(batch["input_ids"], self.image_token_id)
        elif "token_type_ids" in batch:  # e.g. a text tokenizer's all-zero segment ids: the model does not take them
            batch.pop("token_type_ids")

    def lengths(self, conversations: list[list[dict]], images: list[list], **kwargs) -> list[int]:
        """Token length of each conversation with its images expanded."""
        batch = self.encode(conversations, images, with_labels=False, **kwargs)
        return batch["attention_mask"].sum(dim=1).tolist()


def _drop_leading_runs(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Zero the first `k` contiguous runs of True in a 1-D mask."""
    if k <= 0:
        return mask
    mask = mask.clone()
    idx = torch.nonzero(mask).flatten().tolist()
    runs, prev = 0, None
    for i in idx:
        if prev is None or i != prev + 1:
            runs += 1
        if runs > k:
            break
        mask[i] = False
        prev = i
    return mask


# ------------------------------------------------------------------------------------------------- collators


@dataclass
class SFTCollator:
    """Normalised SFT rows (`messages` + `images`) -> a training batch with assistant-only labels."""

    encoder: Encoder

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        # prompt/completion rows: the prompt's own assistant turns are context, not targets
        skip = [r.get(PROMPT_ASSISTANT_TURNS, 0) for r in rows]
        return self.encoder.encode([r["messages"] for r in rows], [r["images"] for r in rows],
                                   skip_assistant_turns=skip if any(skip) else None)


@dataclass
class PreferenceCollator:
    """Normalised preference rows -> one batch of 2B rows: [prompt+chosen_1..B, prompt+rejected_1..B].

    Each row's images go with that row into the processor for both its chosen and its rejected sequence, so a
    pixel tensor can never be paired with another row's answer. Labels cover the answer turns only."""

    encoder: Encoder

    shared_prefix: bool = False

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        convs = [r["prompt"] + r["chosen"] for r in rows] + [r["prompt"] + r["rejected"] for r in rows]
        images = [r["images"] for r in rows] * 2
        skip = [sum(m["role"] == "assistant" for m in r["prompt"]) for r in rows] * 2
        batch = self.encoder.encode(convs, images, skip_assistant_turns=skip)
        if self.shared_prefix:
            prompts = self.encoder.encode([r["prompt"] for r in rows], [r["images"] for r in rows],
                                          padding_side="left", add_generation_prompt=True, with_labels=False)
            shared = split_completions(batch, prompts)
            if shared is not None:
                batch["shared"] = shared
        return batch


def split_completions(full: dict[str, torch.Tensor], prompts: dict[str, torch.Tensor]) -> dict | None:
    """The shared-prefix form of a preference batch: the B unique prompts (left-padded, with their vision tensors)
    and the 2B answers as completions [2B, C] (right-padded) with their label mask, `prompt_index` [2B] telling
    which prompt each answer continues. None when a rendered conversation does not start with its rendered prompt
    (a chat template that changes earlier turns): then only the plain batch is used."""
    ids, labels, attention = full["input_ids"], full["labels"], full["attention_mask"]
    rows = prompts["input_ids"].shape[0]
    prompt_lengths = prompts["attention_mask"].sum(dim=1)
    pieces, masks = [], []
    for i in range(ids.shape[0]):
        k = i % rows
        prompt = prompts["input_ids"][k][prompts["attention_mask"][k].bool()]
        row, row_labels = ids[i][attention[i].bool()], labels[i][attention[i].bool()]  # right-padded: a prefix
        n = int(prompt_lengths[k])
        if len(row) <= n or not torch.equal(row[:n], prompt) or (row_labels[:n] != IGNORE_INDEX).any():
            return None
        pieces.append(row[n:])
        masks.append(row_labels[n:] != IGNORE_INDEX)
    width = max(len(p) for p in pieces)
    pad = 0
    completion_ids = torch.stack([torch.cat([p, p.new_full((width - len(p),), pad)]) for p in pieces])
    completion_mask = torch.stack([torch.cat([m, m.new_zeros(width - len(m))]) for m in masks]).long()
    prompt_index = torch.arange(ids.shape[0]) % rows
    return {"prompt_inputs": prompts, "completion_ids": completion_ids, "completion_mask": completion_mask,
            "prompt_index": prompt_index}


@dataclass
class PromptCollator:
    """Normalised prompt rows -> left-padded generation inputs, plus the rows themselves (for the rewards)."""

    encoder: Encoder

    def __call__(self, rows: list[dict]) -> dict:
        batch = self.encoder.encode(
            [r["prompt"] for r in rows], [r["images"] for r in rows],
            padding_side="left", add_generation_prompt=True, with_labels=False,
        )
        return {"inputs": batch, "rows": rows}


def append_completions(
    prompt_batch: dict[str, torch.Tensor], completion_ids: torch.Tensor, completion_mask: torch.Tensor,
    encoder: Encoder,
) -> dict[str, torch.Tensor]:
    """Left-padded prompts [B, P] + right-padded completions [B, C] -> one forward batch [B, P + C].

    The vision tensors are the prompts'; token-type ids are rebuilt over the whole row (completions carry none)."""
    batch = dict(prompt_batch)
    batch["input_ids"] = torch.cat([prompt_batch["input_ids"], completion_ids], dim=1)
    batch["attention_mask"] = torch.cat([prompt_batch["attention_mask"], completion_mask.to(prompt_batch["attention_mask"].dtype)], dim=1)
    encoder.fix_token_types(batch)
    return batch


# ----------------------------------------------------------------------------------------------- length policy


@dataclass
class LengthReport:
    kept: list[int]
    dropped: dict[int, int] = field(default_factory=dict)  # row index -> length

    def summary(self, max_length: int) -> str:
        if not self.dropped:
            return f"all {len(self.kept)} rows fit in max_length={max_length}"
        sample = ", ".join(f"row {i} ({n} tokens)" for i, n in list(self.dropped.items())[:10])
        return (f"dropped {len(self.dropped)} of {len(self.kept) + len(self.dropped)} rows longer than "
                f"max_length={max_length} with their image tokens: {sample}"
                + (" ..." if len(self.dropped) > 10 else ""))


class SequenceTooLongError(ValueError):
    pass


def filter_by_length(
    rows_conversations: list[tuple[list[dict], list]],
    encoder: Encoder,
    max_length: int | None,
    policy: str = "drop",
    *,
    batch_size: int = 64,
    add_generation_prompt: bool = False,
    column: str = "messages",
    row_ids: list[int] | None = None,
) -> LengthReport:
    """Measure every row (images expanded) and keep those that fit. `policy="drop"` drops and counts the others;
    `"raise"` raises naming every row that does not fit. Rows are never truncated: truncation could cut through
    an image's tokens and make the forward fail ("Image features and image tokens do not match")."""
    if policy not in ("drop", "raise"):
        raise ValueError(f"truncation policy must be 'drop' or 'raise', got {policy!r}")
    n = len(rows_conversations)
    if max_length is None:
        return LengthReport(kept=list(range(n)))
    report = LengthReport(kept=[])
    for start in range(0, n, batch_size):
        chunk = rows_conversations[start:start + batch_size]
        lengths = encoder.lengths([c for c, _ in chunk], [im for _, im in chunk], add_generation_prompt=add_generation_prompt)
        for offset, length in enumerate(lengths):
            (report.kept.append(start + offset) if length <= max_length else report.dropped.__setitem__(start + offset, length))
    if report.dropped and policy == "raise":
        name = (lambda j: row_ids[j]) if row_ids is not None else (lambda j: j)
        lines = [f"row {name(i)}, column '{column}': {length} tokens with its images > max_length={max_length}"
                 for i, length in list(report.dropped.items())[:50]]
        raise SequenceTooLongError("rows too long (rows are never cut inside images):\n  " + "\n  ".join(lines))
    return report
