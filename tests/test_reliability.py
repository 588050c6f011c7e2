"""Reliability of every vlmalign trainer (through VLMTrainer): exact resume, atomic checkpoints under SIGKILL,
non-finite loss / gradient guard, safetensors-only weights. See docs/reliability.md."""

import importlib.util
import json
import logging
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from resume_utils import assert_same_losses, run_and_resume, step_losses
from vlmalign import SFTConfig, SFTTrainer
from vlmalign.data.synthetic import make_dataset
from vlmalign.trainers.checkpoint import last_complete_checkpoint
from vlmalign.trainers.guards import NonFiniteError

ROOT = Path(__file__).resolve().parent.parent
KILL_SCRIPT = ROOT / "tests" / "scripts" / "kill_during_save.py"
DATA = make_dataset("color", "sft", n=32, seed=0)


def _args(output_dir, **kw):
    base = dict(output_dir=str(output_dir), per_device_train_batch_size=4, learning_rate=3e-3, max_steps=2, logging_steps=1,
                save_strategy="no", seed=0, disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return SFTConfig(**base)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_params_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ------------------------------------------------------------------------------------------------ exact resume


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft_resume_reproduces_uninterrupted_losses(tiny_model_dir, tmp_path, lora):
    """6 steps in one go == 3 steps, interrupted after the checkpoint, + 3 resumed (batch 2 x accumulation 2,
    warm-up + cosine schedule, so data order, optimizer, scheduler and RNG must all be restored). Qwen2-VL's
    checkpoints use the hub key layout: this also covers loading them back (transformers' own resume loads
    nothing for such models). With LoRA: the adapters' initialisation is seeded too."""
    from peft import LoraConfig

    path = str(tiny_model_dir("qwen2_vl"))

    def factory(**overrides):
        torch.manual_seed(int.from_bytes(os.urandom(4), "little"))  # whatever state the process's RNG is in
        args = _args(per_device_train_batch_size=2, gradient_accumulation_steps=2, warmup_steps=2,
                     lr_scheduler_type="cosine", **overrides)
        peft = LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM") if lora else None
        return SFTTrainer(model=path, args=args, train_dataset=DATA, peft_config=peft)

    steps, k = (6, 3) if not lora else (4, 2)
    losses_full, losses_resumed = run_and_resume(factory, steps=steps, k=k, workdir=str(tmp_path))
    assert len(losses_full) == steps
    assert_same_losses(losses_full, losses_resumed, tol=1e-6)


# ----------------------------------------------------------------------------------------- atomic checkpoints


def test_sigkill_while_saving_keeps_previous_checkpoint_and_resume_finishes(tiny_model_dir, tmp_path, caplog):
    model = str(tiny_model_dir("qwen2_vl"))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(KILL_SCRIPT), model, str(out), "4"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "killing myself" in proc.stdout

    # the interrupted save left its staging directory, half written, and no checkpoint-4
    names = sorted(os.listdir(out))
    assert "checkpoint-2" in names and "checkpoint-4" not in names, names
    staged = out / ".tmp-checkpoint-4" / "checkpoint-4"
    assert (staged / "model.safetensors").is_file() and (staged / "optimizer.pt").is_file()
    assert not (staged / "trainer_state.json").exists()

    # the previous checkpoint is complete and loadable, and is what transformers and vlmalign call the last one
    first = out / "checkpoint-2"
    assert get_last_checkpoint(str(out)) == str(first) == last_complete_checkpoint(out)
    assert json.loads((first / "trainer_state.json").read_text())["global_step"] == 2
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "vlmalign_state.json", "processor_config.json"):
        assert (first / name).is_file(), name
    reloaded = AutoModelForImageTextToText.from_pretrained(first)
    assert all(torch.isfinite(p).all() for p in reloaded.parameters())

    spec = importlib.util.spec_from_file_location("kill_during_save", KILL_SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    trainer = script.make_trainer(model, str(out))
    with caplog.at_level(logging.INFO, logger="vlmalign"):
        trainer.train(resume_from_checkpoint=True)
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "Removing incomplete checkpoint" in messages and ".tmp-checkpoint-4" in messages
    assert f"Resuming from the last complete checkpoint, {first}" in messages
    assert trainer.state.global_step == 4
    assert sorted(step_losses(trainer.state.log_history)) == [1, 2, 3, 4]
    assert sorted(n for n in os.listdir(out) if not n.startswith(".vlmalign")) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / ".vlmalign.lock").exists()  # the killed run's lock was taken over, then released
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4


