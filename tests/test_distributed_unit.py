"""One-process checks of the distributed pieces (the engine matrix itself is tests/test_engines.py): engine
settings refused up front, the CPU engine switch staying off where it must, the zero-weighted vision pass."""

import pytest
import torch

from vlmalign import SFTConfig, SFTTrainer
from vlmalign.data.synthetic import make_dataset
from vlmalign.trainers.engines import cpu_engines
from vlmalign.trainers.engines.saved import missing_saved_files
from vlmalign.models import vision_balance
from vlmalign.models.families import family_names, get_family
from vlmalign.models.forward import unwrap_model


def test_fsdp1_is_refused_with_a_pointer_to_fsdp2(monkeypatch, tmp_path):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        SFTConfig(output_dir=str(tmp_path))
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    with pytest.raises(ValueError, match="FSDP2"):   # the same through TrainingArguments' own fsdp options
        SFTConfig(output_dir=str(tmp_path), fsdp="full_shard", fsdp_config={"version": 1})


def test_cpu_engine_switch_only_for_launched_multi_process_jobs(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not cpu_engines.should_engage()                  # not launched: accelerate's behaviour is untouched
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not cpu_engines.should_engage()                  # one process
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cpu_engines.should_engage() == (not cpu_engines.has_accelerator())
    monkeypatch.setenv("VLMALIGN_CPU_ENGINES", "0")
    assert not cpu_engines.should_engage()                  # opt-out
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert cpu_engines.requested_engine() == "deepspeed"


def test_missing_saved_files_names_what_is_absent(tmp_path):
    assert missing_saved_files(str(tmp_path / "nope")) == ["the folder itself"]
    (tmp_path / "config.json").write_text("{}")
    assert missing_saved_files(str(tmp_path)) == ["weights (model.safetensors / model.safetensors.index.json / "
                                                  "adapter_model.safetensors)"]
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert missing_saved_files(str(tmp_path)) == []


def _text_only_batch(trainer):
    rows = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "how many shapes are there ?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "<answer>3</answer>"}]}],
             "images": []}] * 2
    from datasets import Dataset
    from vlmalign.data.dataset import prepare_rows

    prepared = prepare_rows(Dataset.from_list(rows), "sft", trainer.encoder, name="t", max_length=256,
                            truncation_policy="raise", max_image_pixels=None)
    return trainer.data_collator([prepared[i] for i in range(len(prepared))])


@pytest.mark.parametrize("family", family_names())
def test_vision_pass_on_text_only_batch_is_exactly_zero(tiny_model_dir, tmp_path, monkeypatch, family):
    """In a multi-process run a text-only batch runs the vision tower (and projector) on a dummy image: the loss is
    bit-identical and every vision / projector parameter a batch with images trains gets a gradient of exactly 0
    (instead of none, which breaks gradient collectives); a deep copy (a frozen reference) runs its own tower."""
    trainer = SFTTrainer(model=str(tiny_model_dir(family)), train_dataset=make_dataset("color", "sft", n=4),
                         args=SFTConfig(output_dir=str(tmp_path), max_steps=1, disable_tqdm=True, report_to="none"))
    model = trainer.model
    fam = get_family(unwrap_model(model))
    batch = _text_only_batch(trainer)
    assert "pixel_values" not in batch
    vision = [p for n, p in model.named_parameters() if fam.is_vision_param(n) or fam.is_projector_param(n)]
    assert vision

    def loss_and_grads(distributed: bool):
        monkeypatch.setattr(vision_balance, "_distributed", lambda: distributed)
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        return loss.detach(), [p.grad for p in vision]

    # the parameters a batch with images trains (LLaVA's last vision layer is unused: vision_feature_layer=-2)
    images = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert "pixel_values" in images
    model.zero_grad(set_to_none=True)
    trainer.compute_loss(model, images).backward()
    used = [p.grad is not None for p in vision]
    assert any(used)
    plain_loss, plain_grads = loss_and_grads(False)
    assert all(g is None for g in plain_grads)
    loss, grads = loss_and_grads(True)
    assert torch.equal(loss, plain_loss)
    assert [g is not None for g in grads] == used
    assert all(torch.count_nonzero(g) == 0 for g in grads if g is not None)
    # decoding steps (a non-empty cache) never run the tower; a deep copy runs its own
    import copy

    model.zero_grad(set_to_none=True)
    ref = copy.deepcopy(unwrap_model(model))
    ref_vision = [p for n, p in ref.named_parameters() if fam.is_vision_param(n) or fam.is_projector_param(n)]
    out = ref(**{k: v for k, v in batch.items() if k != "labels"})
    out.logits.sum().backward()
    assert [p.grad is not None for p in ref_vision] == used
    assert all(torch.count_nonzero(p.grad) == 0 for p in ref_vision if p.grad is not None)
    assert all(p.grad is None for p in vision)            # the copy's pass did not touch the policy


def test_rows_are_validated_once_on_the_main_process(tiny_model_dir, tmp_path):
    """2 processes (gloo): only the main process decodes images and renders rows with the chat template while the
    trainer is built; the other gets the same kept rows. A bad row found there stops both with the same message,
    naming the row (no process left waiting)."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "scripts" / "validate_once_two_process.py"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "result"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), str(script),
           str(tiny_model_dir("qwen2_vl")), str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    main, other = (json.loads(Path(f"{out}.{rank}.json").read_text()) for rank in (0, 1))
    assert (main["world_size"], other["world_size"]) == (2, 2)
    assert main["decoded_images"] >= 6 and main["template_checks"] == 1   # 6 rows, one image each
    assert other["decoded_images"] == 0 and other["template_checks"] == 0
    assert main["rows"] == other["rows"] == list(range(6))
    assert main["error"] == other["error"]
    assert main["error"].startswith("DataValidationError") and "row 3" in main["error"]
