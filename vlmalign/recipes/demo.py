"""`vlmalign demo`: the whole post-training story on a laptop CPU, in a few minutes.

1. build a tiny random VLM and a synthetic visual task (held-out test set included);
2. SFT from random init, stopped partway (first held-out check >= `--sft-target`);
3. from that same SFT checkpoint: DPO and MPO (on the SFT model's own sampled answers, ranked by the accuracy
   reward), GRPO and GSPO (accuracy + format rewards);
4. evaluate random init, the SFT start and every method on the same held-out set;
5. write `report.html` (self-contained) and `report.md`: accuracy / mean reward / time per method, training curves
   (PNG, matplotlib), and every method's answer side by side for N held-out images.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, TrainerCallback
from transformers.utils import logging as hf_logging

from ..data.synthetic import TASKS, make_dataset
from ..eval.compare import compare_models, render_html, render_markdown
from ..eval.evaluate import evaluate
from ..models.families import family_names
from ..models.loading import load_processor
from ..models.tiny import make_tiny_model

REWARDS = ["accuracy", "format"]   # reported at evaluation
TRAIN_REWARDS = ["accuracy"]        # RL trains on correctness alone (a format reward alone is learnt first and can
                                    # be maximised with wrong answers)


class HeldOutAccuracy(TrainerCallback):
    """Held-out greedy accuracy every `every` steps (a training curve); optionally stops once `stop_at` is reached."""

    def __init__(self, processor, test, every: int, stop_at: float | None = None, min_steps: int = 0):
        self.processor, self.test, self.every, self.stop_at, self.min_steps = processor, test, every, stop_at, min_steps
        self.curve: list[tuple[int, float]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every:
            return
        accuracy = evaluate(model, self.processor, self.test, max_new_tokens=8).accuracy
        self.curve.append((state.global_step, accuracy))
        if self.stop_at is not None and state.global_step >= self.min_steps and accuracy >= self.stop_at:
            control.should_training_stop = True


@dataclass
class MethodRun:
    name: str
    accuracy: float
    reward: float
    seconds: float
    steps: int
    log_history: list[dict] = field(default_factory=list)
    curve: list[tuple[int, float]] = field(default_factory=list)


def _common_args(out: Path, seed: int, **kw) -> dict:
    return dict(output_dir=str(out), save_strategy="no", seed=seed, report_to="none", logging_steps=5,
                weight_decay=0.0, adam_beta2=0.99, max_grad_norm=1.0, dataloader_num_workers=0, **kw)


def _evaluate(model, processor, test) -> tuple[float, float]:
    result = evaluate(model, processor, test, rewards=REWARDS, max_new_tokens=8)
    return result.accuracy, sum(result.rewards.values()) / len(result.rewards)


def _train(name, trainer_factory, model_dir, processor, test, *, every) -> tuple[MethodRun, torch.nn.Module]:
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    tracker = HeldOutAccuracy(processor, test, every)
    trainer = trainer_factory(model)
    trainer.add_callback(tracker)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    accuracy, reward = _evaluate(model, processor, test)
    run = MethodRun(name, accuracy, reward, seconds, trainer.state.global_step, trainer.state.log_history, tracker.curve)
    print(f"  {name}: held-out accuracy {accuracy:.3f}, mean reward {reward:.3f}, {seconds:.0f} s")
    return run, model


def run_demo(out: str | Path = "demo_report", *, task: str = "color", family: str = "qwen2_vl", steps: float = 1.0,
             seed: int = 0, n_compare: int = 16, sft_target: float = 0.35, n_test: int = 200) -> dict:
    from .preferences import make_preferences
    from ..trainers.dpo import MPO_PRESET, DPOConfig, DPOTrainer
    from ..trainers.grpo import GRPOConfig, GRPOTrainer
    from ..trainers.sft import SFTConfig, SFTTrainer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scale = lambda n: max(1, int(round(n * steps)))  # noqa: E731
    t0 = time.perf_counter()
    torch.manual_seed(seed)

    print(f"[1/5] tiny {family} model and the '{task}' task")
    model_dir = make_tiny_model(family, "tiny", out / "models" / "init", seed=seed)
    processor = load_processor(model_dir)
    sft_data = make_dataset(task, "sft", n=2000, seed=seed)
    prompts = make_dataset(task, "prompt", n=2000, seed=seed)
    test = make_dataset(task, "prompt", n=n_test, seed=seed, split="test")

    runs: list[MethodRun] = []
    init_model = AutoModelForImageTextToText.from_pretrained(model_dir)
    acc, reward = _evaluate(init_model, processor, test)
    runs.append(MethodRun("random init", acc, reward, 0.0, 0))
    print(f"  random init: held-out accuracy {acc:.3f} (chance 1/6 = 0.167 if the model answered at random)")

    print(f"[2/5] SFT from random init, stopped at the first held-out check >= {sft_target}")
    sft_model = AutoModelForImageTextToText.from_pretrained(model_dir)
    stopper = HeldOutAccuracy(processor, test, every=5, stop_at=sft_target, min_steps=30)
    sft = SFTTrainer(model=sft_model, processing_class=processor, train_dataset=sft_data, callbacks=[stopper],
                     args=SFTConfig(**_common_args(out / "runs" / "sft", seed, per_device_train_batch_size=32,
                                                   learning_rate=3e-3, warmup_steps=10, max_steps=scale(120))))
    start = time.perf_counter()
    sft.train()
    sft_dir = out / "models" / "sft"
    sft.save_model(str(sft_dir))
    acc, reward = _evaluate(sft_model, processor, test)
    runs.append(MethodRun("SFT start", acc, reward, time.perf_counter() - start, sft.state.global_step,
                          sft.state.log_history, stopper.curve))
    print(f"  SFT start: held-out accuracy {acc:.3f} after {sft.state.global_step} steps")

    print("[3/5] preference pairs from the SFT model's own answers (4 samples per prompt, ranked by the accuracy "
          "reward; the gold answer is chosen when all 4 are wrong)")
    pairs = make_preferences(sft_model, processor, prompts.select(range(min(1024, max(64, scale(1024))))), reward="accuracy", samples=4,
                             max_new_tokens=8, seed=seed, progress=True)
    print(f"  {len(pairs)} pairs")

    print("[4/5] DPO, MPO, GRPO and GSPO from the same SFT checkpoint")
    # Pure DPO needs a large beta on this ~440-token vocabulary (beta 0.1 pushes probability onto junk tokens and
    # the answer format collapses on some seeds); MPO's sft term keeps the format, so it runs at the usual 0.1.
    dpo_args = dict(per_device_train_batch_size=32, learning_rate=3e-4, max_steps=scale(150),
                    lr_scheduler_type="constant")
    factories = {
        "DPO": lambda m: DPOTrainer(model=m, processing_class=processor, train_dataset=pairs, args=DPOConfig(
            **_common_args(out / "runs" / "dpo", seed, beta=1.0, **dpo_args))),
        "MPO": lambda m: DPOTrainer(model=m, processing_class=processor, train_dataset=pairs, args=DPOConfig(
            **_common_args(out / "runs" / "mpo", seed, beta=0.1, **dpo_args, **MPO_PRESET))),
    }
    grpo_args = dict(per_device_train_batch_size=128, num_generations=8, max_completion_length=8, learning_rate=1e-3,
                     num_iterations=2, beta=0.04, max_steps=scale(150), temperature=1.0,
                     lr_scheduler_type="constant")  # 75 generation batches of 16 prompts x 8, each used twice
    factories["GRPO"] = lambda m: GRPOTrainer(model=m, processing_class=processor, train_dataset=prompts,
                                              reward_funcs=TRAIN_REWARDS, args=GRPOConfig(
                                                  **_common_args(out / "runs" / "grpo", seed, **grpo_args)))
    # GSPO preset (sequence-level ratios, beta 0, 4 optimiser steps of 32 completions per generation batch of 16 x 8),
    # with a clip range of 0.01 instead of the paper's 3e-4/4e-4, which learns more slowly on this tiny model.
    # 300 optimiser steps = 75 generation batches, the sampling budget of GRPO above.
    gspo_args = {**grpo_args, "per_device_train_batch_size": 32, "num_iterations": 1, "max_steps": scale(300)}
    gspo_args.pop("beta")
    # GSPO also gets the format reward: with beta 0 and accuracy alone it tended to drop the answer tags here.
    factories["GSPO"] = lambda m: GRPOTrainer(model=m, processing_class=processor, train_dataset=prompts,
                                              reward_funcs=REWARDS, args=GRPOConfig.gspo(
                                                  **_common_args(out / "runs" / "gspo", seed, **gspo_args),
                                                  epsilon=0.01, epsilon_high=0.01))
    models = {"random init": (init_model, processor), "SFT start": (sft_model, processor)}
    for name, factory in factories.items():
        run, model = _train(name, factory, sft_dir, processor, test, every=max(5, scale(150) // 10))
        runs.append(run)
        models[name] = (model, processor)

    print(f"[5/5] report: evaluation of every method on the same {n_compare} held-out images")
    comparison = compare_models(models, test, n_compare, max_new_tokens=8)
    table = [{"method": r.name, "held-out accuracy": r.accuracy, "mean reward": r.reward, "steps": r.steps,
              "train time (s)": round(r.seconds, 1)} for r in runs]
    plots = _plots(runs, out)
    notes = (f"Task '{task}' ({len(test)} held-out images), tiny {family}; all methods start from the same SFT "
             f"checkpoint. Total time {time.perf_counter() - t0:.0f} s.")
    html_text = render_html(comparison, title="vlmalign demo", table=table, plots=plots, notes=notes)
    (out / "report.html").write_text(html_text)
    image_dir = out / "images"
    image_dir.mkdir(exist_ok=True)
    for i, images in enumerate(comparison.images):
        images[0].resize((112, 112), resample=0).save(image_dir / f"row_{i}.png")
    (out / "report.md").write_text(render_markdown(comparison, title="vlmalign demo", table=table,
                                                   plot_files=list(_plot_files(plots)), image_dir="images", notes=notes))
    summary = {"table": table, "seconds": time.perf_counter() - t0}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(_table_text(table))
    print(f"report: {out / 'report.html'} and {out / 'report.md'} ({summary['seconds']:.0f} s in all)")
    return summary


def _plot_files(plots: dict[str, bytes]):
    return [re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") + ".png" for name in plots]


def _plots(runs: list[MethodRun], out: Path) -> dict[str, bytes]:
    """Training curves as PNG bytes (also written next to the report)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(run, key):
        return [(h["step"], h[key]) for h in run.log_history if key in h and "step" in h]

    figures = {
        "Training loss": [(r.name, series(r, "loss")) for r in runs],
        "Training reward (GRPO, GSPO)": [(r.name, series(r, "reward")) for r in runs],
        "Held-out accuracy during training": [(r.name, r.curve) for r in runs],
    }
    plots = {}
    for title, lines in figures.items():
        lines = [(name, pts) for name, pts in lines if pts]
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for name, pts in lines:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, marker="." if len(pts) < 30 else None)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        plots[title] = buf.getvalue()
    for (title, png), file in zip(plots.items(), _plot_files(plots)):
        (out / file).write_bytes(png)
    return plots


def _table_text(table: list[dict]) -> str:
    columns = list(table[0])
    rows = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()] for row in table]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, rows)])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="vlmalign demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_report")
    p.add_argument("--task", default="color", choices=list(TASKS))
    p.add_argument("--family", default="qwen2_vl", choices=family_names())
    p.add_argument("--steps", type=float, default=1.0, help="scale every method's number of steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=16, help="held-out images in the side-by-side comparison")
    a = p.parse_args(argv)
    hf_logging.set_verbosity_error()
    logging.getLogger("vlmalign").setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_demo(a.out, task=a.task, family=a.family, steps=a.steps, seed=a.seed, n_compare=a.n)
