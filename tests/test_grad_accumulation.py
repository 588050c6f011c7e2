"""Gradient accumulation is right on every family: batch 8 x accumulation 1 equals batch 2 x accumulation 4 (loss
and the update after one optimiser step) for SFT, DPO/MPO and GRPO.

Plain SGD with learning rate 1 and no clipping makes the update equal the gradient. The reference is the
accumulation-free run itself: both runs see the same 8 rows in one optimiser step, so any per-micro-batch
normalisation, or a loss scaled by the accumulation count (what transformers did for Qwen2.5-VL, whose class
declares `accepts_loss_kwargs = False`), shows up as a difference.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from vlmalign import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer
from vlmalign.data.synthetic import make_dataset
from vlmalign.models.families import family_names
from vlmalign.models.loading import load_processor
from vlmalign.trainers.dpo import MPO_PRESET

COMMON = dict(max_steps=1, learning_rate=1.0, max_grad_norm=0.0, optim="sgd", weight_decay=0.0, save_strategy="no",
              logging_steps=1, seed=0, disable_tqdm=True, dataloader_num_workers=0, lr_scheduler_type="constant")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    sft = make_dataset("color", "sft", n=8, seed=3)
    # answers of different lengths: a per-micro-batch mean differs from the per-token mean
    sft = sft.map(lambda r, i: {"messages": r["messages"][:1] + [{"role": "assistant", "content": [
        {"type": "text", "text": r["messages"][1]["content"][0]["text"] + " ." * (i % 3)}]}]}, with_indices=True)
    return {"sft": sft, "dpo": make_dataset("color", "preference", n=8, seed=3),
            "grpo": make_dataset("color", "prompt", n=2, seed=3)}


def length_reward(completions, **kwargs):
    return [float(len(c) % 5) + 0.5 * c.count("e") for c in completions]


def _run(method, path, data, out, bs, ga):
    model, processor = AutoModelForImageTextToText.from_pretrained(path), load_processor(path)
    settings = dict(COMMON, output_dir=str(out), per_device_train_batch_size=bs, gradient_accumulation_steps=ga)
    if method == "sft":
        trainer = SFTTrainer(model=model, args=SFTConfig(**settings), train_dataset=data["sft"],
                             processing_class=processor)
    elif method == "mpo":
        trainer = DPOTrainer(model=model, args=DPOConfig(**settings, max_length=None, **MPO_PRESET),
                             train_dataset=data["dpo"], processing_class=processor)
    else:  # GRPO: 2 prompts x 4 completions = one generation batch of 8 in both geometries
        trainer = GRPOTrainer(model=model, reward_funcs=[length_reward],
                              args=GRPOConfig(**settings, num_generations=4, max_completion_length=5, beta=0.0),
                              train_dataset=data["grpo"], processing_class=processor)
    trainer.train()
    loss = trainer.state.log_history[0]["loss"]
    return loss, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", family_names())
@pytest.mark.parametrize("method", ["sft", "mpo", "grpo"])
def test_batch_8_equals_batch_2_times_accumulation_4(tiny_model_dir, tmp_path, data, family, method):
    path = tiny_model_dir(family)
    loss_a, params_a = _run(method, path, data, tmp_path / "a", 8, 1)
    loss_b, params_b = _run(method, path, data, tmp_path / "b", 2, 4)
    assert loss_b == pytest.approx(loss_a, rel=1e-5, abs=1e-6)
    moved = 0
    for name, before in params_a.items():
        torch.testing.assert_close(params_b[name], before, atol=2e-5, rtol=1e-4, msg=name)
    initial = AutoModelForImageTextToText.from_pretrained(path).state_dict()
    moved = sum(not torch.equal(initial[n], p) for n, p in params_a.items() if n in initial)
    assert moved > 0  # the step did update the model (the comparison is not vacuous)
