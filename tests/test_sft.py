"""SFTTrainer: learning on a held-out set, gradient accumulation, LoRA, freezing, every family, CLI."""

import copy
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForImageTextToText

from vlmalign import SFTConfig, SFTTrainer
from vlmalign.data.collate import SFTCollator
from vlmalign.data.synthetic import make_dataset
from vlmalign.eval.evaluate import evaluate
from vlmalign.models.families import family_names, get_family
from vlmalign.models.loading import load_processor


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, learning_rate=3e-3, max_steps=2,
                save_strategy="no", logging_steps=1, seed=0, weight_decay=0.0, max_grad_norm=1.0, adam_beta2=0.99,
                dataloader_num_workers=0, disable_tqdm=True)
    base.update(kw)
    return SFTConfig(**base)


def _load(path):
    return AutoModelForImageTextToText.from_pretrained(path), load_processor(path)


@pytest.mark.slow
def test_sft_learns_color_task_from_random_init(tiny_model_dir, tmp_path):
    """Acceptance: tiny Qwen2-VL from random init reaches held-out greedy exact match >= 0.70 within 300 steps."""
    model, processor = _load(tiny_model_dir("qwen2_vl"))
    test = make_dataset("color", "prompt", n=200, seed=0, split="test")
    before = evaluate(model, processor, test, max_new_tokens=6).accuracy
    args = _config(tmp_path, per_device_train_batch_size=32, max_steps=200, warmup_steps=10,
                   lr_scheduler_type="cosine", logging_steps=50)
    trainer = SFTTrainer(model=model, args=args, train_dataset=make_dataset("color", "sft", n=2000, seed=0),
                         processing_class=processor)
    trainer.train()
    after = evaluate(model, processor, test, max_new_tokens=6).accuracy
    print(f"held-out accuracy {before:.3f} -> {after:.3f}")
    assert before <= 0.25
    assert after >= 0.70
    logged = [h for h in trainer.state.log_history if "mean_token_accuracy" in h]
    assert logged and logged[-1]["mean_token_accuracy"] > 0.9 and logged[-1]["num_tokens"] > 0


def test_gradient_accumulation_matches_one_big_batch(tiny_model_dir, tmp_path):
    """Batch 8 x accumulation 1 == batch 2 x accumulation 4: same loss and same parameters after one update.
    Plain SGD (lr 1) makes the update equal the gradient; Adam would amplify float noise in near-zero gradients."""
    path = tiny_model_dir("qwen2_vl")
    data = make_dataset("color", "sft", n=8, seed=3)
    # rows of different answer lengths make a per-micro-batch mean differ from the per-token mean
    data = data.map(lambda r, i: {"messages": r["messages"][:1] + [{"role": "assistant", "content": [
        {"type": "text", "text": r["messages"][1]["content"][0]["text"] + " ." * (i % 3)}]}]}, with_indices=True)
    results = []
    for bs, ga in ((8, 1), (2, 4)):
        model, processor = _load(path)
        args = _config(tmp_path / f"{bs}", per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                       max_steps=1, learning_rate=1.0, max_grad_norm=0.0, optim="sgd")
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=processor)
        trainer.train()
        results.append((trainer.state.log_history[0]["loss"], {n: p.detach().clone() for n, p in model.named_parameters()}))
    (loss_a, params_a), (loss_b, params_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for name in params_a:
        torch.testing.assert_close(params_a[name], params_b[name], atol=1e-5, rtol=1e-5, msg=name)


def test_loss_is_nll_of_answer_tokens_only(tiny_model_dir, tmp_path):
    model, processor = _load(tiny_model_dir("qwen2_vl"))
    data = make_dataset("color", "sft", n=4, seed=1)
    trainer = SFTTrainer(model=model, args=_config(tmp_path), train_dataset=data, processing_class=processor)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    loss = trainer.compute_loss(model, batch)
    # independent: full logits, shifted cross-entropy over the labelled tokens
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)
    tok = processor.tokenizer
    answers = [tok.decode(l[l != -100]) for l in batch["labels"]]
    assert all(a.startswith("<answer>") and a.endswith("</answer><|im_end|>") for a in answers)


def test_freeze_vision_tower_and_projector(tiny_model_dir, tmp_path):
    model, processor = _load(tiny_model_dir("qwen2_vl"))
    before = copy.deepcopy(model.state_dict())
    args = _config(tmp_path, freeze_vision_tower=True, freeze_projector=True)
    SFTTrainer(model=model, args=args, train_dataset=make_dataset("color", "sft", n=16, seed=0),
               processing_class=processor).train()
    after = model.state_dict()
    vision = [n for n in before if ".visual." in n]
    assert vision and all(torch.equal(before[n], after[n]) for n in vision)
    assert any(not torch.equal(before[n], after[n]) for n in before if "language_model" in n)


