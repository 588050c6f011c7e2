"""Mixture of experts: the router load-balancing loss (losses/router.py, models/moe.py, trainers/router_loss.py).

The reference is transformers' own `load_balancing_loss_func` (Qwen3-VL-MoE's modeling file) applied to the router
logits the model returns (`output_router_logits=True`) from a plain padded forward with its attention mask; vlmalign
collects the router logits with hooks in its own forwards (plain, shared-prefix, packed) and computes the loss
itself. Tiny Qwen3-VL-MoE (4 experts, 2 per token, 2 layers), float32.
"""

from __future__ import annotations


import pytest
import torch
from test_packing import _batch as _sft_batch
from test_shared_prefix import WIDTH, _batches, built  # noqa: F401
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import load_balancing_loss_func

from vlmalign.data.synthetic import make_dataset
from vlmalign.losses.router import load_balancing_loss
from vlmalign.models import moe
from vlmalign.models import shared_prefix as sp
from vlmalign.models.forward import token_logps
from vlmalign.models.packing import pack_rows, packed_attention, packed_score_mask
from vlmalign.trainers import router_loss
from vlmalign.trainers.dpo import DPOConfig, DPOTrainer
from vlmalign.trainers.grpo import GRPOConfig, GRPOTrainer
from vlmalign.trainers.sft import SFTConfig, SFTTrainer

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILY = "qwen3_vl_moe"
RTOL = 1e-5


def _reference(model, batch, mask):
    """transformers' loss on the model's own router logits of a plain forward, and the router weights' gradients."""
    text = model.config.text_config
    model.zero_grad(set_to_none=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs, output_router_logits=True, use_cache=False)
    value = load_balancing_loss_func(out.router_logits, text.num_experts, text.num_experts_per_tok, mask)
    value.backward()
    return value.detach(), _router_grads(model), out


def _router_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")}


def _ours(model, run):
    model.zero_grad(set_to_none=True)
    with moe.RouterCapture(model) as capture:
        run()
    value = capture.loss(moe.top_k(model))
    value.backward()
    return value.detach(), _router_grads(model), capture


def _assert_grads_close(ours, ref):
    assert ours.keys() == ref.keys() and len(ref) == 2                     # one router per layer
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=RTOL, atol=1e-7 * ref[name].norm().item())


def test_plain_path_equals_transformers(built):
    model, encoder = built(FAMILY)
    unique, plain, ids, mask = _batches(encoder, 3)
    attention = plain["attention_mask"]
    assert (attention == 0).any(), "the batch must hold padding (prompt left, completion right)"
    ref, ref_grads, out = _reference(model, plain, attention)
    # the model's own aux_loss (what it adds to a labels loss) is the same function over the same rows
    torch.testing.assert_close(out.aux_loss.detach(), ref, rtol=1e-6, atol=0)
    ours, grads, capture = _ours(model, lambda: token_logps(model, plain, mask, keep_last=WIDTH))
    assert len(capture.logits) == 2                                        # one forward, two MoE layers
    torch.testing.assert_close(ours, ref, rtol=RTOL, atol=0)
    _assert_grads_close(grads, ref_grads)
    # padding matters: over every row (no mask) the value differs, so the comparison above can fail
    unmasked = load_balancing_loss_func(out.router_logits, 4, 2, None)
    assert abs(unmasked.item() - ref.item()) > 100 * RTOL * ref.item()


def test_shared_prefix_path_equals_transformers_on_the_tokens_it_runs(built):
    """Prompts run once per group, counted once per completion; the last column (the final token of the longest
    completions, whose output predicts nothing) is not run by the shared-prefix path and so not counted."""
    model, encoder = built(FAMILY)
    G = 3
    unique, plain, ids, mask = _batches(encoder, G)
    attention = plain["attention_mask"].clone()
    assert attention[:, -1].any()
    attention[:, -1] = 0
    ref, ref_grads, _ = _reference(model, plain, attention)
    ours, grads, capture = _ours(model, lambda: sp.shared_prefix_logps(model, unique, ids, mask, G))
    assert len(capture.logits) == 4                                        # prompt pass + completion pass
    torch.testing.assert_close(ours, ref, rtol=RTOL, atol=0)
    _assert_grads_close(grads, ref_grads)


def test_packed_path_equals_transformers_on_the_padded_batch(built):
    model, encoder = built(FAMILY)
    batch = _sft_batch(encoder)
    assert (batch["attention_mask"] == 0).any()
    ref, ref_grads, _ = _reference(model, batch, batch["attention_mask"])
    packed = pack_rows(model, batch)

    def run():
        with packed_attention(model):
            token_logps(model, packed, packed_score_mask(packed))

    ours, grads, _ = _ours(model, run)
    torch.testing.assert_close(ours, ref, rtol=RTOL, atol=0)
    _assert_grads_close(grads, ref_grads)


def test_loss_function_against_hand_count():
    """Two tokens, 3 experts, top-1, one layer: f = (1/2, 1/2, 0); P = mean of the softmax rows."""
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    p = torch.softmax(logits, -1)
    expected = 3 * (0.5 * p[:, 0].mean() + 0.5 * p[:, 1].mean())
    torch.testing.assert_close(load_balancing_loss([logits], 1), expected)
    # a row of weight 0 is not counted; a row of weight 2 counts twice
    third = torch.tensor([[0.0, 0.0, 5.0]])
    torch.testing.assert_close(load_balancing_loss([logits, third], 1, [None, torch.zeros(1)]), expected)
    twice = load_balancing_loss([logits], 1, [torch.tensor([2.0, 1.0])])
    f, P = torch.tensor([2 / 3, 1 / 3, 0.0]), (2 * p[0] + p[1]) / 3
    torch.testing.assert_close(twice, 3 * (f * P).sum())


