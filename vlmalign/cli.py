"""`vlmalign` command line.

    vlmalign make-tiny-model --family qwen2_vl --size tiny OUT_DIR
    vlmalign make-data --task color --format sft --n 2000 --seed 0 OUT
    vlmalign sft  --config sft.yaml  [--any_field value ...]
    vlmalign dpo  --config dpo.yaml  [...]      vlmalign mpo  (preset of dpo: sigmoid 0.8 + bco_pair 0.2 + sft 1.0)
    vlmalign grpo --config grpo.yaml [...]      vlmalign gspo (preset of grpo: sequence-level ratios)
    vlmalign make-preferences --model DIR --dataset D --reward accuracy --samples 4 --out OUT
    vlmalign eval --model DIR --dataset D [--reward accuracy --reward format] [--samples k]
    vlmalign compare --model NAME=DIR [...] --dataset D --n 16 --out report.html
    vlmalign demo [--out DIR]
    vlmalign vllm-serve --model DIR [--host 127.0.0.1 --port 8000]   (GRPO with use_vllm, vllm_mode=server)

Training commands take a YAML file (`--config`) whose keys are the fields of the method's config plus `model`,
`dataset`, ...; command-line flags in the Hugging Face argument-parser style override it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field, fields

import yaml

from .trainers.engines.saved import missing_saved_files


@dataclass
class ScriptArguments:
    """What a training command needs besides the method's config."""

    model: str = field(default=None, metadata={"help": "Model directory or hub id."})
    dataset: str = field(default=None, metadata={"help": "Dataset: a save_to_disk directory, a .json/.jsonl/.parquet "
                                                 "file, a directory with data.jsonl, or a hub name[:split]."})
    dataset_split: str = field(default="train", metadata={"help": "Split of the training dataset."})
    eval_dataset: str | None = field(default=None, metadata={"help": "Optional evaluation dataset (same forms)."})
    eval_split: str = field(default="test", metadata={"help": "Split of the evaluation dataset."})
    reward_funcs: list[str] = field(default_factory=lambda: ["format", "accuracy"], metadata={
        "help": "GRPO rewards: built-in names (format, think_format, accuracy) or module:function (imports and runs "
                "that code; needs --trust_reward_code true)."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains all parameters."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    prompt_column: str | None = field(default=None, metadata={"help": "GRPO/GSPO: build the conversational "
                                      "`prompt` from this text column (e.g. 'problem' for problem/solution datasets "
                                      "such as multimodal-open-r1); the row's image is put before the text."})
    system_prompt: str | None = field(default=None, metadata={"help": "With prompt_column: a system turn put "
                                      "first (e.g. the <think>/<answer> format instruction)."})


def _method(name: str):
    """(config class, trainer class, preset defaults) of a training command; imported lazily."""
    if name == "sft":
        from .trainers.sft import SFTConfig, SFTTrainer
        return SFTConfig, SFTTrainer, {}
    if name in ("dpo", "mpo"):
        from .trainers.dpo import MPO_PRESET, DPOConfig, DPOTrainer
        return DPOConfig, DPOTrainer, (MPO_PRESET if name == "mpo" else {})
    if name in ("grpo", "gspo"):
        from .trainers.grpo import GSPO_PRESET, GRPOConfig, GRPOTrainer
        return GRPOConfig, GRPOTrainer, (GSPO_PRESET if name == "gspo" else {})
    raise ValueError(name)


def _pop_config_flag(argv: list[str], method: str) -> tuple[str | None, list[str]]:
    """(the --config FILE / --config=FILE value, argv without it); SystemExit for a missing value or a repeat."""
    found, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise SystemExit(f"vlmalign {method}: --config needs a file: --config FILE.yaml")
            found.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--config="):
            value = arg.split("=", 1)[1]
            if not value:
                raise SystemExit(f"vlmalign {method}: --config needs a file: --config FILE.yaml")
            found.append(value)
        else:
            rest.append(arg)
        i += 1
    if len(found) > 1:
        raise SystemExit(f"vlmalign {method}: --config given {len(found)} times ({', '.join(found)}); give one file")
    return (found[0] if found else None), rest


def _read_config_file(path: str) -> dict:
    """The YAML file's mapping of field -> value; SystemExit naming the file when it is missing, is not valid YAML,
    or is not a mapping (a list or a scalar)."""
    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
    except OSError as error:
        raise SystemExit(f"--config {path}: cannot read the file ({error})") from None
    except yaml.YAMLError as error:
        raise SystemExit(f"--config {path}: not valid YAML ({error})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise SystemExit(f"--config {path}: the file must hold a mapping of option: value, but holds a "
                         f"{type(loaded).__name__} ({str(loaded)[:60]!r})")
    bad = [k for k in loaded if not isinstance(k, str)]
    if bad:
        raise SystemExit(f"--config {path}: option names must be strings, got {bad}")
    return loaded


