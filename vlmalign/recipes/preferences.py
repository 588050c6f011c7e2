"""On-policy preference pairs: sample answers from a model, score them with reward functions, keep best vs worst.

`make_preferences(model, processor, dataset)` turns prompt rows into DPO rows (`prompt`, `chosen`, `rejected`,
`images`, the other columns, plus `chosen_reward` / `rejected_reward`). Rejected answers are the model's own
samples, which is what makes DPO work on a small VLM (random wrong answers as "rejected" make the output format
collapse, see `learnable-task-feasibility.md`).

Input rows may be in any accepted format: prompt rows are used as they are, preference rows by their `prompt`, and
SFT rows by their messages without the last assistant turn (the images must all be in that prompt).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import datasets
import torch
from tqdm.auto import tqdm

from ..data.formats import detect_kind, normalize_row
from ..eval.evaluate import make_encoder
from ..rl.rewards import compute_rewards, get_reward_function
from ..rl.rollout import SamplingConfig, sample_and_score

logger = logging.getLogger(__name__)

CHOSEN_MODES = ("best", "gold")
AUTO = "auto"
ANSWER_TEMPLATE = "<answer>{}</answer>"


@dataclass
class PreferenceStats:
    num_prompts: int = 0
    num_pairs: int = 0
    num_gold_chosen: int = 0     # pairs whose chosen answer is the inserted gold answer (no sample beat it)
    skipped: Counter = field(default_factory=Counter)          # reason -> rows

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        reasons = ", ".join(f"{n} {why}" for why, n in self.skipped.most_common()) or "none"
        return (f"{self.num_pairs} preference pairs from {self.num_prompts} prompts ({self.num_gold_chosen} with the "
                f"gold answer inserted as chosen); skipped {self.num_skipped} rows: {reasons}")


def _column_names(dataset) -> list[str]:
    names = getattr(dataset, "column_names", None)
    return list(names) if names is not None else list(dict.fromkeys(k for row in dataset for k in row))


def _prompt_row(raw: dict, kind: str, index: int) -> dict:
    """The prompt side of a row of any kind, normalised (`prompt`, `images`, other columns)."""
    row = normalize_row(raw, kind, index)
    if kind == "sft":
        messages = row.pop("messages")
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        row["prompt"] = messages[:last]
        if not row["prompt"] or row["prompt"][-1]["role"] != "user":
            raise ValueError(f"row {index}: the messages before the last assistant turn must end with a user turn")
        if any(b["type"] == "image" for m in messages[last:] for b in m["content"]):
            raise ValueError(f"row {index}: images after the prompt are not supported")
    elif kind == "preference":
        row.pop("chosen"), row.pop("rejected")
    return row


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def _message_features() -> datasets.List:
    content = datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")})
    return datasets.List({"role": datasets.Value("string"), "content": content})


def _to_dataset(out_rows: list[dict]) -> datasets.Dataset:
    fixed = {"prompt": _message_features(), "chosen": _message_features(), "rejected": _message_features(),
             "images": datasets.List(datasets.Image()), "chosen_reward": datasets.Value("float32"),
             "rejected_reward": datasets.Value("float32")}
    names = list(dict.fromkeys(k for row in out_rows for k in row)) or list(fixed)
    columns = {k: [row.get(k) for row in out_rows] for k in names}
    features = {}
    for name in names:
        features[name] = fixed.get(name) or datasets.Dataset.from_dict({name: columns[name]}).features[name]
    for row_messages in (columns.get("prompt") or []):  # the schema wants a text key in every block
        for message in row_messages:
            message["content"] = [{"type": b["type"], "text": b.get("text")} for b in message["content"]]
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


@torch.no_grad()
def make_preferences(
    model,
    processor,
    dataset,
    *,
    reward="accuracy",
    samples: int = 4,
    temperature: float = 1.0,
    max_new_tokens: int = 16,
    seed: int = 0,
    batch_size: int = 64,
    chosen: str = "best",
    gold_template: str = AUTO,
    progress: bool = True,
    return_stats: bool = False,
    trust_reward_code: bool = False,
) -> datasets.Dataset | tuple[datasets.Dataset, PreferenceStats]:
    """Sample `samples` answers per prompt from `model` (temperature `temperature`, vision tokens suppressed), score
    each with `reward` (a name, `"module:function"`, a callable, or a list of them: their sum), and build pairs.

    `chosen="best"`: chosen = the best-scoring sample, rejected = the worst, when their scores differ. When all
    samples score the same and the row has a `solution` whose gold answer (see `gold_template`) scores higher than
    them (e.g. all samples wrong), chosen = the gold answer, rejected = a sample; otherwise the row is skipped.
    `chosen="gold"`: chosen = the gold answer, rejected = the worst sample scoring below it (rows without such a
    sample, or without a solution, are skipped): the recipe that worked best in the feasibility study.

    `gold_template` renders the `solution` column as an answer: `"auto"` uses `"<answer>{}</answer>"` when the
    samples of the batch use the `<answer>` tag, else the bare solution; or give a format string such as
    `"<answer>{}</answer>"`. Empty samples (an immediate end of turn) are never used, and samples without a reward
    (every function returned None) are ignored. Skipped rows are counted and logged; `return_stats=True` also
    returns the `PreferenceStats`. Same arguments and model: the same pairs (seeded with `seed`)."""
    if chosen not in CHOSEN_MODES:
        raise ValueError(f"chosen must be one of {CHOSEN_MODES}, got {chosen!r}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    encoder = make_encoder(model, processor)
    funcs = [get_reward_function(r, trust_reward_code=trust_reward_code) for r in (reward if isinstance(reward, (list, tuple)) else [reward])]
    kind = detect_kind(_column_names(dataset))
    sampling = SamplingConfig(max_completion_length=max_new_tokens, temperature=temperature, do_sample=True)
    stats, out_rows = PreferenceStats(), []
    torch.manual_seed(seed)
    for start in tqdm(range(0, len(dataset), batch_size), desc="sampling preferences", disable=not progress):
        rows = [_prompt_row(dataset[i], kind, i) for i in range(start, min(start + batch_size, len(dataset)))]
        out, _, total = sample_and_score(model, encoder, rows, funcs, samples=samples, sampling=sampling)
        texts = out.texts
        scores = total.view(len(rows), samples)

        template = gold_template
        if template == AUTO:
            template = ANSWER_TEMPLATE if any("<answer>" in t for t in texts) else "{}"
        has_gold = [r.get("solution") not in (None, "") for r in rows]
        gold_rows = [r for r, g in zip(rows, has_gold) if g]
        gold_texts = [template.format(r["solution"]) for r in gold_rows]
        gold_scores = iter(compute_rewards(
            funcs, [r["prompt"] for r in gold_rows], gold_texts, None,
            {k: [r.get(k) for r in gold_rows] for k in rows[0] if k != "prompt"})[1].tolist() if gold_rows else [])
        gold_texts = iter(gold_texts)

        for j, row in enumerate(rows):
            stats.num_prompts += 1
            gold = (next(gold_texts), next(gold_scores)) if has_gold[j] else None
            valid = [(texts[j * samples + k], scores[j, k].item()) for k in range(samples)
                     if texts[j * samples + k].strip() and not torch.isnan(scores[j, k])]
            pair, reason = _pick_pair(valid, gold, chosen)
            if pair is None:
                stats.skipped[reason] += 1
                continue
            (chosen_text, chosen_score), (rejected_text, rejected_score) = pair
            stats.num_pairs += 1
            stats.num_gold_chosen += pair[0] is gold
            extra = {k: v for k, v in row.items() if k not in ("prompt", "images")}
            out_rows.append({"prompt": row["prompt"], "chosen": _assistant(chosen_text),
                             "rejected": _assistant(rejected_text), "images": row["images"], **extra,
                             "chosen_reward": chosen_score, "rejected_reward": rejected_score})
    logger.info("make_preferences: %s", stats.summary())
    if stats.num_skipped:
        logger.warning("make_preferences skipped %d of %d rows: %s", stats.num_skipped, stats.num_prompts,
                       dict(stats.skipped))
    result = _to_dataset(out_rows)
    return (result, stats) if return_stats else result


def _pick_pair(valid: list[tuple[str, float]], gold: tuple[str, float] | None, mode: str):
    """((chosen_text, score), (rejected_text, score)) or (None, reason)."""
    if not valid:
        return None, "no usable sample"
    worst = min(valid, key=lambda s: s[1])
    if mode == "gold":
        if gold is None:
            return None, "no solution"
        if worst[1] >= gold[1]:
            return None, "no sample scores below the gold answer"
        return (gold, worst), None
    best = max(valid, key=lambda s: s[1])
    if best[1] > worst[1] and best[0] != worst[0]:
        return (best, worst), None
    if gold is not None and gold[1] > best[1] and gold[0] != worst[0]:
        return (gold, worst), None
    return None, "all samples score the same" if gold is None else "all samples score the same as the gold answer"
