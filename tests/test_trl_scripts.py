"""TRL users' script patterns, written here (no TRL code): TrlParser + configs + ModelConfig helpers + rewards +
trainers, on tiny local models and hub-style parquet folders, as TRL 1.16's VLM example scripts use them (sft_vlm,
sft_vlm_gemma3, dpo_vlm with and without streaming, mpo_vlm, grpo_vlm, gspo_vlm)."""

import dataclasses
import json
import logging
import math
import os

import datasets
import pytest
import torch
import yaml
from PIL import Image
from transformers import AutoModelForImageTextToText, TrainingArguments

from vlmalign import (DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, ModelConfig, ScriptArguments, SFTConfig,
                      SFTTrainer, TrlParser, get_kbit_device_map, get_peft_config, get_quantization_config)
from vlmalign.rewards import accuracy_reward, think_format_reward
from vlmalign.trainers.trl_fields import TRL_ARGUMENTS

FIELDS = os.path.join(os.path.dirname(__file__), "data", "trl_config_fields.json")
COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
SYSTEM_PROMPT = "Think first, inside <think></think> tags, then answer."


pytestmark = pytest.mark.usefixtures("one_thread")


def _image(color):
    return Image.new("RGB", (28, 28), COLORS[color])


def _turn(role, *parts):
    return {"role": role, "content": [{"type": "image", "text": None} if p is None else {"type": "text", "text": p}
                                      for p in parts]}


def _hub_folder(path, rows, features, splits=("train", "test")):
    """Write `rows` as a hub-style dataset folder: data/<split>-00000-of-00001.parquet."""
    ds = datasets.Dataset.from_list(rows, features=features)
    parts = ds.train_test_split(test_size=0.25, seed=0) if len(splits) > 1 else {"train": ds}
    os.makedirs(path / "data", exist_ok=True)
    for split in splits:
        parts[split].to_parquet(str(path / "data" / f"{split}-00000-of-00001.parquet"))
    return str(path)