def parse_training_args(method: str, argv: list[str]):
    """YAML (`--config`) + command-line overrides -> (ScriptArguments, method config)."""
    from transformers import HfArgumentParser

    config_cls, _, preset = _method(method)
    parser = HfArgumentParser((ScriptArguments, config_cls), prog=f"vlmalign {method}")
    parser.description = "Fields may also come from a YAML file: --config FILE (command-line flags override it)."
    config_path, argv = _pop_config_flag(argv, method)
    defaults = dict(preset)
    if config_path:
        loaded = _read_config_file(config_path)
        known = {f.name for f in fields(ScriptArguments)} | {f.name for f in fields(config_cls)}
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise SystemExit(f"{config_path}: unknown keys {unknown}")
        defaults.update(loaded)
    for action in parser._actions:
        if action.dest in defaults:
            action.required = False
    parser.set_defaults(**defaults)
    script_args, config = parser.parse_args_into_dataclasses(args=argv)
    given = set(defaults) | {a[2:].split("=")[0] for a in argv if a.startswith("--")}
    if method == "gspo" and not given & {"steps_per_generation", "generation_batch_size"}:
        # the GSPO paper's setting: 4 optimiser steps per generation batch (clipping only matters off-policy)
        from .trainers.grpo import GSPO_STEPS_PER_GENERATION_FACTOR
        parser.set_defaults(steps_per_generation=GSPO_STEPS_PER_GENERATION_FACTOR * config.gradient_accumulation_steps)
        script_args, config = parser.parse_args_into_dataclasses(args=argv)
    if script_args.model is None or script_args.dataset is None:
        raise SystemExit(f"vlmalign {method}: --model and --dataset are required (on the command line or in --config)")
    return script_args, config


def load_training_data(script_args: ScriptArguments):
    """(train, eval or None) datasets named by the script arguments."""
    from .data.io import load_dataset_any

    train = load_dataset_any(script_args.dataset, script_args.dataset_split)
    evaluation = load_dataset_any(script_args.eval_dataset, script_args.eval_split) if script_args.eval_dataset else None
    if script_args.prompt_column:
        from .data.prompts import prompts_from_column
        train, evaluation = (prompts_from_column(d, script_args.prompt_column, script_args.system_prompt, name=n)
                             if d is not None else None for d, n in ((train, "dataset"), (evaluation, "eval_dataset")))
    return train, evaluation


def run_training(method: str, script_args: ScriptArguments, config, train, evaluation=None):
    """Build the method's trainer, train (resuming if asked), save model + processor to `config.output_dir`."""
    _, trainer_cls, _ = _method(method)
    kwargs = dict(model=script_args.model, args=config, train_dataset=train, eval_dataset=evaluation)
    if script_args.lora_r:
        from peft import LoraConfig
        kwargs["peft_config"] = LoraConfig(r=script_args.lora_r, lora_alpha=script_args.lora_alpha,
                                           lora_dropout=script_args.lora_dropout, task_type="CAUSAL_LM")
    if method in ("grpo", "gspo"):
        kwargs["reward_funcs"] = script_args.reward_funcs
    trainer = trainer_cls(**kwargs)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(config.output_dir)
    trainer.accelerator.wait_for_everyone()
    if trainer.accelerator.is_main_process:
        missing = missing_saved_files(config.output_dir)
        if missing:
            raise RuntimeError(f"save_model wrote no loadable model to {config.output_dir} (missing: {missing}); "
                               "see README 'Distributed training' for the engine's save settings")
        print(f"saved model and processor to {config.output_dir}")
    return trainer


def train_command(method: str, argv: list[str]) -> None:
    script_args, config = parse_training_args(method, argv)
    train, evaluation = load_training_data(script_args)
    run_training(method, script_args, config, train, evaluation)


# ------------------------------------------------------------------------------------------------- other commands