# --------------------------------------------------------------------------------------------------- trainers


def _moe_dir(tiny_model_dir, tmp_path, coef=None, on=True):
    from transformers import AutoModelForImageTextToText

    path = tiny_model_dir(FAMILY)
    model = AutoModelForImageTextToText.from_pretrained(path)
    model.config.text_config.output_router_logits = on
    if coef is not None:
        model.config.text_config.router_aux_loss_coef = coef
    out = tmp_path / f"moe_{on}_{coef}"
    model.save_pretrained(out)
    from vlmalign.models.loading import load_processor, save_processor
    save_processor(load_processor(path), out)
    return out


def test_settings_follow_the_config_and_trl_argument(tiny_model_dir, tmp_path):
    from transformers import AutoModelForImageTextToText

    real = AutoModelForImageTextToText.from_pretrained(tiny_model_dir(FAMILY))
    text = real.config.text_config
    assert (text.output_router_logits, text.router_aux_loss_coef) == (False, 0.001)   # the released configs'
    assert moe.router_aux_settings(real, None) == (False, 0.001)
    assert moe.router_aux_settings(real, 0.02) == (True, 0.02)            # TRL's argument on an MoE model
    text.output_router_logits = True
    assert moe.router_aux_settings(real, None) == (True, 0.001)
    assert moe.router_aux_settings(real, 0.0) == (False, 0.0)
    dense = AutoModelForImageTextToText.from_pretrained(tiny_model_dir("qwen3_vl"))
    assert moe.router_aux_settings(dense, None) == (False, 0.0)
    with pytest.raises(ValueError, match="router_aux_loss_coef=0.01 but .* not a mixture-of-experts"):
        moe.router_aux_settings(dense, 0.01)


def _sft(path, tmp_path, name, **kw):
    args = SFTConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=4, learning_rate=1e-3,
                     max_steps=2, save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True, **kw)
    return SFTTrainer(model=str(path), args=args, train_dataset=make_dataset("color", "sft", n=8, seed=0))


def test_sft_adds_the_aux_loss_to_router_gradients_scaled_for_accumulation(tiny_model_dir, tmp_path):
    """The gradient with the aux loss on minus the one with it off = coef / accumulation x the gradient of
    transformers' loss (on the model's own router logits of the same batch); the aux loss is logged as aux_loss."""
    path = _moe_dir(tiny_model_dir, tmp_path, coef=0.1)
    on = _sft(path, tmp_path, "on", gradient_accumulation_steps=2)
    off = _sft(path, tmp_path, "off", gradient_accumulation_steps=2, router_aux_loss_coef=0.0)
    assert on.router_aux.enabled and on.router_aux.coef == 0.1 and not off.router_aux.enabled
    batch = on.data_collator([on.train_dataset[i] for i in range(4)])
    grads = {}
    for name, trainer in (("on", on), ("off", off)):
        trainer.model.train()
        trainer.model.zero_grad(set_to_none=True)
        trainer.compute_loss(trainer.model, batch).backward()
        grads[name] = _router_grads(trainer.model)
    _, ref_grads, _ = _reference(off.model, batch, batch["attention_mask"])
    for name, ref in ref_grads.items():
        diff = grads["on"][name] - grads["off"][name]
        assert diff.norm() > 0
        torch.testing.assert_close(diff, 0.05 * ref, rtol=1e-4, atol=1e-4 * (0.05 * ref).norm().item())
    assert off._metrics["train"].get("aux_loss", []) == [] and len(on._metrics["train"]["aux_loss"]) == 1
    on.train()
    logged = [h["aux_loss"] for h in on.state.log_history if "aux_loss" in h]
    assert len(logged) == 2 and all(1.0 <= v <= 4.0 for v in logged)      # k (=2) when balanced, at most E


def _count_captures(monkeypatch):
    seen = []
    original = router_loss.RouterCapture.loss

    def spy(self, top_k):
        seen.append(len(self.logits))
        return original(self, top_k)

    monkeypatch.setattr(router_loss.RouterCapture, "loss", spy)
    return seen


def test_dpo_and_grpo_count_the_policy_pass_only(tiny_model_dir, tmp_path, monkeypatch):
    """DPO (frozen reference) and GRPO (reference with beta > 0, old-policy pass with num_iterations 2): each loss
    sees the router logits of the policy's two shared-prefix forwards (prompt, completions) x 2 layers only."""
    path = _moe_dir(tiny_model_dir, tmp_path)
    seen = _count_captures(monkeypatch)
    common = dict(per_device_train_batch_size=4, learning_rate=1e-3, max_steps=2, save_strategy="no", logging_steps=1,
                  seed=0, disable_tqdm=True)
    pairs = make_dataset("color", "preference", n=4, seed=0)
    dpo = DPOTrainer(model=str(path), args=DPOConfig(output_dir=str(tmp_path / "dpo"), **common), train_dataset=pairs)
    assert dpo.router_aux.enabled and dpo.ref_model is not None
    dpo.train()
    assert seen and set(seen) == {4}, seen
    assert all(h["aux_loss"] > 0 for h in dpo.state.log_history if "loss" in h and "aux_loss" in h)
    seen.clear()
    grpo = GRPOTrainer(model=str(path), reward_funcs=["accuracy"], train_dataset=make_dataset("color", "prompt", n=8),
                       args=GRPOConfig(output_dir=str(tmp_path / "grpo"), num_generations=4, max_completion_length=4,
                                       beta=0.04, num_iterations=2, **common))
    grpo.train()
    assert seen and set(seen) == {4}, seen
    assert [h for h in grpo.state.log_history if "aux_loss" in h]