TURN = [{"role": datasets.Value("string"),
         "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}]


@pytest.fixture(scope="module")
def sft_folder(tmp_path_factory):
    rows = [{"messages": [_turn("user", None, "Colour?"), _turn("assistant", c)], "images": [_image(c)],
             "source": "synthetic"} for c in list(COLORS) * 4]
    features = datasets.Features({"messages": TURN, "images": datasets.List(datasets.Image()),
                                  "source": datasets.Value("string")})
    return _hub_folder(tmp_path_factory.mktemp("sft"), rows, features)


@pytest.fixture(scope="module")
def pref_folder(tmp_path_factory):
    rows = [{"prompt": [_turn("user", None, "Colour?")], "chosen": [_turn("assistant", c)],
             "rejected": [_turn("assistant", "purple")], "images": [_image(c)]} for c in list(COLORS) * 4]
    features = datasets.Features({"prompt": TURN, "chosen": TURN, "rejected": TURN,
                                  "images": datasets.List(datasets.Image())})
    return _hub_folder(tmp_path_factory.mktemp("pref"), rows, features)


@pytest.fixture(scope="module")
def r1_folder(tmp_path_factory):
    """multimodal-open-r1's schema: image / problem / solution (tagged), no prompt."""
    rows = [{"image": _image(c), "problem": f"What is {a} + {a}?", "solution": f"<answer> {2 * a} </answer>"}
            for a, c in zip(range(1, 9), list(COLORS) * 3)]
    features = datasets.Features({"image": datasets.Image(), "problem": datasets.Value("string"),
                                  "solution": datasets.Value("string")})
    return _hub_folder(tmp_path_factory.mktemp("r1"), rows, features, splits=("train",))


def _common(tmp_path):
    return ["--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--logging_steps", "1", "--save_strategy",
            "no", "--disable_tqdm", "true", "--seed", "0"]


def _load_model(model_args):
    dtype = model_args.dtype if model_args.dtype in ["auto", None] else getattr(torch, model_args.dtype)
    kwargs = dict(revision=model_args.model_revision, attn_implementation=model_args.attn_implementation, dtype=dtype)
    quantization = get_quantization_config(model_args)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    return AutoModelForImageTextToText.from_pretrained(model_args.model_name_or_path, **kwargs)


def _losses(trainer):
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


# ----------------------------------------------------------------------------------------------- parser & helpers


def test_parser_yaml_env_command_line_and_helpers(tmp_path, monkeypatch):
    monkeypatch.delenv("VLMALIGN_TEST_ENV", raising=False)
    config = tmp_path / "dpo.yaml"
    config.write_text(yaml.safe_dump({"env": {"VLMALIGN_TEST_ENV": "set"}, "model_name_or_path": "m", "beta": 0.3,
                                      "dataset_name": "d", "learning_rate": 1e-4, "use_peft": True}))
    parser = TrlParser((ScriptArguments, DPOConfig, ModelConfig))
    script, args, model = parser.parse_args_and_config(
        ["--config", str(config), "--output_dir", str(tmp_path), "--beta", "0.2", "--lora_target_modules",
         "q_proj,", "v_proj"])
    assert os.environ["VLMALIGN_TEST_ENV"] == "set"
    assert (script.dataset_name, model.model_name_or_path, args.learning_rate) == ("d", "m", 1e-4)  # from YAML
    assert args.beta == 0.2                                     # the command line overrides the YAML
    assert args.loss_type == ["sigmoid"]                        # no loss_type anywhere: TRL's default, no crash
    assert model.lora_target_modules == ["q_proj", "v_proj"]    # TRL's docstrings' `"q_proj", "v_proj"` spelling
    peft = get_peft_config(model)
    assert (peft.r, peft.lora_alpha, peft.lora_dropout, set(peft.target_modules)) == (16, 32, 0.05,
                                                                                      {"q_proj", "v_proj"})
    assert get_peft_config(ModelConfig()) is None and get_quantization_config(ModelConfig()) is None
    # MPO's list arguments, and GRPO's `--scale_rewards False`
    _, mpo, _ = parser.parse_args_and_config(["--output_dir", str(tmp_path), "--loss_type", "sigmoid", "bco_pair",
                                              "sft", "--loss_weights", "0.8", "0.2", "1.0"])
    assert (mpo.loss_type, mpo.loss_weights) == (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0])
    _, grpo, _ = TrlParser((ScriptArguments, GRPOConfig, ModelConfig)).parse_args_and_config(
        ["--output_dir", str(tmp_path), "--scale_rewards", "False", "--num_generations", "2",
         "--per_device_train_batch_size", "2"])
    assert grpo.scale_rewards == "none"
    # a YAML key no dataclass has is an error naming it
    config.write_text(yaml.safe_dump({"no_such_key": 1}))
    with pytest.raises(ValueError, match="no_such_key"):
        parser.parse_args_and_config(["--config", str(config), "--output_dir", str(tmp_path)])


def test_quantization_is_refused_clearly_without_cuda(tiny_model_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine can quantize")
    assert get_kbit_device_map() is None
    with pytest.raises(RuntimeError, match="load_in_4bit: .*(bitsandbytes|CUDA)"):
        get_quantization_config(ModelConfig(load_in_4bit=True))
    from transformers import BitsAndBytesConfig
    args = GRPOConfig(output_dir=str(tmp_path), num_generations=2, per_device_train_batch_size=2)
    with pytest.raises(RuntimeError, match="quantization_config was given, but .*(bitsandbytes|CUDA)"):
        GRPOTrainer(model=tiny_model_dir("qwen2_vl"), reward_funcs=[think_format_reward], args=args,
                    train_dataset=[{"prompt": "hi"}] * 2, quantization_config=BitsAndBytesConfig(load_in_4bit=True))


def _non_default(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    return "some-other-value" if not isinstance(value, (list, dict)) else {"x": 1}


@pytest.mark.parametrize("cls", [SFTConfig, DPOConfig, GRPOConfig])
def test_every_trl_argument_is_accepted_or_refused_with_a_reason(cls, tmp_path):
    with open(FIELDS, encoding="utf-8") as f:
        trl_fields = json.load(f)[cls.__name__]
    ours = {f.name: f for f in dataclasses.fields(cls)}
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    table = TRL_ARGUMENTS[cls.__name__]
    assert sorted(set(trl_fields) - set(ours)) == []               # every TRL argument exists here
    own = sorted(name for name in trl_fields if name not in base)
    unclassified = [n for n in own if n not in table and n not in {"loss_type", "beta", "max_length"}
                    and n not in _NATIVE[cls.__name__]]
    assert unclassified == []
    small = dict(output_dir=str(tmp_path))
    if cls is GRPOConfig:
        small.update(num_generations=2, per_device_train_batch_size=2)
    cls(**small)                                                    # every default is accepted
    refused = [n for n, (status, _) in table.items() if status in ("refused", "vllm", "packing") and n in ours]
    assert len(refused) >= 9                                       # SFTConfig: 9 since router_aux_loss_coef acts
    for name in refused:
        default = ours[name].default
        with pytest.raises(ValueError, match=f"{name}=.* is not supported: .+"):
            cls(**small, **{name: _non_default(default)})


# TRL arguments that vlmalign's configs define natively (same name and meaning): checked by their own tests.
_NATIVE = {
    "SFTConfig": {"model_init_kwargs", "disable_dropout", "max_length"},
    "DPOConfig": {"model_init_kwargs", "disable_dropout", "precompute_ref_log_probs", "precompute_ref_batch_size",
                  "label_smoothing", "loss_weights", "discopop_tau", "max_length"},
    "GRPOConfig": {"model_init_kwargs", "disable_dropout", "num_generations", "max_completion_length",
                   "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "generation_batch_size",
                   "steps_per_generation", "num_iterations", "epsilon", "epsilon_high", "delta",
                   "importance_sampling_level", "scale_rewards", "mask_truncated_completions", "reward_weights",
                   "shuffle_dataset", "log_completions"},
}


# ------------------------------------------------------------------------------------------------ trainers


def test_sft_script_pattern_parquet_folder_lora_and_unused_columns(tiny_model_dir, sft_folder, tmp_path):
    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig))
    script, args, model_args = parser.parse_args_and_config(
        ["--dataset_name", sft_folder, "--model_name_or_path", str(tiny_model_dir("qwen2_vl")), "--use_peft",
         "--lora_target_modules", "all-linear", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
         *_common(tmp_path)])
    args.max_length = None                                           # as sft_vlm.py does
    assert args.remove_unused_columns is True                        # TRL's default: the extra column is dropped
    dataset = datasets.load_dataset(script.dataset_name, name=script.dataset_config)
    trainer = SFTTrainer(model=_load_model(model_args), args=args, train_dataset=dataset[script.dataset_train_split],
                         eval_dataset=dataset[script.dataset_test_split] if args.eval_strategy != "no" else None,
                         peft_config=get_peft_config(model_args))
    trainer.train()
    trainer.save_model(args.output_dir)
    losses = _losses(trainer)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert os.path.isfile(os.path.join(args.output_dir, "adapter_config.json"))


def test_dpo_streaming_and_mpo_script_patterns(tiny_model_dir, pref_folder, tmp_path):
    parser = TrlParser((ScriptArguments, DPOConfig, ModelConfig))
    script, args, model_args = parser.parse_args_and_config(
        ["--dataset_name", pref_folder, "--dataset_streaming", "--model_name_or_path", str(tiny_model_dir("qwen2_vl")),
         "--per_device_train_batch_size", "2", "--dataset_num_proc", "1", "--use_peft", "--loss_type", "sigmoid",
         "bco_pair", "sft", "--loss_weights", "0.8", "0.2", "1.0", "--learning_rate", "1e-3", *_common(tmp_path)])
    stream = datasets.load_dataset(script.dataset_name, streaming=script.dataset_streaming)
    train = stream[script.dataset_train_split].map(lambda row: row)  # a script's own map on the stream
    assert isinstance(train, datasets.IterableDataset)
    trainer = DPOTrainer(model=_load_model(model_args), args=args, train_dataset=train,
                         peft_config=get_peft_config(model_args))
    assert len(trainer.train_dataset) == 2 * 2                       # max_steps x batch rows read from the stream
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and all(math.isfinite(log["loss/bco_pair"]) for log in logs)
    args.max_steps = -1
    with pytest.raises(ValueError, match="streaming .* set max_steps"):
        DPOTrainer(model=_load_model(model_args), args=args, train_dataset=train)


def test_grpo_script_pattern_problem_solution_rows_and_trl_rewards(tiny_model_dir, r1_folder, tmp_path, caplog):
    parser = TrlParser((ScriptArguments, GRPOConfig, ModelConfig))
    _, args, model_args = parser.parse_args_and_config(
        ["--model_name_or_path", str(tiny_model_dir("qwen2_vl")), "--max_completion_length", "6", "--use_peft",
         "--lora_target_modules", "q_proj", "v_proj", "--per_device_train_batch_size", "4", "--num_generations", "2",
         "--log_completions", "--num_completions_to_print", "2", *_common(tmp_path), "--max_steps", "1"])
    dtype = model_args.dtype if model_args.dtype in ["auto", None] else getattr(torch, model_args.dtype)
    args.model_init_kwargs = dict(revision=model_args.model_revision, attn_implementation=model_args.attn_implementation,
                                  dtype=dtype)
    dataset = datasets.load_dataset(r1_folder, split="train").train_test_split(test_size=2, seed=42)
    dataset = dataset.map(lambda row: {"prompt": [{"role": "system", "content": SYSTEM_PROMPT},
                                                  {"role": "user", "content": row["problem"]}]})
    dataset = dataset.filter(lambda row: row["image"].size[0] < 512)
    trainer = GRPOTrainer(model=model_args.model_name_or_path, args=args, reward_funcs=[think_format_reward,
                          accuracy_reward], train_dataset=dataset["train"], quantization_config=None,
                          peft_config=get_peft_config(model_args))
    with caplog.at_level(logging.INFO, logger="vlmalign.trainers.grpo"):
        trainer.train()
    printed = [r.getMessage() for r in caplog.records if " completion " in r.getMessage()]
    assert len(printed) == 2                                        # num_completions_to_print
    log = next(log for log in trainer.state.log_history if "loss" in log)
    assert "rewards/think_format_reward/mean" in log and "rewards/accuracy_reward/mean" in log
    assert os.path.isfile(os.path.join(args.output_dir, "completions.jsonl"))


def test_cli_maps_problem_solution_rows_to_prompts(tiny_model_dir, r1_folder, tmp_path):
    from vlmalign.cli import load_training_data, parse_training_args, run_training
    from vlmalign.rl.rewards import accuracy_reward as builtin_accuracy

    script, config = parse_training_args("grpo", [
        "--model", str(tiny_model_dir("qwen2_vl")), "--dataset", r1_folder, "--prompt_column", "problem",
        "--system_prompt", SYSTEM_PROMPT, "--reward_funcs", "format", "accuracy", "--num_generations", "2",
        "--per_device_train_batch_size", "4", "--max_completion_length", "4", *_common(tmp_path), "--max_steps", "1"])
    train, _ = load_training_data(script)
    row = train[0]
    assert "problem" not in train.column_names and row["solution"].startswith("<answer>")
    assert [t["role"] for t in row["prompt"]] == ["system", "user"]
    assert row["prompt"][1]["content"][0]["type"] == "image" and row["prompt"][1]["content"][1]["text"].startswith(
        "What is")
    # the built-in accuracy reward reads the tagged solution by its content
    right, wrong = row["solution"].replace("<answer>", "").replace("</answer>", "").strip(), "-1"
    assert builtin_accuracy(completions=[f"<answer>{right}</answer>", right, wrong],
                            solution=[row["solution"]] * 3) == [1.0, 1.0, 0.0]
    trainer = run_training("grpo", script, config, train)
    assert any("rewards/accuracy_reward/mean" in log for log in trainer.state.log_history)
    with pytest.raises(ValueError, match="prompt_column 'question' is not a column"):
        script.prompt_column = "question"
        load_training_data(script)


def test_sft_shuffle_dataset_and_trust_remote_code(tiny_model_dir, tmp_path):
    rows = [{"messages": [_turn("user", f"Say {i}"), _turn("assistant", str(i))]} for i in range(8)]
    args = SFTConfig(output_dir=str(tmp_path), shuffle_dataset=True, seed=3, trust_remote_code=True, max_steps=1)
    assert args.model_init_kwargs == {"trust_remote_code": True}
    trainer = SFTTrainer(model=str(tiny_model_dir("qwen2_vl")), args=args, train_dataset=rows)
    order = [trainer.train_dataset[i]["messages"][1]["content"][0]["text"] for i in range(8)]
    import random
    expected = list(range(8))
    random.Random(3).shuffle(expected)                              # shuffled once, seeded by `seed`
    assert order == [str(i) for i in expected]