def make_tiny_model_command(argv: list[str]) -> None:
    from .models.families import family_names
    from .models.tiny import make_tiny_model

    p = argparse.ArgumentParser(prog="vlmalign make-tiny-model", description="Build a tiny random VLM offline.")
    p.add_argument("--family", required=True, choices=family_names())
    p.add_argument("--size", default="tiny", choices=["tiny", "small"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("out_dir")
    a = p.parse_args(argv)
    out = make_tiny_model(a.family, a.size, a.out_dir, seed=a.seed)
    print(f"wrote {a.family} ({a.size}) to {out}")


def make_data_command(argv: list[str]) -> None:
    from .data.synthetic import ANSWER_FORMATS, ROW_FORMATS, TASKS, make_data

    p = argparse.ArgumentParser(prog="vlmalign make-data", description="Generate a synthetic visual task.")
    p.add_argument("--task", default="color", choices=list(TASKS))
    p.add_argument("--format", default="sft", choices=list(ROW_FORMATS))
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--answer-format", default="answer", choices=list(ANSWER_FORMATS))
    p.add_argument("--save-as", default="disk", choices=["disk", "jsonl"])
    p.add_argument("out")
    a = p.parse_args(argv)
    out = make_data(a.task, a.format, a.n, a.seed, a.out, split=a.split, image_size=a.image_size,
                    answer_format=a.answer_format, fmt=a.save_as)
    print(f"wrote {a.n} {a.task} rows ({a.format}, {a.split}) to {out}")


def eval_command(argv: list[str]) -> None:
    from .data.io import load_dataset_any
    from .eval.evaluate import evaluate
    from .models.loading import load_model, load_processor

    p = argparse.ArgumentParser(prog="vlmalign eval", description="Accuracy, mean reward and pass@k of a model.")
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--split", default=None)
    p.add_argument("--reward", action="append", default=None, help="repeatable; default: accuracy")
    p.add_argument("--samples", type=int, default=1, help="1 = greedy; k > 1 samples k answers (pass@k)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--n", type=int, default=None, help="evaluate only the first n rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the JSON summary here (default: stdout)")
    p.add_argument("--trust-reward-code", action="store_true", help="allow --reward module:function (runs that code)")
    a = p.parse_args(argv)
    dataset = load_dataset_any(a.dataset, a.split)
    if a.n is not None:
        dataset = dataset.select(range(min(a.n, len(dataset))))
    model, processor = load_model(a.model), load_processor(a.model)
    result = evaluate(model, processor, dataset, rewards=a.reward or ["accuracy"], samples=a.samples,
                      temperature=a.temperature, max_new_tokens=a.max_new_tokens, progress=True, seed=a.seed,
                      trust_reward_code=a.trust_reward_code)
    text = json.dumps({"model": a.model, "dataset": a.dataset, **result.to_dict()}, indent=2)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
        print(f"wrote {a.out}")
    else:
        print(text)


def make_preferences_command(argv: list[str]) -> None:
    from .data.io import load_dataset_any, save_dataset
    from .recipes.preferences import make_preferences
    from .models.loading import load_model, load_processor

    p = argparse.ArgumentParser(prog="vlmalign make-preferences",
                                description="Sample K answers per prompt and write chosen/rejected pairs ranked by a reward.")
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--split", default=None)
    p.add_argument("--reward", default="accuracy")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--trust-reward-code", action="store_true", help="allow --reward module:function (runs that code)")
    a = p.parse_args(argv)
    model, processor = load_model(a.model), load_processor(a.model)
    pairs = make_preferences(model, processor, load_dataset_any(a.dataset, a.split), reward=a.reward,
                             samples=a.samples, temperature=a.temperature, max_new_tokens=a.max_new_tokens, seed=a.seed,
                             trust_reward_code=a.trust_reward_code)
    save_dataset(pairs, a.out)
    print(f"wrote {len(pairs)} preference pairs to {a.out}")


def demo_command(argv: list[str]) -> None:
    from .recipes.demo import main as demo_main
    demo_main(argv)


def compare_command(argv: list[str]) -> None:
    from .eval.compare import main as compare_main
    compare_main(argv)


def vllm_serve_command(argv: list[str]) -> None:
    from .rl.vllm_server import main as serve_main
    serve_main(argv)


COMMANDS = {
    "make-tiny-model": make_tiny_model_command,
    "make-data": make_data_command,
    "make-preferences": make_preferences_command,
    "eval": eval_command,
    "compare": compare_command,
    "demo": demo_command,
    "vllm-serve": vllm_serve_command,
}
TRAINING = ("sft", "dpo", "mpo", "grpo", "gspo")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    command, rest = argv[0], argv[1:]
    if command in TRAINING:
        train_command(command, rest)
    elif command in COMMANDS:
        COMMANDS[command](rest)
    else:
        raise SystemExit(f"unknown command {command!r}; commands: {', '.join([*TRAINING, *COMMANDS])}")


if __name__ == "__main__":
    main()