def test_lora_changes_only_adapters_and_reloads(tiny_model_dir, tmp_path):
    from peft import LoraConfig, PeftModel

    model, processor = _load(tiny_model_dir("qwen2_vl"))
    base_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = _config(tmp_path, max_steps=3, learning_rate=1e-2)
    trainer = SFTTrainer(model=model, args=args, train_dataset=make_dataset("color", "sft", n=24, seed=0),
                         processing_class=processor, peft_config=LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM"))
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    trainer.train()
    named = dict(trainer.model.named_parameters())
    assert lora_before and any(not torch.equal(lora_before[n], named[n]) for n in lora_before if "lora_B" in n)
    assert not any("visual" in n for n in lora_before), "vision tower is excluded from LoRA by default"
    for name, param in trainer.model.get_base_model().named_parameters():
        if "lora_" not in name:
            clean = name.replace(".base_layer", "")
            assert torch.equal(param, base_before[clean]), name
    trainer.save_model(str(tmp_path / "adapter"))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    trainer.model.eval()
    expected = trainer.model(**inputs).logits
    base, _ = _load(tiny_model_dir("qwen2_vl"))
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(reloaded(**inputs).logits, expected)


def test_saved_output_dir_reloads_identically(tiny_model_dir, tmp_path):
    model, processor = _load(tiny_model_dir("qwen2_vl"))
    trainer = SFTTrainer(model=model, args=_config(tmp_path), train_dataset=make_dataset("color", "sft", n=16, seed=0),
                         processing_class=processor)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    model2, processor2 = _load(tmp_path / "saved")
    collate = SFTCollator(trainer.encoder)
    batch = collate([trainer.train_dataset[i] for i in range(2)])
    batch2 = SFTCollator(type(trainer.encoder)(processor2, trainer.family, trainer.encoder.image_token_id))(
        [trainer.train_dataset[i] for i in range(2)])
    for key in batch:
        torch.testing.assert_close(batch[key], batch2[key])
    model.eval()
    torch.testing.assert_close(model(**batch).logits, model2(**batch2).logits)


def test_mixed_text_only_and_prompt_completion_rows(tiny_model_dir, tmp_path):
    from datasets import Dataset

    model, processor = _load(tiny_model_dir("qwen2_vl"))
    images = make_dataset("color", "sft", n=4, seed=0)
    rows = [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the shape ?"}]}],
             "completion": [{"role": "assistant", "content": [{"type": "text", "text": images[i]["solution"]}]}],
             "images": images[i]["images"]} for i in range(4)]
    rows += [{"prompt": [{"role": "user", "content": [{"type": "text", "text": "how many shapes are there ?"}]}],
              "completion": [{"role": "assistant", "content": [{"type": "text", "text": "2"}]}], "images": []}] * 4
    trainer = SFTTrainer(model=model, args=_config(tmp_path, per_device_train_batch_size=4),
                         train_dataset=Dataset.from_list(rows), processing_class=processor)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)


@pytest.mark.parametrize("family", family_names())
def test_two_steps_every_family(tiny_model_dir, tmp_path, family):
    """Two steps on repeated data: finite, non-increasing loss."""
    model, processor = _load(tiny_model_dir(family))
    one = make_dataset("color", "sft", n=4, seed=0)
    args = _config(tmp_path, per_device_train_batch_size=4, learning_rate=1e-3)
    trainer = SFTTrainer(model=model, args=args, train_dataset=one, processing_class=processor)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[1] <= losses[0] + 1e-6


def test_cli_trains_from_yaml_on_saved_dataset(tiny_model_dir, tmp_path):
    data_dir = tmp_path / "data"
    make_dataset("color", "sft", n=16, seed=0).save_to_disk(str(data_dir))
    config = {"model": str(tiny_model_dir("qwen2_vl")), "dataset": str(data_dir), "output_dir": str(tmp_path / "cli_out"),
              "per_device_train_batch_size": 8, "max_steps": 50, "learning_rate": 3e-3, "save_strategy": "no"}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "vlmalign.cli", "sft", "--config", str(tmp_path / "sft.yaml"),
                             "--max_steps", "2"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    state = (tmp_path / "cli_out" / "model.safetensors")
    assert state.exists() and (tmp_path / "cli_out" / "processor_config.json").exists()
    assert "train_loss" in result.stdout + result.stderr
    model, processor = _load(tmp_path / "cli_out")  # model + processor saved together
    assert model.config.model_type == "qwen2_vl" and processor.tokenizer is not None


def test_two_processes_match_one_with_text_only_batches(tiny_model_dir, tmp_path):
    """DDP (2 CPU processes, gloo) with a process whose batch has no image: trains, and gives the same losses and
    parameters as one process with the same global batch (per-token normalisation across processes)."""
    import json
    import os
    import socket
    from pathlib import Path

    script = Path(__file__).parent / "scripts" / "sft_two_process.py"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    model = str(tiny_model_dir("qwen2_vl"))
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    for cmd in ([sys.executable, str(script), model, str(one)],
                [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                 str(port), str(script), model, str(two)]):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert a["checksum"] == pytest.approx(b["checksum"], rel=1e-6)


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3", "qwen3_5"])
def test_padding_free_loss_and_gradients_equal_padded(tiny_model_dir, tmp_path, family, caplog):
    """`padding_free=True`: the same loss, token accuracy and gradients as the padded batch (rows of different
    lengths); Gemma3 and Qwen3.5 (linear attention) cannot be packed and run padded, saying so once."""
    import logging

    model, processor = _load(tiny_model_dir(family))
    model.train()
    data = make_dataset("color", "sft", n=4, seed=1)
    data = data.map(lambda r, i: {"messages": r["messages"][:1] + [{"role": "assistant", "content": [
        {"type": "text", "text": r["messages"][1]["content"][0]["text"] + " ." * (3 * i)}]}]}, with_indices=True)
    results = []
    for padding_free in (False, True):
        trainer = SFTTrainer(model=model, args=_config(tmp_path, padding_free=padding_free), train_dataset=data,
                             processing_class=processor)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        assert (batch["attention_mask"] == 0).any()
        model.zero_grad(set_to_none=True)
        with caplog.at_level(logging.INFO, logger="vlmalign.trainers.sft"):
            for _ in range(2 if padding_free else 1):
                loss = trainer.compute_loss(model, batch)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((loss.detach(), grads, trainer._metrics["train"]["mean_token_accuracy"][-1]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    assert ((results[1][1] - results[0][1]).norm() / results[0][1].norm()).item() < 1e-5
    assert results[1][2] == results[0][2]
    logged = sum("running padded batches" in r.getMessage() for r in caplog.records)
    assert logged == (0 if get_family(family).packing else 1)
