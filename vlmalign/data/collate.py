"""Rows -> model inputs, through the model's own chat template.

One path for every trainer: conversations (typed content, images in order) are rendered by the processor's chat
template and tokenised with their images, which gives `input_ids`, `attention_mask` and every vision tensor the
family needs. On top of that:

* `labels`: the answer tokens of the supervised assistant turns plus the end-of-turn token closing each, derived
  from the template itself (`vlmalign.data.supervision`), never from `{% generation %}` markers; image
  placeholders and other vision tokens never count;
* token-type ids rebuilt from the ids (Qwen's `mm_token_type_ids`, Gemma3's `token_type_ids`), so they line up with
  the placeholders whatever the processor's padding side or BOS handling;
* lengths measured with the images expanded: a row longer than `max_length` is dropped or rejected as a whole
  (`data.dataset.prepare_rows`), never cut inside an image's tokens.

Rows reaching this module are already normalised by `vlmalign.data.formats` (messages with typed blocks + `images`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..losses.logprobs import IGNORE_INDEX
from ..models.families import Family
from .supervision import Supervisor, SupervisionError  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)



def _typed(conversation: list[dict]) -> list[dict]:
    """Every message's content as typed parts (templates such as Idefics3's, SmolVLM's and LLaVA's render nothing
    for plain-string content)."""
    return [{"role": m["role"], "content": ([{"type": "text", "text": m["content"]}] if isinstance(m["content"], str)
                                           else m["content"])} for m in conversation]


@dataclass
class Encoder:
    """Renders conversations with the processor's chat template, tokenises them with their images, and finishes
    the batch (labels, token types) for one family."""

    processor: object
    family: Family
    image_token_id: int

    def __post_init__(self):
        self.vision_token_ids = torch.tensor(self.family.suppress_token_ids(self.processor.tokenizer))
        self.supervisor = Supervisor(self.processor, self.family.eos_token)

    def encode(
        self,
        conversations: list[list[dict]],
        images: list[list],
        *,
        padding_side: str = "right",
        add_generation_prompt: bool = False,
        with_labels: bool = True,
        supervise_from: list[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Tokenise a batch of conversations with their images.

        With labels, each assistant turn at message index >= `supervise_from[i]` (default 0: every assistant
        turn) is supervised: its answer tokens and the end-of-turn token that closes it (`data/supervision.py`).
        Raises `SupervisionError` (`.row` = the batch row) when a turn cannot be supervised."""
        convs = [_typed(c) for c in conversations]
        sup = self.supervisor
        texts = [sup.render(c, add_generation_prompt) for c in convs]
        batch = sup.tokenize(texts, images, padding_side=padding_side)
        self.fix_token_types(batch)
        if with_labels:
            self._add_labels(batch, convs, images, supervise_from)
        return batch

    def _add_labels(self, batch: dict, convs: list[list[dict]], images, supervise_from, text_only: bool = False):
        starts = supervise_from or [0] * len(convs)
        spans = self.supervisor.spans(convs, images, batch["input_ids"], batch["attention_mask"], starts,
                                      text_only=text_only)
        mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        for i, row_spans in enumerate(spans):
            for a, b in row_spans:
                mask[i, a:b] = True
        mask &= ~torch.isin(batch["input_ids"], self.vision_token_ids)
        batch["labels"] = torch.where(mask, batch["input_ids"], IGNORE_INDEX)

    def encode_text(self, conversations: list[list[dict]], *, supervise_from: list[int] | None = None,
                    add_generation_prompt: bool = False, padding_side: str = "right") -> dict[str, torch.Tensor]:
        """`encode` through the tokenizer alone: image placeholders unexpanded, no image processed, no vision
        tensors. The tokens after a conversation's last image are those `encode` gives (the processor only
        expands the placeholders); the shared-prefix preference form takes its answers from here."""
        convs = [_typed(c) for c in conversations]
        sup = self.supervisor
        batch = sup.tokenize_text([sup.render(c, add_generation_prompt) for c in convs], padding_side=padding_side)
        batch.pop("token_type_ids", None)
        if supervise_from is not None:
            self._add_labels(batch, convs, [[] for _ in convs], supervise_from, text_only=True)
        return batch

    def encode_prompts(self, rows: list[dict], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """The generation prompts of prompt rows (`prompt` + `images`), left-padded, with their vision tensors
        [B, P] (on `device` when given): the one encoding of a prompt that generation, completion log-probs, shared
        prefixes and vLLM's prompt check all use."""
        prompts = self.encode([r["prompt"] for r in rows], [r["images"] for r in rows], padding_side="left",
                              add_generation_prompt=True, with_labels=False)
        return {k: v.to(device) for k, v in prompts.items()} if device is not None else prompts

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


# ------------------------------------------------------------------------------------------------- collators


@dataclass
class SFTCollator:
    """Normalised SFT rows (`messages` + `images`) -> a training batch with assistant-only labels."""

    encoder: Encoder

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return self.encoder.encode([r["messages"] for r in rows], [r["images"] for r in rows],
                                   supervise_from=[r.get("completion_start", 0) for r in rows])


@dataclass
class PreferenceCollator:
    """Normalised preference rows -> one batch of 2B rows: [prompt+chosen_1..B, prompt+rejected_1..B].

    Each row's images go with that row into the processor for both its chosen and its rejected sequence, so a
    pixel tensor can never be paired with another row's answer. Labels cover the answer turns only.

    With `shared_prefix`, the batch is only `{"shared": ...}` (`split_completions`' form) whenever the chat
    template allows it: each row's prompt and images go through the processor once, and the 2B answers are cut
    from the conversations tokenised without their images (`Encoder.encode_text`; the answers follow every
    image). Otherwise (a generation prompt that is not a prefix of the conversation: Gemma 4, LLaVA-OneVision)
    the plain 2B-row form. `full_form=True` adds the plain form to the shared one (tests, benchmarks)."""

    encoder: Encoder

    shared_prefix: bool = False
    full_form: bool = False
    _fallback_logged: bool = field(default=False, init=False, repr=False)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        convs = [r["prompt"] + r["chosen"] for r in rows] + [r["prompt"] + r["rejected"] for r in rows]
        images = [r["images"] for r in rows] * 2
        starts = [len(r["prompt"]) for r in rows] * 2
        if self.shared_prefix:
            shared = self.shared_form(rows, convs, starts)
            if shared is not None and not self.full_form:
                return {"shared": shared}
            if shared is None and not self._fallback_logged:
                self._fallback_logged = True
                logger.info("shared-prefix preference batch unavailable: the chat template's generation prompt is not "
                            "a prefix of the rendered conversation (e.g. Gemma 4's empty thought channel, "
                            "LLaVA-OneVision's 'assistant \\n'); running the chosen and rejected rows in full")
        batch = self.encoder.encode(convs, images, supervise_from=starts)
        if self.shared_prefix and shared is not None:
            batch["shared"] = shared
        return batch

    def shared_form(self, rows: list[dict], convs: list[list[dict]], starts: list[int]) -> dict | None:
        """The shared-prefix form with each row's images processed once (with its prompt), or None."""
        enc = self.encoder
        if any(b.get("type") == "image" for r in rows for m in r["chosen"] + r["rejected"]
               for b in (m["content"] if isinstance(m["content"], list) else ())):
            return None  # an image inside an answer: the answers are not image-free continuations
        text = enc.encode_text(convs, supervise_from=starts)
        text_prompts = enc.encode_text([r["prompt"] for r in rows], add_generation_prompt=True, padding_side="left")
        shared = split_completions(text, text_prompts)
        if shared is not None:
            shared["prompt_inputs"] = enc.encode_prompts(rows)
        return shared


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


class SequenceTooLongError(ValueError):
    pass
