"""Bad inputs, round 2 (issue 16), the cheap ones: loaders (classes 1), config values and the CLI's --config (8),
model folders (6, 10), reward functions (9). No training here; each case asserts the exact outcome: the error names
the row / field / file, or the documented conversion happens."""

import json
import os
import time

import pytest
import torch
from PIL import Image

from vlmalign import GRPOConfig, SFTConfig
from vlmalign.data.formats import normalize_row
from vlmalign.data.io import load_dataset_any
from vlmalign.rl.reward_guard import guard_reward_function
from vlmalign.rl.rewards import RewardFunctionError, compute_rewards, get_reward_function


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def png(tmp_path):
    Image.new("RGB", (28, 28), (200, 10, 10)).save(tmp_path / "red.png")
    return "red.png"


# ------------------------------------------------------------------------------------------------ 1. loaders


def test_loader_keeps_images_when_row_0_has_none(tmp_path, png):
    rows = [{"prompt": "how many shapes ?"}, {"prompt": "what color ?", "images": [png]}]
    ds = load_dataset_any(str(_write_jsonl(tmp_path / "d.jsonl", rows)))
    assert ds.column_names == ["prompt", "images"]
    assert ds[0]["images"] is None
    assert [im.getpixel((0, 0)) for im in ds[1]["images"]] == [(200, 10, 10)]
    assert normalize_row(ds[0], "prompt")["images"] == [] and len(normalize_row(ds[1], "prompt")["images"]) == 1


def test_loader_keeps_a_column_missing_from_row_0(tmp_path):
    rows = [{"prompt": "a ?"}, {"prompt": "b ?", "solution": "red"}, {"prompt": "c ?", "solution": "blue"}]
    ds = load_dataset_any(str(_write_jsonl(tmp_path / "d.jsonl", rows)))
    assert ds["solution"] == [None, "red", "blue"]


