"""Bad inputs, round 2 (issue 16): output folders (class 2) and resume (5). Nothing another run wrote is reused or
deleted; a resume never trusts a checkpoint it has not checked. One short SFT run (2 steps, a checkpoint at each) is
built once and copied into each test."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from PIL import Image

from vlmalign import SFTConfig, SFTTrainer
from vlmalign.rl.buffer import GenerationBatch, GenerationBuffer, load_buffer, save_buffer
from vlmalign.trainers import run_dir as runs
from vlmalign.trainers.checkpoint import CheckpointMismatchError

ROWS = [{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color ?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": f"<answer>{c}</answer>"}]}],
         "images": [Image.new("RGB", (28, 28), c)]} for c in ("red", "blue")]


def _trainer(model_dir, out, family_rows=ROWS, **kw):
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1,
                     disable_tqdm=True, report_to="none", **{"max_steps": 2, "save_strategy": "steps", "save_steps": 1,
                                                              **kw})
    return SFTTrainer(model=str(model_dir), args=args, train_dataset=family_rows)


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    _trainer(tiny_model_dir("qwen2_vl"), out).train()
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-1", "checkpoint-2"]
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def _files(folder):
    return {os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs}


# --------------------------------------------------------------------------------------------- 2. output folders


def test_new_run_over_another_runs_checkpoints_is_refused(tiny_model_dir, run_copy):
    before = _files(run_copy)
    with pytest.raises(runs.OutputDirInUseError, match=r"already holds checkpoints \(checkpoint-1, checkpoint-2\).*"
                                                       r"resume_from_checkpoint=True.*overwrite_output_dir=True"):
        _trainer(tiny_model_dir("qwen2_vl"), run_copy).train()
    assert _files(run_copy) == before  # nothing touched, the lock released
    assert not (run_copy / runs.LOCK_NAME).exists()


def test_overwrite_moves_the_old_run_aside_and_rotation_spares_it(tiny_model_dir, run_copy):
    old_id = json.loads((run_copy / "checkpoint-2" / "vlmalign_state.json").read_text())["run_id"]
    old = {name: _files(run_copy / name) for name in ("checkpoint-1", "checkpoint-2")}
    trainer = _trainer(tiny_model_dir("qwen2_vl"), run_copy, overwrite_output_dir=True, save_total_limit=1, max_steps=3)
    trainer.train()
    moved = run_copy / "previous-runs" / old_id
    assert {name: _files(moved / name) for name in old} == old  # every file of the old run kept
    assert sorted(n for n in os.listdir(run_copy) if n.startswith("checkpoint-")) == ["checkpoint-3"]
    assert json.loads((run_copy / "checkpoint-3" / "vlmalign_state.json").read_text())["run_id"] == trainer.run_id
    assert trainer.run_id != old_id


def test_resume_continues_the_run_identity(tiny_model_dir, run_copy):
    run_id = json.loads((run_copy / "checkpoint-2" / "vlmalign_state.json").read_text())["run_id"]
    trainer = _trainer(tiny_model_dir("qwen2_vl"), run_copy, max_steps=3)
    trainer.train(resume_from_checkpoint=True)
    assert trainer.run_id == run_id and trainer.state.global_step == 3


def test_rotation_never_deletes_checkpoints_of_another_run(tmp_path):
    for step, run_id in ((1, "other"), (2, "mine"), (3, "mine"), (4, None), (5, "mine")):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if run_id:
            (folder / "vlmalign_state.json").write_text(json.dumps({"run_id": run_id}))
    deleted = runs.rotate_own_checkpoints(str(tmp_path), 1, "mine")
    assert sorted(os.path.basename(p) for p in deleted) == ["checkpoint-2", "checkpoint-3"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "checkpoint-4", "checkpoint-5"]


def test_second_run_in_a_locked_folder_is_refused(tiny_model_dir, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / runs.LOCK_NAME).write_text(json.dumps(
            {"pid": holder.pid, "host": socket.gethostname(), "run_id": "abc", "started": 0}))
        with pytest.raises(runs.OutputDirInUseError, match=rf"in use by another training run \(pid {holder.pid}"):
            _trainer(tiny_model_dir("qwen2_vl"), tmp_path / "run").train()
        assert json.loads((tmp_path / "run" / runs.LOCK_NAME).read_text())["run_id"] == "abc"  # still theirs
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_of_a_dead_process_is_taken_over(tiny_model_dir, tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / runs.LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with caplog.at_level(logging.WARNING, logger="vlmalign"):
        trainer = _trainer(tiny_model_dir("qwen2_vl"), tmp_path / "run", max_steps=1, save_strategy="no")
        trainer.train()
    assert f"left by process {dead.pid}, which no longer exists" in caplog.text
    assert not (tmp_path / "run" / runs.LOCK_NAME).exists()


def test_two_trainers_of_one_process_cannot_share_a_folder(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    runs.acquire_lock(str(out), "first")
    with pytest.raises(runs.OutputDirInUseError, match=r"locked by another training run in this process"):
        _trainer(tiny_model_dir("qwen2_vl"), out, max_steps=1, save_strategy="no").train()


# ------------------------------------------------------------------------------------------------------ 5. resume


def test_truncated_newest_checkpoint_falls_back_with_a_warning(tiny_model_dir, run_copy, caplog):
    weights = run_copy / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    trainer = _trainer(tiny_model_dir("qwen2_vl"), run_copy, max_steps=3)
    with caplog.at_level(logging.INFO, logger="vlmalign"):
        trainer.train(resume_from_checkpoint=True)
    assert f"Skipping {run_copy / 'checkpoint-2'}: {weights} is truncated" in caplog.text
    assert f"Resuming from the last complete checkpoint, {run_copy / 'checkpoint-1'}" in caplog.text
    assert trainer.state.global_step == 3


def test_checkpoint_without_optimizer_state_is_refused(tiny_model_dir, run_copy):
    (run_copy / "checkpoint-2" / "optimizer.pt").unlink()
    with pytest.raises(ValueError, match=r"cannot resume from .*checkpoint-2: .*optimizer.pt is missing: resuming "
                                         r"would restart the optimizer"):
        _trainer(tiny_model_dir("qwen2_vl"), run_copy, max_steps=3).train(
            resume_from_checkpoint=str(run_copy / "checkpoint-2"))


def test_truncated_optimizer_state_named(tiny_model_dir, run_copy):
    optimizer = run_copy / "checkpoint-2" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"{optimizer} is truncated or corrupt"):
        _trainer(tiny_model_dir("qwen2_vl"), run_copy, max_steps=3).train(
            resume_from_checkpoint=str(run_copy / "checkpoint-2"))


def test_checkpoint_of_another_family_is_a_clear_error(tiny_model_dir, run_copy):
    with pytest.raises(CheckpointMismatchError, match=r"checkpoint-2 was written for another model: model_type "
                                                      r"'qwen2_vl' \(checkpoint\) vs 'llava' \(model\)"):
        _trainer(tiny_model_dir("llava_clip"), run_copy, max_steps=3).train(resume_from_checkpoint=True)


def _buffer(image_color="red"):
    rows = [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color ?"}]}],
             "images": [Image.new("RGB", (28, 28), image_color)], "_index": i} for i in range(2)]
    ids = torch.tensor([[5, 6], [7, 0]])
    batch = GenerationBatch(rows=rows, completion_ids=ids, completion_mask=(ids > 0).long(),
                            loss_mask=(ids > 0).long(), advantages=torch.tensor([0.5, -0.5]), num_items_in_batch=3.0)
    return GenerationBuffer(batch, steps_per_generation=2, seed=0)


def test_grpo_buffer_refuses_a_changed_dataset(tmp_path):
    path = str(tmp_path / "generation_buffer_rank0.safetensors")
    save_buffer(_buffer("red"), path)
    same = _buffer("red").batch.rows
    assert load_buffer(path, lambda i: same[i], "cpu").batch.advantages.tolist() == [0.5, -0.5]
    changed = _buffer("blue").batch.rows
    with pytest.raises(ValueError, match=r"sampled from dataset row 0, whose prompt or images are different now"):
        load_buffer(path, lambda i: changed[i], "cpu")
