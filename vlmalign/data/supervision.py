"""Which tokens of a conversation are trained on, derived from the model's own chat template.

Official chat templates mostly carry no ``{% generation %}`` markers (Qwen2/2.5/3-VL, Idefics3, SmolVLM, Gemma 3),
and the ones that do (LLaVA) leave the end-of-turn token outside them, so vlmalign never relies on markers. For
each supervised assistant turn ``t`` of a conversation it renders, with the template:

* the conversation before the turn plus the generation prompt (what the model sees when it answers), and
* the whole conversation,

tokenises both through the processor with their images (so image tokens are expanded identically), and takes the
tokens of the whole conversation that follow the generation prompt, up to and including the first end-of-turn
token: **the answer tokens plus the token that closes the answer** (a model must learn to stop). The template's
newline after the end-of-turn token is not supervised (TRL's ``assistant_only_loss`` counts it too).

What this handles, template by template (see docs/supervision.md):

* default system prompts injected by the template (Qwen2-VL / Qwen2.5-VL): part of the prefix, never supervised;
* content the template would drop: every message's content is passed as typed parts (the Idefics3, SmolVLM and
  LLaVA templates render nothing for plain-string content), and the answer's text must appear among its
  supervised tokens, otherwise the row is refused;
* a generation prompt that is not a token prefix of the conversation (LLaVA-OneVision renders ``assistant \\n``
  in one and ``assistant\\n`` in the other): the differing tail must be whitespace, which is skipped, or part of a
  reasoning block (Qwen3.5's prompt ends with ``<think>`` or an empty ``<think></think>``, which the template drops
  from assistant turns before the last user message and which an answer's own ``<think>...</think>`` fills): the
  turn is then supervised from where the conversation leaves the prompt; likewise Gemma 4's empty thought channel
  (with thinking off its prompt ends with ``<|channel>thought\n<channel|>``, a past answer renders without it);
* BOS rendered by the template *and* added by the tokenizer (Gemma 3, Idefics3): special tokens are not added when
  the rendered text already starts with BOS (never two BOS);
* templates that render no end-of-turn token after an answer (LLaVA-1.5 never renders ``</s>``): the family's
  end-of-turn token is inserted right after the answer's text, so the model learns to stop;
* multi-turn conversations: every supervised assistant turn, nothing else.

A turn whose span cannot be derived raises `SupervisionError`; callers turn it into an error naming the row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch


class SupervisionError(ValueError):
    """The chat template does not let an assistant turn be supervised (the message says why)."""


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


# The reasoning block a template's generation prompt opens (Qwen3.5: the prompt ends "<think>\n" or with an empty
# "<think>\n\n</think>\n\n"), where the conversation differs from the prompt: turns before the last user message
# render without it, and an answer that carries its own "<think>...</think>" fills it. Skipped like whitespace: the
# turn is supervised from where the conversation leaves the prompt, as the template renders it. Gemma 4's prompt
# with thinking off ends with an empty thought channel that past answers render without.
_REASONING_TAIL = re.compile(r"<think>(</think>)?|</think>|<\|channel>thought<channel\|>")
_REASONING_TAGS = re.compile(r"</?think>")


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def _image_count(messages: list[dict]) -> int:
    return sum(1 for m in messages for b in m["content"] if b.get("type") == "image")


def _plain(conversation: list[dict]) -> list[dict]:
    """Typed content without the image objects (rendering needs only the block types)."""
    return [{"role": m["role"], "content": [({"type": "image"} if b.get("type") == "image" else
                                             {"type": "text", "text": b.get("text") or ""}) for b in m["content"]]}
            for m in conversation]


@dataclass
class Supervisor:
    """Renders and tokenises conversations with a processor, and finds the supervised tokens of each answer.

    `end_of_turn` is the token that closes an assistant turn (the family's, e.g. ``<|im_end|>``)."""

    processor: object
    end_of_turn: str
    _renders_end_of_turn: bool = field(init=False, default=True)

    def __post_init__(self):
        tokenizer = self.processor.tokenizer
        if not getattr(self.processor, "chat_template", None) and not getattr(tokenizer, "chat_template", None):
            raise SupervisionError(
                "the processor has no chat template: vlmalign renders every conversation with the model's own "
                "template (save the checkpoint's chat_template.jinja with it, or set processor.chat_template)")
        self.end_of_turn_id = tokenizer.convert_tokens_to_ids(self.end_of_turn)
        if self.end_of_turn_id is None or self.end_of_turn_id == tokenizer.unk_token_id:
            raise SupervisionError(f"the end-of-turn token {self.end_of_turn!r} is not in the tokenizer's vocabulary")
        probe = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                 {"role": "assistant", "content": [{"type": "text", "text": "Yo"}]}]
        try:
            text = self._raw(probe, False)
        except Exception as e:  # a template that cannot render a plain exchange
            raise SupervisionError(f"the chat template cannot render a user/assistant exchange: {e}") from e
        self._renders_end_of_turn = self.end_of_turn in text[text.rfind("Yo"):]

    # ------------------------------------------------------------------------------------------------- rendering

    def _raw(self, conversation: list[dict], add_generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(_plain(conversation), tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def render(self, conversation: list[dict], add_generation_prompt: bool = False) -> str:
        """The template's text for `conversation`, with the end-of-turn token inserted after each answer when the
        template renders none (LLaVA-1.5)."""
        text = self._raw(conversation, add_generation_prompt)
        if self._renders_end_of_turn:
            return text
        cuts = []
        for t, message in enumerate(conversation):
            if message["role"] != "assistant":
                continue
            upto = self._raw(conversation[:t + 1], False)
            if not text.startswith(upto):
                raise SupervisionError("the chat template renders earlier turns differently when later turns follow; "
                                       "answers cannot be located")
            cuts.append(len(upto.rstrip()))
        for cut in reversed(cuts):
            text = text[:cut] + self.end_of_turn + text[cut:]
        return text

    def tokenize(self, texts: list[str], images: list[list], *, padding_side: str = "right") -> dict:
        """The processor on rendered texts with their images (expanded image tokens, vision tensors); special
        tokens are added only when the text does not start with BOS already (never two BOS)."""
        bos = self.processor.tokenizer.bos_token
        add_special = not (bos and texts and texts[0].startswith(bos))
        has_images = any(len(im) for im in images)
        out = self.processor(text=texts, images=[list(im) for im in images] if has_images else None,
                             padding=True, padding_side=padding_side, add_special_tokens=add_special,
                             return_tensors="pt")
        return dict(out)

    def tokenize_text(self, texts: list[str], *, padding_side: str = "right") -> dict:
        """The tokenizer alone on rendered texts: image placeholders stay unexpanded and no image is processed
        (for tokens that follow every image, e.g. a preference answer after its prompt). Same BOS rule as
        `tokenize`."""
        tokenizer = self.processor.tokenizer
        bos = tokenizer.bos_token
        add_special = not (bos and texts and texts[0].startswith(bos))
        return dict(tokenizer(texts, padding=True, padding_side=padding_side, add_special_tokens=add_special,
                              return_tensors="pt"))

    def dropped_text(self, conversation: list[dict]) -> str | None:
        """Why the template loses part of `conversation` (a message whose text it does not render), or None."""
        text = _squash(self._raw(conversation, False))
        for t, message in enumerate(conversation):
            for block in message["content"]:
                part = _squash(block.get("text") or "") if block.get("type") == "text" else ""
                if part and part not in text:
                    return (f"the chat template drops the text of message {t} ({message['role']}): "
                            f"{(block.get('text') or '')[:60]!r} is not in the rendered conversation")
        return None

    # ----------------------------------------------------------------------------------------------- supervision

    def spans(self, conversations: list[list[dict]], images: list[list], row_ids: torch.Tensor,
              row_mask: torch.Tensor, supervise_from: list[int], *, text_only: bool = False
              ) -> list[list[tuple[int, int]]]:
        """Supervised token spans [start, end) (in padded coordinates) of each row's supervised assistant turns.

        `row_ids` / `row_mask` are the batch's padded ids and attention mask of the *whole* conversations (as
        returned by `tokenize(render(...))`); an assistant turn at message index >= `supervise_from[i]` is
        supervised. With `text_only` the rows were tokenised by `tokenize_text` and so are the prefixes (no image
        processed). Raises `SupervisionError` (with `.row` = batch row) when a turn yields no span."""
        jobs, owners = [], []
        for i, conversation in enumerate(conversations):
            for t, message in enumerate(conversation):
                if message["role"] == "assistant" and t >= supervise_from[i]:
                    prefix = conversation[:t]
                    jobs.append((self.render(prefix, True), list(images[i][:_image_count(prefix)])))
                    owners.append((i, t))
        out: list[list[tuple[int, int]]] = [[] for _ in conversations]
        if not jobs:
            return out
        prefixes = (self.tokenize_text([j[0] for j in jobs]) if text_only
                    else self.tokenize([j[0] for j in jobs], [j[1] for j in jobs]))
        decode = self.processor.tokenizer.decode
        rows = {}
        for (i, t), p_ids, p_mask in zip(owners, prefixes["input_ids"], prefixes["attention_mask"]):
            if i not in rows:
                positions = torch.nonzero(row_mask[i]).flatten()
                rows[i] = (positions, row_ids[i][positions].tolist())
            positions, ids = rows[i]
            prompt = p_ids[p_mask.bool()].tolist()
            start = _common_prefix(prompt, ids)
            if start < len(prompt):
                tail = decode(prompt[start:])
                if tail.strip() and not _REASONING_TAIL.fullmatch(_squash(tail)):
                    raise _error(i, t, f"the chat template's generation prompt ends with {tail!r}, which the rendered "
                                       "conversation does not contain at that place")
                while start < len(ids) and not decode(ids[start:start + 1]).strip() and ids[start] != self.end_of_turn_id:
                    start += 1
            try:
                end = ids.index(self.end_of_turn_id, start)
            except ValueError:
                raise _error(i, t, f"the chat template rendered no end-of-turn token {self.end_of_turn!r} after the "
                                   "answer") from None
            answer = "".join(b.get("text") or "" for b in conversations[i][t]["content"] if b.get("type") == "text")
            # the reasoning tags may sit in the prompt or be re-spaced by the template (Qwen3.5): compared without
            if end == start or _REASONING_TAGS.sub("", _squash(answer)) not in _REASONING_TAGS.sub(
                    "", _squash(decode(ids[start:end]))):
                raise _error(i, t, "the chat template rendered no assistant tokens for this answer (its text does not "
                                   "appear after the generation prompt)")
            out[i].append((int(positions[start]), int(positions[end]) + 1))
        return out


def _error(row: int, turn: int, why: str) -> SupervisionError:
    err = SupervisionError(f"message {turn} (assistant): {why}")
    err.row = row
    return err