def test_loader_json_array_union_of_columns(tmp_path):
    rows = [{"prompt": "a ?", "solution": "1"}, {"prompt": "b ?", "difficulty": 3}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    ds = load_dataset_any(str(tmp_path / "d.json"))
    assert ds.to_list() == [{"prompt": "a ?", "solution": "1", "difficulty": None},
                            {"prompt": "b ?", "solution": None, "difficulty": 3}]


def test_loader_rejects_conflicting_types_naming_row_and_column(tmp_path):
    rows = [{"prompt": "a ?", "solution": "red"}, {"prompt": "b ?"}, {"prompt": "c ?", "solution": ["red", "blue"]}]
    with pytest.raises(ValueError, match=r"row 2, column 'solution': a list value .* row 0 holds a string"):
        load_dataset_any(str(_write_jsonl(tmp_path / "d.jsonl", rows)))


def test_loader_rejects_nested_structure_conflict_naming_row(tmp_path):
    rows = [{"prompt": "a", "meta": [{"k": 1}]}, {"prompt": "b", "meta": [{"k": 2}]}, {"prompt": "c", "meta": ["x"]}]
    with pytest.raises(ValueError, match=r"row 2, column 'meta'"):
        load_dataset_any(str(_write_jsonl(tmp_path / "d.jsonl", rows)))


def test_loader_mixes_string_and_typed_message_content(tmp_path):
    typed = [{"role": "user", "content": "what color ?"},
             {"role": "assistant", "content": [{"type": "text", "text": "<answer>red</answer>"}]}]
    ds = load_dataset_any(str(_write_jsonl(tmp_path / "d.jsonl", [{"messages": typed}])))
    plain = [{"role": "user", "content": "what color ?"}, {"role": "assistant", "content": "<answer>red</answer>"}]
    assert normalize_row(ds[0], "sft")["messages"] == normalize_row({"messages": plain}, "sft")["messages"]


def test_loader_single_jsonl_line_with_list_values_is_one_row(tmp_path):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    ds = load_dataset_any(str(_write_jsonl(tmp_path / "d.jsonl", [row])))
    assert len(ds) == 1 and len(ds[0]["messages"]) == 2


def test_loader_bad_jsonl_line_named(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"\n')
    with pytest.raises(ValueError, match=r"line 2 \(row 1\) is not valid JSON"):
        load_dataset_any(str(tmp_path / "d.jsonl"))


def test_loader_non_object_row_named(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([{"prompt": "a"}, ["prompt", "b"]]))
    with pytest.raises(ValueError, match=r"row 1 is a list, expected a JSON object"):
        load_dataset_any(str(tmp_path / "d.json"))


def test_loader_empty_file(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"the dataset is empty \(0 rows\)"):
        load_dataset_any(str(tmp_path / "d.jsonl"))


def test_loader_missing_image_file_names_row_and_column(tmp_path, png):
    rows = [{"prompt": "a", "images": [png]}, {"prompt": "b", "images": ["gone.png"]}]
    with pytest.raises(FileNotFoundError, match=r"row 1, column 'images': image file not found: .*gone.png"):
        load_dataset_any(str(_write_jsonl(tmp_path / "d.jsonl", rows)))


# ------------------------------------------------------------------------------------------- 8. config values


def _grpo(**kw):
    return GRPOConfig(output_dir="unused", per_device_train_batch_size=2, num_generations=2, **kw)


@pytest.mark.parametrize("field,value,rule", [("beta", -0.1, ">= 0"), ("epsilon", -0.2, "> 0"),
                                              ("max_completion_length", 0, ">= 1"), ("temperature", 0.0, "> 0"),
                                              ("top_p", 1.5, "in \\(0, 1\\]"), ("reward_timeout", 0.0, "> 0")])
def test_grpo_config_values_out_of_range(field, value, rule):
    with pytest.raises(ValueError, match=rf"{field} must be {rule}.*, got {value}"):
        _grpo(**{field: value})


def test_non_integer_max_steps_refused_and_integral_float_converted():
    with pytest.raises(ValueError, match=r"max_steps must be an integer, got 2.5"):
        SFTConfig(output_dir="unused", max_steps=2.5)
    config = SFTConfig(output_dir="unused", max_steps=3.0)
    assert config.max_steps == 3 and type(config.max_steps) is int


def test_string_learning_rate_from_python_refused():
    with pytest.raises(TypeError, match=r"learning_rate must be a number, got str '3e-3'.*3.0e-3"):
        SFTConfig(output_dir="unused", learning_rate="3e-3")


def test_string_for_bool_field_refused():
    with pytest.raises(TypeError, match=r"freeze_vision_tower must be true or false, got str 'yes'"):
        SFTConfig(output_dir="unused", freeze_vision_tower="yes")


# --------------------------------------------------------------------------------------------- 8. CLI --config


def _parse(argv):
    from vlmalign.cli import parse_training_args

    return parse_training_args("sft", argv)


@pytest.mark.parametrize("text,kind", [("- learning_rate\n- 0.1\n", "list"), ("just a string\n", "str")])
def test_yaml_that_is_not_a_mapping(tmp_path, text, kind):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(SystemExit, match=rf"c.yaml: the file must hold a mapping of option: value, but holds a {kind}"):
        _parse(["--config", str(tmp_path / "c.yaml")])


def test_config_equals_form_and_yaml_string_number(tmp_path):
    (tmp_path / "c.yaml").write_text(f"model: m\ndataset: d\noutput_dir: {tmp_path}\nlearning_rate: 3e-3\n")
    script, config = _parse([f"--config={tmp_path / 'c.yaml'}", "--max_steps", "4"])
    assert (script.model, script.dataset, config.max_steps) == ("m", "d", 4)
    assert config.learning_rate == pytest.approx(0.003)  # YAML reads 3e-3 as a string: converted by the parser


@pytest.mark.parametrize("argv", [["--config"], ["--config", "--max_steps", "3"], ["--config="]])
def test_config_without_value(argv):
    with pytest.raises(SystemExit, match=r"--config needs a file"):
        _parse(argv)


def test_config_given_twice_and_invalid_yaml(tmp_path):
    (tmp_path / "a.yaml").write_text("model: m\n")
    with pytest.raises(SystemExit, match=r"--config given 2 times"):
        _parse(["--config", str(tmp_path / "a.yaml"), f"--config={tmp_path / 'a.yaml'}"])
    (tmp_path / "b.yaml").write_text("model: [unclosed\n")
    with pytest.raises(SystemExit, match=r"b.yaml: not valid YAML"):
        _parse(["--config", str(tmp_path / "b.yaml")])


# ---------------------------------------------------------------------------------------- 6, 10. model folders


def test_lora_adapter_folder_given_as_model(tmp_path):
    from vlmalign.models.loading import load_model

    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/models/base-vlm",
                                                              "peft_type": "LORA"}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"is a PEFT adapter folder .* give the base model \(/models/base-vlm\)"):
        load_model(str(tmp_path))