class _ExtraFileTrainer(SFTTrainer):
    """A subclass adding a file to its checkpoints after super(), as DPOTrainer does."""

    seen = []

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        published = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        self.seen.append((folder, os.path.exists(published)))
        Path(folder, "extra_state.json").write_text("{}")


def test_checkpoints_are_staged_including_subclass_files_and_rotated(tiny_model_dir, tmp_path):
    """Subclass additions land in the staging directory before the rename; save_total_limit rotation and
    best-model bookkeeping see the final names; stale staging directories go at the start of training; the best
    model (here the *worst* eval loss, so not the last step) is loaded back at the end."""
    out = tmp_path / "run"
    (out / ".tmp-checkpoint-7" / "checkpoint-7").mkdir(parents=True)  # left by an earlier killed save
    args = _args(out, max_steps=4, save_strategy="steps", save_steps=1, save_total_limit=2, eval_strategy="steps",
                 eval_steps=1, metric_for_best_model="loss", greater_is_better=True, load_best_model_at_end=True,
                 per_device_eval_batch_size=4)
    trainer = _ExtraFileTrainer(model=str(tiny_model_dir("qwen2_vl")), args=args, train_dataset=DATA,
                                eval_dataset=make_dataset("color", "sft", n=4, seed=1, split="validation"))
    trainer.train()
    assert [published for _, published in trainer.seen] == [False] * 4
    assert all(".tmp-checkpoint-" in folder for folder, _ in trainer.seen)
    names = sorted(os.listdir(out))
    assert not [n for n in names if n.startswith(".tmp")], names
    checkpoints = [n for n in names if n.startswith("checkpoint-")]
    best = trainer.state.best_model_checkpoint
    assert best is not None and os.path.isdir(best) and ".tmp" not in best
    assert len(checkpoints) == 2 and "checkpoint-4" in checkpoints and os.path.basename(best) in checkpoints
    for name in checkpoints:
        assert (out / name / "extra_state.json").is_file()
        state = json.loads((out / name / "trainer_state.json").read_text())
        assert ".tmp" not in str(state["best_model_checkpoint"])
    assert os.path.basename(best) != "checkpoint-4"
    _assert_params_equal(_params(trainer.model), _params(AutoModelForImageTextToText.from_pretrained(best)))


