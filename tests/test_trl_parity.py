"""Parity with TRL 1.16 on the official templates, where TRL can use them (trl is a test-only dependency).

SFT: TRL's `assistant_only_loss=True` swaps in its patched training template for Qwen2-VL; on the same rows its
tokens must be ours, its supervised positions exactly ours plus the newline after each `<|im_end|>` (the documented
difference, docs/supervision.md), and its loss equal to the mean NLL that vlmalign's forward gives on TRL's
positions. DPO (sigmoid): the same pairs through both trainers give the same loss.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from vlmalign import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
from vlmalign.data.synthetic import make_dataset
from vlmalign.models.forward import token_logps
from vlmalign.models.loading import load_processor

trl = pytest.importorskip("trl")

COMMON = dict(per_device_train_batch_size=4, max_steps=1, save_strategy="no", report_to=[], seed=0, bf16=False,
              disable_tqdm=True, dataloader_num_workers=0)


def _load(path):
    return AutoModelForImageTextToText.from_pretrained(path), load_processor(path)


def test_sft_matches_trl_assistant_only_loss(tiny_model_dir, tmp_path):
    model, processor = _load(tiny_model_dir("qwen2_vl"))
    data = make_dataset("color", "sft", n=4, seed=0)
    ours = SFTTrainer(model=model, args=SFTConfig(output_dir=str(tmp_path / "a"), max_length=None, **COMMON),
                      train_dataset=data, processing_class=processor)
    batch = ours.data_collator([ours.train_dataset[i] for i in range(4)])
    theirs = trl.SFTTrainer(model=model, args=trl.SFTConfig(output_dir=str(tmp_path / "b"), assistant_only_loss=True,
                                                            max_length=None, **COMMON),
                            train_dataset=data, processing_class=processor)
    tbatch = theirs.data_collator([theirs.train_dataset[i] for i in range(4)])
    assert torch.equal(tbatch["input_ids"], batch["input_ids"])
    tok = processor.tokenizer
    ours_mask, their_mask = batch["labels"] != -100, tbatch["labels"] != -100
    # TRL's positions = ours + the newline right after each <|im_end|> we supervise
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    after_eot = torch.zeros_like(ours_mask)
    after_eot[:, 1:] = ours_mask[:, :-1] & (batch["input_ids"][:, :-1] == eot)
    assert torch.equal(their_mask, ours_mask | after_eot)
    assert all(tok.decode([t]) == "\n" for t in batch["input_ids"][after_eot].tolist())
    model.eval()
    with torch.no_grad():
        their_loss = theirs.compute_loss(model, dict(tbatch)).item()
        logps, _, _ = token_logps(model, dict(batch), their_mask)
        ours_on_their_positions = -(logps[their_mask]).mean().item()
        our_loss = ours.compute_loss(model, dict(batch)).item()
        logps, _, _ = token_logps(model, dict(batch), ours_mask)
    assert ours_on_their_positions == pytest.approx(their_loss, rel=1e-5)
    assert our_loss == pytest.approx(-(logps[ours_mask]).mean().item(), rel=1e-5)


def _sequence_logps(model, batch, mask):
    logps, _, _ = token_logps(model, dict(batch), mask)
    return (logps * mask).sum(-1)


def test_dpo_sigmoid_matches_trl(tiny_model_dir, tmp_path):
    """TRL's completion = ours + the newline after <|im_end|>; the sigmoid loss computed with vlmalign's forward on
    TRL's positions equals TRL's loss, and vlmalign's own loss equals the same formula on its own positions."""
    path = tiny_model_dir("qwen2_vl")
    model, processor = _load(path)
    data = make_dataset("color", "preference", n=4, seed=1)
    ours = DPOTrainer(model=model, args=DPOConfig(output_dir=str(tmp_path / "a"), max_length=None, beta=0.1,
                                                  loss_type="sigmoid", **COMMON),
                      train_dataset=data, processing_class=processor)
    theirs = trl.DPOTrainer(model=model, args=trl.DPOConfig(output_dir=str(tmp_path / "b"), max_length=None,
                                                            beta=0.1, loss_type=["sigmoid"], **COMMON),
                            train_dataset=data, processing_class=processor)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the policy moves away from both trainers' reference (the initial weights)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    reference = AutoModelForImageTextToText.from_pretrained(path).eval()
    model.eval()
    with torch.no_grad():
        ours.data_collator.full_form = True  # + the plain 2B rows, which this test runs; the loss reads the shared form
        batch = ours.data_collator([ours.train_dataset[i] for i in range(4)])
        tbatch = theirs.data_collator([theirs.train_dataset[i] for i in range(4)])
        assert torch.equal(tbatch["input_ids"], batch["input_ids"])
        ours_mask, their_mask = batch["labels"] != -100, tbatch["completion_mask"].bool()
        eot = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        after_eot = torch.zeros_like(ours_mask)
        after_eot[:, 1:] = ours_mask[:, :-1] & (batch["input_ids"][:, :-1] == eot)
        assert torch.equal(their_mask, ours_mask | after_eot)

        def sigmoid_loss(mask):
            policy, ref = _sequence_logps(model, batch, mask), _sequence_logps(reference, batch, mask)
            margin = (policy[:4] - ref[:4]) - (policy[4:] - ref[4:])
            return -torch.nn.functional.logsigmoid(0.1 * margin).mean().item()

        their_loss = theirs.compute_loss(model, theirs._prepare_inputs(tbatch)).item()
        our_loss = ours.compute_loss(model, batch).item()
        assert sigmoid_loss(their_mask) == pytest.approx(their_loss, rel=1e-5)
        assert sigmoid_loss(ours_mask) == pytest.approx(our_loss, rel=1e-5)
