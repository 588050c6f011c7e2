"""A small byte-level BPE tokenizer built locally, for offline tiny VLMs.

Any text round-trips (byte-level: every byte is in the vocabulary), the synthetic tasks' words are single tokens
(with and without a leading space), the answer tags (`<answer>`, `<think>`, ...) are single *non-special* tokens
(completions are decoded with special tokens skipped, the tags must survive), and each family's special tokens are
added as special tokens. The vocabulary is kept small (~400 entries): a random model spreads its first samples over
fewer useless ids, and a tiny model learns faster.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .vocabulary import ANSWER_TAGS

# Words every tiny tokenizer knows as whole tokens. The synthetic tasks add theirs on top (see `build_tokenizer`).
BASE_WORDS = (
    "user assistant system what which how many is are the there of a an and it in on to color colour shape shapes "
    "left right answer image picture yes no . , ? : 0 1 2 3 4 5 6 7 8 9 "
    # the official chat templates' own words (role names, Qwen's default system prompt)
    "You helpful User Assistant System USER ASSISTANT model"
).split()


def _corpus(words: list[str]) -> list[str]:
    # Each word alone, after a space, and glued to the answer tags, so that BPE learns "word" and " word".
    lines = []
    for w in words:
        lines += [w, f" {w}", f"the {w} is {w} .", f"<answer>{w}</answer>"] * 4
    return lines


def build_tokenizer(
    special_tokens: list[str],
    *,
    eos_token: str,
    pad_token: str,
    bos_token: str | None = None,
    unk_token: str | None = None,
    extra_words: list[str] = (),
    chat_template: str | None = None,
    extra_special: dict[str, str] | None = None,
    add_bos: bool = False,
    padding_side: str = "right",
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the task vocabulary and wrap it as a transformers fast tokenizer.

    `special_tokens` are the family's control tokens (turn markers, image placeholders...). They are added as
    special tokens, so `skip_special_tokens=True` removes them; the answer tags are added as normal tokens.
    `extra_special` maps tokenizer attribute names (e.g. ``image_token``) to token strings, saved with the tokenizer
    so processors that read ``tokenizer.image_token`` find them. `add_bos` makes the tokenizer put BOS in front
    of every encoded text (as the real LLaVA, Idefics3 and Gemma tokenizers do); `padding_side` is the real
    checkpoint's default.
    """
    words = list(dict.fromkeys([*BASE_WORDS, *extra_words]))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=256 + 8 * len(words) + 64,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(_corpus(words), trainer=trainer)
    # Special tokens first (stable low ids after the BPE vocab), then the answer tags as plain tokens.
    specials = list(dict.fromkeys([t for t in [pad_token, eos_token, bos_token, unk_token, *special_tokens] if t]))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ANSWER_TAGS])

    kwargs = dict(tokenizer_object=tok, eos_token=eos_token, pad_token=pad_token, padding_side=padding_side)
    if add_bos:
        kwargs["add_bos_token"] = True
    if bos_token:
        kwargs["bos_token"] = bos_token
    if unk_token:
        kwargs["unk_token"] = unk_token
    if extra_special:
        kwargs["extra_special_tokens"] = dict(extra_special)
    tokenizer = PreTrainedTokenizerFast(**kwargs)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer
