"""Held-out evaluation: greedy (or sampled) answers, accuracy, mean reward per function, pass@k."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..data.collate import Encoder
from ..data.formats import normalize_row
from ..models.families import get_family
from ..models.forward import unwrap_model
from ..rl.rewards import get_reward_function, reward_function_name
from ..rl.rollout import SamplingConfig, sample_and_score


@dataclass
class EvalResult:
    accuracy: float                       # mean accuracy reward of the first sample of each row (greedy by default)
    rewards: dict[str, float]             # mean of each reward function (None left out)
    pass_at_k: dict[int, float] = field(default_factory=dict)
    num_rows: int = 0
    completions: list[list[str]] = field(default_factory=list)   # [row][sample]
    correct: list[list[bool]] = field(default_factory=list)

    def to_dict(self, with_completions: bool = False) -> dict:
        d = {"num_rows": self.num_rows, "accuracy": self.accuracy, "rewards": self.rewards,
             "pass_at_k": {str(k): v for k, v in self.pass_at_k.items()}}
        if with_completions:
            d["completions"] = self.completions
            d["correct"] = self.correct
        return d


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator (Chen et al. 2021, arXiv 2107.03374): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def make_encoder(model, processor) -> Encoder:
    family = get_family(unwrap_model(model))
    return Encoder(processor, family, family.image_token_id(unwrap_model(model)))


@torch.no_grad()
def evaluate(
    model,
    processor,
    dataset,
    *,
    rewards=("accuracy",),
    samples: int = 1,
    temperature: float = 1.0,
    max_new_tokens: int = 16,
    batch_size: int = 64,
    progress: bool = False,
    seed: int = 0,
    trust_reward_code: bool = False,
) -> EvalResult:
    """Answer every prompt of `dataset` (any accepted format: its prompt side is used). With `samples == 1` the
    answer is greedy; with more, `samples` answers are sampled at `temperature` and pass@k is reported for
    k in 1, 2, 4, ... <= samples. Accuracy is the `accuracy` reward (exact match / math-verify on `solution`)."""
    encoder = make_encoder(model, processor)
    funcs = [get_reward_function(r, trust_reward_code=trust_reward_code) for r in rewards]
    names = [reward_function_name(f) for f in funcs]
    if "accuracy_reward" not in names and "accuracy" not in names:
        funcs.append(get_reward_function("accuracy"))
        names.append("accuracy_reward")
    acc_index = next(i for i, n in enumerate(names) if n in ("accuracy_reward", "accuracy"))
    sampling = SamplingConfig(max_completion_length=max_new_tokens, temperature=temperature,
                              do_sample=samples > 1)
    rows = [normalize_row(dataset[i], "prompt", i) for i in range(len(dataset))]
    sums = torch.zeros(len(funcs))
    counts = torch.zeros(len(funcs))
    result = EvalResult(accuracy=0.0, rewards={}, num_rows=len(rows))
    torch.manual_seed(seed)
    for start in tqdm(range(0, len(rows), batch_size), desc="eval", disable=not progress):
        chunk = rows[start:start + batch_size]
        out, per_func, _ = sample_and_score(model, encoder, chunk, funcs, samples=samples, sampling=sampling)
        valid = ~torch.isnan(per_func)
        sums += torch.where(valid, per_func, 0.0).sum(0)
        counts += valid.sum(0)
        acc = per_func[:, acc_index].nan_to_num(0.0).view(len(chunk), samples)
        result.completions += [out.texts[i * samples:(i + 1) * samples] for i in range(len(chunk))]
        result.correct += (acc > 0.5).tolist()
    result.rewards = {n: (sums[i] / counts[i]).item() if counts[i] else float("nan") for i, n in enumerate(names)}
    result.accuracy = sum(c[0] for c in result.correct) / max(1, len(result.correct))
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= samples]
    for k in ks:
        result.pass_at_k[k] = sum(pass_at_k(samples, sum(c), k) for c in result.correct) / max(1, len(result.correct))
    return result
