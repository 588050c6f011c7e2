"""The words of the built-in synthetic tasks, which every tiny model's tokenizer knows as single tokens.

The model layer owns this vocabulary because the tiny tokenizers are built from it (`models/tiny.py`); the
synthetic tasks (`data/synthetic.py`) are written in it, with the RGB values of the colours kept there.
"""

from __future__ import annotations

COLORS: list[str] = ["red", "green", "blue", "yellow", "purple", "orange"]
KINDS: list[str] = ["circle", "square", "triangle"]
DIGITS: list[str] = [str(d) for d in range(10)]
SIDES: list[str] = ["left", "right"]

#: Every whitespace-separated word used in any question, answer or reasoning, so that a tokenizer can map each
#: one to a single token. The tags in ``ANSWER_TAGS`` are not words: they are glued to the text around them.
TASK_WORDS: list[str] = (
    ["what", "color", "is", "the", "shape", "?", "how", "many", "shapes", "are", "there", "."]
    + SIDES
    + COLORS
    + KINDS
    + DIGITS
)
#: The answer tags: single non-special tokens in every tiny tokenizer (completions are decoded with special tokens
#: skipped, and the tags must survive).
ANSWER_TAGS: list[str] = ["<think>", "</think>", "<answer>", "</answer>"]
