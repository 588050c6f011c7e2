"""Every example script runs with its real-model YAML, on a tiny model and a local synthetic dataset instead of hub
ids (the same code path a user runs), for two steps."""

import subprocess
import sys
from pathlib import Path

import pytest

from vlmalign.data.synthetic import make_dataset

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TINY = ["--max_steps", "2", "--bf16", "false", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps",
        "1", "--max_length", "512", "--save_strategy", "no", "--logging_steps", "1", "--report_to", "none"]


def _run(script, config, model, dataset, out, extra=()):
    cmd = [sys.executable, str(EXAMPLES / script), "--config", str(EXAMPLES / config), "--model", str(model),
           "--dataset", str(dataset), "--output_dir", str(out), *TINY, *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (Path(out) / "processor_config.json").exists()
    return result


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("example_data")
    make_dataset("color", "sft", n=16, seed=0).save_to_disk(str(root / "sft"))
    make_dataset("color", "preference", n=16, seed=0).save_to_disk(str(root / "pref"))
    # the schema of lmms-lab/multimodal-open-r1-8k-verified: image, problem, solution
    prompts = make_dataset("color", "prompt", n=16, seed=0, answer_format="think")
    prompts = prompts.map(lambda r: {"image": r["images"][0], "problem": r["prompt"][0]["content"][1]["text"]},
                          remove_columns=["prompt", "images"])
    prompts.save_to_disk(str(root / "r1"))
    return root


def test_sft_example(tiny_model_dir, data, tmp_path):
    _run("sft.py", "sft_smolvlm.yaml", tiny_model_dir("smolvlm"), data / "sft", tmp_path / "out")


@pytest.mark.parametrize("config", ["dpo_qwen25vl.yaml", "mpo_qwen25vl.yaml"])
def test_dpo_and_mpo_examples(tiny_model_dir, data, tmp_path, config):
    result = _run("dpo.py", config, tiny_model_dir("qwen2_5_vl"), data / "pref", tmp_path / "out")
    if config.startswith("mpo"):
        assert "loss/bco_pair" in result.stdout + result.stderr


@pytest.mark.parametrize("config", ["grpo_qwen25vl.yaml", "gspo_qwen25vl.yaml"])
def test_grpo_and_gspo_examples(tiny_model_dir, data, tmp_path, config):
    _run("grpo.py", config, tiny_model_dir("qwen2_5_vl"), data / "r1", tmp_path / "out",
         extra=["--num_generations", "2", "--max_completion_length", "8"])


def test_notebook_executes(tmp_path):
    """The walkthrough notebook (SFT -> MPO -> GRPO with inline plots) runs top to bottom."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(EXAMPLES / "walkthrough.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # the task image and the plots
    final = [c for c in nb.cells if c.cell_type == "code"][3]["outputs"][-1]["data"]["text/plain"]
    assert "SFT + MPO + GRPO" in final
