"""Problem/solution datasets -> GRPO prompts: the CLI's ``prompt_column`` / ``system_prompt`` keys.

Datasets such as lmms-lab/multimodal-open-r1-8k-verified hold ``problem`` (text), ``image`` and ``solution`` and no
``prompt``. `prompts_from_column` adds the conversational ``prompt`` (an optional system turn, then a user turn with
the row's images first and the problem text) and keeps every other column, so ``solution`` reaches the reward
functions (vlmalign's ``accuracy`` reads tagged solutions such as ``<answer> 3 </answer>`` by their content).
"""

from __future__ import annotations


def prompts_from_column(dataset, column: str, system_prompt: str | None = None, *, name: str = "dataset"):
    """`dataset` (a `datasets.Dataset`) with a ``prompt`` column built from the text column `column`."""
    names = list(dataset.column_names)
    if column not in names:
        raise ValueError(f"{name}: prompt_column {column!r} is not a column (columns: {names})")
    if "prompt" in names and column != "prompt":
        raise ValueError(f"{name}: already has a 'prompt' column; drop prompt_column, or remove that column")
    for i, value in enumerate(dataset[column]):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{name}: row {i}, column {column!r}: expected non-empty text, got {value!r}")

    def to_prompt(row):
        turns = []
        if system_prompt:
            turns.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
        images = row.get("images") if "images" in row else ([row["image"]] if row.get("image") is not None else [])
        blocks = [{"type": "image"} for _ in (images or [])]
        turns.append({"role": "user", "content": blocks + [{"type": "text", "text": row[column]}]})
        return {"prompt": turns}

    out = dataset.map(to_prompt, desc=f"prompts from {column!r}")
    return out.remove_columns(column) if column != "prompt" else out