def test_last_complete_checkpoint_skips_folders_without_trainer_state(tmp_path):
    for step, complete in ((2, True), (5, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    (tmp_path / ".tmp-checkpoint-9").mkdir()
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-5")  # transformers' pick
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")


# ------------------------------------------------------------------------------------------ non-finite guard


class _Snapshot(TrainerCallback):
    """Parameters after each optimizer step."""

    def __init__(self, model):
        self.model, self.after = model, {0: _params(model)}

    def on_step_end(self, args, state, control, **kwargs):
        self.after[state.global_step] = _params(self.model)


def _nan_output_at_step(trainer, step, micro_batch=1):
    """From now on the language model's final norm outputs NaN during the `micro_batch`-th forward of `step`."""
    calls = {"n": 0}

    def hook(module, inputs, output):
        if module.training and trainer.state.global_step == step - 1:
            calls["n"] += 1
            if calls["n"] == micro_batch:
                return output * float("nan")
        return output

    return trainer.model.model.language_model.norm.register_forward_hook(hook)


def test_nan_loss_raises_naming_the_step_and_leaves_weights(tiny_model_dir, tmp_path):
    trainer = SFTTrainer(model=str(tiny_model_dir("qwen2_vl")), args=_args(tmp_path, max_steps=3), train_dataset=DATA)
    snap = _Snapshot(trainer.model)
    trainer.add_callback(snap)
    _nan_output_at_step(trainer, step=2)
    with pytest.raises(NonFiniteError, match=r"(?i)non-finite loss \(nan\) at global step 2") as err:
        trainer.train()
    assert err.value.step == 2 and err.value.kind == "loss"
    assert trainer.state.global_step == 1
    _assert_params_equal(_params(trainer.model), snap.after[1])


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0], ids=["clipped", "unclipped"])
def test_nan_gradient_raises_naming_the_parameter(tiny_model_dir, tmp_path, max_grad_norm):
    trainer = SFTTrainer(model=str(tiny_model_dir("qwen2_vl")), args=_args(tmp_path, max_grad_norm=max_grad_norm),
                         train_dataset=DATA)
    name = "model.language_model.layers.1.mlp.down_proj.weight"
    param = dict(trainer.model.named_parameters())[name]
    param.register_hook(lambda g: g * float("inf") if trainer.state.global_step == 1 else g)
    snap = _Snapshot(trainer.model)
    trainer.add_callback(snap)
    with pytest.raises(NonFiniteError, match="(?i)non-finite gradient norm .* at global step 2") as err:
        trainer.train()
    assert err.value.kind == "gradient norm" and err.value.parameter == name and name in str(err.value)
    _assert_params_equal(_params(trainer.model), snap.after[1])


def test_skip_policy_skips_counts_and_continues(tiny_model_dir, tmp_path):
    """NaN in the second micro-batch of step 2 (accumulation 2): the whole step is skipped (weights and Adam
    state untouched), counted, saved in the checkpoint, and training goes on."""
    args = _args(tmp_path, max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                 nonfinite_policy="skip", save_strategy="steps", save_steps=3)
    trainer = SFTTrainer(model=str(tiny_model_dir("qwen2_vl")), args=args, train_dataset=DATA)
    snap = _Snapshot(trainer.model)
    trainer.add_callback(snap)
    _nan_output_at_step(trainer, step=2, micro_batch=2)
    trainer.train()
    assert trainer.state.global_step == 4
    _assert_params_equal(snap.after[2], snap.after[1])
    assert any(not torch.equal(snap.after[3][n], snap.after[2][n]) for n in snap.after[3])
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    adam_steps = {int(s["step"]) for s in trainer.optimizer.state.values()}
    assert adam_steps == {3}
    logs = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    assert [logs[s]["nonfinite_skipped"] for s in (1, 2, 3, 4)] == [0, 1, 1, 1]
    assert math.isnan(logs[2]["grad_norm"]) or math.isinf(logs[2]["grad_norm"])
    saved = json.loads((tmp_path / "checkpoint-3" / "vlmalign_state.json").read_text())
    assert saved["nonfinite_skipped"] == 1


def test_nonfinite_policy_is_validated(tmp_path):
    with pytest.raises(ValueError, match="nonfinite_policy"):
        _args(tmp_path, nonfinite_policy="ignore")