def test_pickle_only_model_folder_refused_on_purpose(tmp_path):
    from vlmalign.models.loading import load_model

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match=r"holds only pickle weights \(pytorch_model.bin\).*safetensors only, on "
                                         r"purpose.*can run arbitrary code"):
        load_model(str(tmp_path))


def test_folder_without_config_is_not_a_model(tmp_path):
    from vlmalign.models.loading import load_model

    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"is not a model folder: it has no config.json"):
        load_model(str(tmp_path))


# ------------------------------------------------------------------------------------------- 9. reward functions


def _batch(n=2):
    image = Image.new("RGB", (4, 4), "red")
    return dict(prompts=["p"] * n, completions=["a"] * n, completion_ids=[[1]] * n,
                columns={"images": [[image]] * n}), image


def test_reward_timeout_names_the_function():
    def slow_reward(completions, **kwargs):
        time.sleep(30)
        return [1.0] * len(completions)

    batch, _ = _batch()
    start = time.monotonic()
    with pytest.raises(RewardFunctionError, match=r"'slow_reward' did not return within reward_timeout=0.2s"):
        compute_rewards([guard_reward_function(slow_reward, timeout=0.2)], **{k: v for k, v in batch.items()})
    assert time.monotonic() - start < 5  # no per-sample retries of a timed-out function


def test_reward_function_cannot_change_training_images():
    def vandal_reward(completions, images, **kwargs):
        for row in images:
            row[0].paste((0, 0, 255), (0, 0, 4, 4))
            row.append("extra")
        return [1.0] * len(completions)

    batch, image = _batch()
    per_func, _ = compute_rewards([guard_reward_function(vandal_reward)], **batch)
    assert per_func.tolist() == [[1.0], [1.0]]
    assert image.getpixel((0, 0)) == (255, 0, 0) and batch["columns"]["images"][0] == [image]


def test_module_function_reward_needs_opt_in():
    with pytest.raises(ValueError, match=r"'json:dumps' names code to import and run.*trust_reward_code=True"):
        get_reward_function("json:dumps")
    assert get_reward_function("json:dumps", trust_reward_code=True) is json.dumps


def test_grpo_trainer_refuses_module_reward_without_flag(tmp_path):
    from vlmalign import GRPOTrainer

    with pytest.raises(ValueError, match=r"'os:getcwd' names code to import and run"):
        GRPOTrainer(model="never-loaded", reward_funcs=["os:getcwd"], args=_grpo(), train_dataset=[])
    assert os.getcwd()  # (nothing imported or called by the refused spec)


def test_async_reward_with_timeout_returns_values():
    async def quick_reward(completions, **kwargs):
        return [float(len(c)) for c in completions]

    batch, _ = _batch()
    per_func, total = compute_rewards([guard_reward_function(quick_reward, timeout=5)], **batch)
    assert total.tolist() == [1.0, 1.0]
    assert torch.equal(per_func[:, 0], total)