def test_skip_is_refused_under_deepspeed(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")   # as `accelerate launch` with a DeepSpeed config sets it
    with pytest.raises(ValueError, match="not available under DeepSpeed"):
        _args(tmp_path, nonfinite_policy="skip")


# ------------------------------------------------------------------------------------------------ safe saving


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_saved_weights_are_safetensors_only(tiny_model_dir, tmp_path, lora):
    from peft import LoraConfig

    peft = LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM") if lora else None
    trainer = SFTTrainer(model=str(tiny_model_dir("qwen2_vl")), args=_args(tmp_path, max_steps=1, save_strategy="steps",
                         save_steps=1), train_dataset=DATA, peft_config=peft)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    for folder in (tmp_path / "checkpoint-1", tmp_path / "final"):
        files = os.listdir(folder)
        assert weights in files, files
        pickles = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")) and f not in
                   ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth")]
        assert not pickles, pickles
        assert "pytorch_model.bin" not in files and "adapter_model.bin" not in files


@pytest.mark.parametrize("asked", [False, True], ids=["default", "asked"])
def test_remote_code_only_when_asked(tiny_model_dir, tmp_path, monkeypatch, asked):
    """trust_remote_code reaches the model and the processor loaders only through model_init_kwargs."""
    import vlmalign.models.loading as loading
    import vlmalign.trainers.base as base

    seen = {}
    load_pretrained = loading.AutoModelForImageTextToText.from_pretrained
    load_processor = base.load_processor

    def model_spy(*args, **kwargs):
        seen["model"] = kwargs.get("trust_remote_code")
        return load_pretrained(*args, **kwargs)

    def processor_spy(*args, **kwargs):
        seen["processor"] = kwargs.get("trust_remote_code")
        return load_processor(*args, **kwargs)

    monkeypatch.setattr(loading.AutoModelForImageTextToText, "from_pretrained", model_spy)
    monkeypatch.setattr(base, "load_processor", processor_spy)
    kwargs = {"model_init_kwargs": {"trust_remote_code": True}} if asked else {}
    SFTTrainer(model=str(tiny_model_dir("qwen2_vl")), args=_args(tmp_path, **kwargs), train_dataset=DATA)
    assert seen == ({"model": True, "processor": True} if asked else {"model": False, "processor": None})


# ------------------------------------------------------------------------------------- resume: DPO/MPO, GRPO/GSPO


def test_mpo_resume_reproduces_uninterrupted_losses_and_bco_mean(tiny_model_dir, tmp_path):
    """MPO (sigmoid + bco_pair + sft): the BCO running mean is part of the resumed state."""
    from resume_utils import assert_same_losses, run_and_resume

    from vlmalign.trainers.dpo import MPO_PRESET, DPOConfig, DPOTrainer

    path = tiny_model_dir("qwen2_vl")
    data = make_dataset("color", "preference", n=32, seed=0)
    trainers = {}

    def factory(output_dir, **overrides):
        args = DPOConfig(output_dir=output_dir, per_device_train_batch_size=4, learning_rate=1e-3, seed=0,
                         disable_tqdm=True, report_to="none", **MPO_PRESET, **overrides)
        trainer = DPOTrainer(model=str(path), args=args, train_dataset=data)
        trainers[output_dir] = trainer
        return trainer

    full, resumed = run_and_resume(factory, steps=6, k=3, workdir=str(tmp_path))
    assert_same_losses(full, resumed)
    runs = list(trainers.values())
    assert runs[0].running_mean.value == pytest.approx(runs[-1].running_mean.value, abs=1e-9)


@pytest.mark.parametrize("k", [2, 1], ids=["at-generation-boundary", "inside-generation-batch"])
@pytest.mark.parametrize("gspo", [False, True], ids=["grpo", "gspo"])
def test_grpo_resume_reproduces_losses(tiny_model_dir, tmp_path, gspo, k):
    """Resume at a generation-batch boundary (same completions: per-completion seeded sampling) or inside one (the
    buffered completions, old-policy and reference log-probs are saved with the checkpoint): same losses."""
    from resume_utils import assert_same_losses, run_and_resume

    from vlmalign.trainers.grpo import GRPOConfig, GRPOTrainer

    path = tiny_model_dir("qwen2_vl")
    data = make_dataset("color", "prompt", n=32, seed=0)

    def length_reward(completions, **kwargs):
        return [float(len(c) % 4) for c in completions]

    def factory(output_dir, **overrides):
        common = dict(output_dir=output_dir, per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=5, learning_rate=1e-2, seed=0, disable_tqdm=True, report_to="none",
                      **overrides)
        args = (GRPOConfig.gspo(epsilon=0.05, epsilon_high=0.05, steps_per_generation=2, **common) if gspo
                else GRPOConfig(beta=0.04, num_iterations=2, **common))
        return GRPOTrainer(model=str(path), reward_funcs=[length_reward], args=args, train_dataset=data)

    full, resumed = run_and_resume(factory, steps=4, k=k, workdir=str(tmp_path))
    assert_same_losses(full, resumed)
