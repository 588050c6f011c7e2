"""DPOTrainer / MPO: loss against a hand computation, reference handling (copy, PEFT, precomputed), per-row images
on every family, the BCO running mean across a resume, and learning on the synthetic colour task."""

from __future__ import annotations

import copy
import json
import logging
import math

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import TrainerCallback

from vlmalign.data.collate import Encoder, PreferenceCollator
from vlmalign.data.synthetic import make_dataset
from vlmalign.losses.preference import combined_preference_loss
from vlmalign.models.families import family_names, get_family
from vlmalign.models.forward import unwrap_model
from vlmalign.models.loading import load_model, load_processor
from vlmalign.models.tiny import make_tiny_model
from vlmalign.trainers.base import VLMALIGN_STATE_NAME
from vlmalign.trainers.dpo import MPO_PRESET, DPOConfig, DPOTrainer
from vlmalign.trainers.reference import reference_logps, sequence_logps

torch.set_num_threads(1)   # small models: 1 thread is as fast on a shared 2-core machine, and deterministic

LOSSES = {"sigmoid": {"loss_type": "sigmoid"}, "mpo": MPO_PRESET}


# ------------------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_model("qwen2_vl", "tiny", tmp_path_factory.mktemp("qwen2_vl"))
    return path, load_processor(path)


@pytest.fixture(scope="module")
def prefs():
    return make_dataset("color", "preference", 16, seed=3)


def config(tmp_path, **kw) -> DPOConfig:
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                logging_steps=1, save_strategy="no", max_length=None, seed=0, disable_tqdm=True,
                lr_scheduler_type="constant")
    return DPOConfig(**{**base, **kw})


def full_logits_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent reference implementation: full [B, T, V] logits, log_softmax, gather at the labels."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "ref_chosen_logps", "ref_rejected_logps")}
    with torch.no_grad():
        logits = model(**inputs).logits.float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    token = logits[:, :-1].log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token * mask).sum(-1), mask.sum(-1)


def _perturb(model, scale=0.02, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def _batch(trainer, n=4):
    """The trainer's batch with the plain 2B-row form added (the hand computations below run full sequences; the
    trainer itself reads the shared-prefix form when there is one)."""
    trainer.data_collator.full_form = True
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


# ------------------------------------------------------------------------------------------------------- config


def test_config_loss_type_parsing(tmp_path):
    assert config(tmp_path).loss_type == ["sigmoid"]
    cfg = config(tmp_path, loss_type="sigmoid, bco_pair,sft", loss_weights="0.8,0.2,1")
    assert cfg.loss_type == MPO_PRESET["loss_type"] and cfg.loss_weights == MPO_PRESET["loss_weights"]
    assert DPOConfig(output_dir=str(tmp_path)).learning_rate == 1e-6
    with pytest.raises(ValueError, match="unknown loss_type"):
        config(tmp_path, loss_type="sigmoid,nope")
    with pytest.raises(ValueError, match="loss_weights"):
        config(tmp_path, loss_type=["sigmoid", "sft"], loss_weights=[1.0])


# ---------------------------------------------------------------------------------------------- loss by hand


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_equals_hand_computation(tiny, prefs, tmp_path, name):
    path, proc = tiny
    torch.manual_seed(0)
    trainer = DPOTrainer(str(path), args=config(tmp_path, beta=0.2, **LOSSES[name]), train_dataset=prefs,
                         processing_class=proc)
    _perturb(trainer.model)                       # the policy differs from its frozen reference copy
    batch = _batch(trainer)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)

    policy, lengths = full_logits_logps(trainer.model, batch)
    ref, _ = full_logits_logps(trainer.ref_model, batch)
    (pc, pr), (rc, rr), (lc, lr) = policy.chunk(2), ref.chunk(2), lengths.chunk(2)
    delta = 0.0
    if "bco_pair" in trainer.args.loss_type:      # first update of the running mean: the batch's mean reward
        delta = (0.2 * torch.cat([pc - rc, pr - rr])).mean().item()
        assert trainer.running_mean.value == pytest.approx(delta, abs=1e-6)
    expected, parts = combined_preference_loss(
        trainer.args.loss_type, trainer.args.loss_weights, chosen_logps=pc, rejected_logps=pr, ref_chosen_logps=rc,
        ref_rejected_logps=rr, beta=0.2, reward_shift=delta, chosen_lengths=lc, rejected_lengths=lr, label_smoothing=0.0)
    assert abs((pc - rc) - (pr - rr)).max() > 1e-3   # not the trivial policy == reference case
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)
    recorded = trainer._metrics["train"]
    assert recorded["rewards/margins"][-1] == pytest.approx((0.2 * ((pc - rc) - (pr - rr))).mean().item(), abs=1e-5)
    for key, value in parts.items():
        assert recorded[f"loss/{key}"][-1] == pytest.approx(value.item(), abs=1e-5)


def test_gradients_reach_only_the_policy(tiny, prefs, tmp_path):
    path, proc = tiny
    trainer = DPOTrainer(str(path), args=config(tmp_path, **MPO_PRESET), train_dataset=prefs, processing_class=proc)
    ref, policy = trainer.ref_model, trainer.model
    assert ref is not None and ref is not policy and not ref.training
    assert all(not p.requires_grad for p in ref.parameters())
    ref_before = {k: v.clone() for k, v in ref.state_dict().items()}
    policy_before = {k: v.clone() for k, v in policy.state_dict().items()}
    trainer.train()
    assert all(p.grad is None for p in ref.parameters())
    assert all(torch.equal(v, ref_before[k]) for k, v in ref.state_dict().items())
    changed = [k for k, v in policy.state_dict().items() if not torch.equal(v, policy_before[k])]
    assert len(changed) > len(policy_before) // 2
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_peft_uses_the_adapter_free_policy_as_reference(tiny, prefs, tmp_path):
    from peft import LoraConfig

    path, proc = tiny
    trainer = DPOTrainer(str(path), args=config(tmp_path), train_dataset=prefs, processing_class=proc,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert trainer.ref_model is None
    modules = {id(v) for v in vars(trainer).values() if isinstance(v, torch.nn.Module)}
    assert modules == {id(trainer.model)}        # no second model anywhere on the trainer
    trainer.train()
    batch = _batch(trainer)
    base, _ = full_logits_logps(load_model(str(path)), batch)      # the untouched base weights, loaded fresh
    torch.testing.assert_close(reference_logps(trainer.model, None, batch), base, atol=1e-5, rtol=1e-5)
    with_adapters, _ = full_logits_logps(trainer.model, batch)
    assert (with_adapters - base).abs().max() > 1e-3                 # the adapters did train


def test_precomputed_reference_matches_live_reference(tiny, prefs, tmp_path):
    path, proc = tiny
    other = make_tiny_model("qwen2_vl", "tiny", tmp_path / "ref", seed=1)   # a reference != the policy
    live = DPOTrainer(str(path), ref_model=str(other), args=config(tmp_path / "a"), train_dataset=prefs,
                      processing_class=proc)
    pre = DPOTrainer(str(path), ref_model=str(other), args=config(tmp_path / "b", precompute_ref_log_probs=True,
                                                                  precompute_ref_batch_size=3),
                     train_dataset=prefs, processing_class=proc)
    assert pre.ref_model is None
    batch = _batch(pre)
    assert set(batch) >= {"ref_chosen_logps", "ref_rejected_logps", "pixel_values"}
    expected, _ = full_logits_logps(live.ref_model, batch)
    torch.testing.assert_close(torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]), expected,
                               atol=1e-4, rtol=1e-5)
    live.train()
    pre.train()
    first = [t.state.log_history[0] for t in (live, pre)]
    assert abs(first[0]["loss"] - math.log(2)) > 1e-3
    for key in ("loss", "rewards/chosen", "rewards/margins"):
        assert first[1][key] == pytest.approx(first[0][key], rel=1e-4, abs=1e-5)
    assert pre.state.log_history[1]["loss"] == pytest.approx(live.state.log_history[1]["loss"], rel=1e-3)


# ---------------------------------------------------------------------------------- per-row images, all families


def _shape_image(rgb) -> Image.Image:
    image = Image.new("RGB", (28, 28), (230, 225, 240))
    ImageDraw.Draw(image).rectangle([5, 6, 22, 21], fill=rgb)
    return image


def _pair_row(rgb, chosen, rejected) -> dict:
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the shape ?"}]}]
    def answer(word):
        return [{"role": "assistant", "content": [{"type": "text", "text": f"<answer>{word}</answer>"}]}]

    return {"prompt": prompt, "chosen": answer(chosen), "rejected": answer(rejected), "images": [_shape_image(rgb)]}


@pytest.mark.parametrize("family", family_names())
def test_per_row_images_every_family(family, tmp_path):
    try:
        path = make_tiny_model(family, "tiny", tmp_path / family)
    except NotImplementedError as err:
        pytest.skip(str(err))
    proc = load_processor(path)
    model = load_model(str(path)).eval()
    fam = get_family(model)
    collate = PreferenceCollator(Encoder(proc, fam, fam.image_token_id(unwrap_model(model))))
    from vlmalign.data.formats import normalize_row

    raw = [_pair_row((255, 0, 0), "red", "blue"), _pair_row((0, 0, 255), "blue", "red")]
    rows = [normalize_row(copy.deepcopy(r), "preference", i) for i, r in enumerate(raw)]
    with torch.no_grad():
        together, _ = sequence_logps(model, collate(rows))                        # [chosen_0, chosen_1, rej_0, rej_1]
        alone = [sequence_logps(model, collate([row]))[0] for row in rows]         # [chosen_i, rej_i]
        swapped = dict(rows[0], images=rows[1]["images"])                          # row 0's text, row 1's image
        with_other_image = sequence_logps(model, collate([swapped]))[0]
    torch.testing.assert_close(together, torch.stack([alone[0][0], alone[1][0], alone[0][1], alone[1][1]]),
                               atol=2e-5, rtol=1e-5)
    assert (with_other_image - alone[0]).abs().max() > 1e-6      # the image does change the log-probs

    data = [raw[i % 2] for i in range(4)]
    for loss in LOSSES.values():
        trainer = DPOTrainer(str(path), args=config(tmp_path / str(loss), per_device_train_batch_size=2,
                                                    learning_rate=1e-3, **loss), train_dataset=data,
                             processing_class=proc)
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert len(losses) == 2 and all(math.isfinite(x) for x in losses), (family, loss, losses)


# --------------------------------------------------------------------------------------- make_preferences


def test_pick_pair_rules():
    from vlmalign.recipes.preferences import _pick_pair

    gold = ("<answer>red</answer>", 1.0)
    right, wrong, other_wrong = ("<answer>red</answer>", 1.0), ("<answer>blue</answer>", 0.0), ("green", 0.0)
    assert _pick_pair([wrong, right], gold, "best") == ((right, wrong), None)
    pair, _ = _pick_pair([wrong, other_wrong], gold, "best")         # all wrong: the gold answer is chosen
    assert pair[0] is gold and pair[1] == wrong
    assert _pick_pair([right, right], gold, "best")[0] is None        # all right: nothing to prefer
    assert _pick_pair([wrong, other_wrong], None, "best")[0] is None  # all equal, no solution
    assert _pick_pair([right, wrong], gold, "gold") == ((gold, wrong), None)
    assert _pick_pair([right], gold, "gold")[0] is None
    assert _pick_pair([wrong], None, "gold") == (None, "no solution")
    assert _pick_pair([], gold, "best") == (None, "no usable sample")


@pytest.mark.parametrize("chosen", ["best", "gold"])
def test_make_preferences_builds_valid_on_policy_pairs(tiny, chosen):
    from vlmalign.data.formats import validate_dataset
    from vlmalign.recipes.preferences import make_preferences

    path, proc = tiny
    model = load_model(str(path))
    sft_rows = make_dataset("color", "sft", 6, seed=5)                # SFT rows: their prompt side is used
    out, stats = make_preferences(model, proc, sft_rows, samples=3, max_new_tokens=6, seed=0, chosen=chosen,
                                  gold_template="<answer>{}</answer>", return_stats=True, progress=False)
    assert stats.num_prompts == 6 and stats.num_pairs + stats.num_skipped == 6 and len(out) == stats.num_pairs > 0
    assert {"prompt", "chosen", "rejected", "images", "solution", "chosen_reward", "rejected_reward"} <= set(out[0])
    assert validate_dataset(out, "preference").valid_indices == list(range(len(out)))
    for row in out:   # a random model never answers right: the gold answer is chosen
        assert row["chosen"][0]["content"][0]["text"] == f"<answer>{row['solution']}</answer>"
        assert row["chosen_reward"] == 1.0 and row["rejected_reward"] == 0.0
        assert row["prompt"][-1]["role"] == "user" and len(row["images"]) == 1
    again = make_preferences(model, proc, sft_rows, samples=3, max_new_tokens=6, seed=0, chosen=chosen,
                             gold_template="<answer>{}</answer>", progress=False)
    assert again["rejected"] == out["rejected"]                       # seeded


# ---------------------------------------------------------------------------------------- BCO running mean


class _Probe(TrainerCallback):
    def __init__(self):
        self.trainer, self.begin, self.steps = None, None, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.begin = dict(self.trainer.running_mean.state_dict())

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(dict(self.trainer.running_mean.state_dict()))


def test_bco_running_mean_updates_and_survives_resume(tiny, prefs, tmp_path):
    path, proc = tiny
    args = config(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, **MPO_PRESET)
    probe = _Probe()
    first = DPOTrainer(str(path), args=args, train_dataset=prefs, processing_class=proc, callbacks=[probe])
    probe.trainer = first
    first.train()
    assert [s["count"] for s in probe.steps] == [8, 16, 24, 32]        # 2 rewards x 4 pairs per step
    assert len({s["mean"] for s in probe.steps}) == 4 and probe.steps[-1]["mean"] != 0
    logged = [h["bco_delta"] for h in first.state.log_history if "bco_delta" in h]
    assert logged == pytest.approx([s["mean"] for s in probe.steps], abs=1e-6)   # updated before the loss

    checkpoint = tmp_path / "out" / "checkpoint-2"
    saved = json.loads((checkpoint / VLMALIGN_STATE_NAME).read_text())["bco_running_mean"]
    assert saved == pytest.approx(probe.steps[1])
    resumed_probe = _Probe()
    resumed = DPOTrainer(str(path), args=args, train_dataset=prefs, processing_class=proc, callbacks=[resumed_probe])
    resumed_probe.trainer = resumed
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed_probe.begin == pytest.approx(probe.steps[1])
    assert [s["count"] for s in resumed_probe.steps] == [24, 32]
    assert resumed.running_mean.value == pytest.approx(first.running_mean.value, rel=1e-4)

    off = DPOTrainer(str(path), args=config(tmp_path / "off", use_bco_running_mean=False, **MPO_PRESET),
                     train_dataset=prefs, processing_class=proc)
    off.train()
    assert off.running_mean.count == 0
    assert all(h["bco_delta"] == 0 for h in off.state.log_history if "bco_delta" in h)


# ------------------------------------------------------------------------------------------------- learning

LEARN_SEED = 0
DPO_STEPS = 150


def sft_then_preferences(root, seed: int, sft_steps: int = 40, num_prompts: int = 1000):
    """The feasibility recipe's start: a tiny Qwen2-VL after a short SFT (held-out greedy accuracy ~0.3-0.6) and
    on-policy preference pairs sampled from it on training-split prompts."""
    from vlmalign.recipes.preferences import make_preferences
    from vlmalign.eval.evaluate import evaluate
    from vlmalign.trainers.sft import SFTConfig, SFTTrainer

    path = make_tiny_model("qwen2_vl", "tiny", root / "init", seed=seed)
    proc = load_processor(path)
    args = SFTConfig(output_dir=str(root / "sft"), per_device_train_batch_size=32, learning_rate=3e-3, warmup_steps=10,
                     lr_scheduler_type="constant_with_warmup", adam_beta2=0.99, max_steps=sft_steps, seed=seed,
                     max_length=None, save_strategy="no", logging_steps=1000, disable_tqdm=True)
    sft = SFTTrainer(str(path), args=args, train_dataset=make_dataset("color", "sft", 2000, seed),
                     processing_class=proc)
    sft.train()
    sft.save_model(str(root / "sft"))
    test = make_dataset("color", "prompt", 200, seed=999999, split="test")
    start = evaluate(sft.model, proc, test, max_new_tokens=8).accuracy
    prefs, stats = make_preferences(sft.model, proc, make_dataset("color", "prompt", num_prompts, seed + 1),
                                    samples=4, max_new_tokens=8, seed=seed, return_stats=True, progress=False)
    return {"sft": root / "sft", "processor": proc, "test": test, "start": start, "prefs": prefs, "stats": stats}


def preference_learning(setup, root, loss: dict, *, seed: int, steps: int = DPO_STEPS, lr: float = 3e-4,
                        beta: float = 0.1) -> dict:
    from vlmalign.eval.evaluate import evaluate

    args = DPOConfig(output_dir=str(root), per_device_train_batch_size=32, learning_rate=lr, beta=beta,
                     lr_scheduler_type="constant", max_steps=steps, logging_steps=25, seed=seed, max_length=None,
                     save_strategy="no", disable_tqdm=True, **loss)
    trainer = DPOTrainer(str(setup["sft"]), args=args, train_dataset=setup["prefs"],
                         processing_class=setup["processor"])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "rewards/accuracies" in h]
    end = evaluate(trainer.model, setup["processor"], setup["test"], max_new_tokens=8).accuracy
    return {"start": setup["start"], "end": end, "reward_accuracy": logs[-1]["rewards/accuracies"],
            "curve": [(h["step"], round(h["rewards/accuracies"], 3), round(h["loss"], 3)) for h in logs]}


@pytest.fixture(scope="module")
def learning_setup(tmp_path_factory):
    setup = sft_then_preferences(tmp_path_factory.mktemp("learn"), LEARN_SEED)
    assert 0.25 <= setup["start"] <= 0.65, setup["start"]
    assert setup["stats"].num_pairs >= 900, setup["stats"].summary()
    return setup


# beta: MPO uses the paper's 0.1. Pure DPO uses 1.0: with 0.1 it also learns on seeds 0 and 1 (0.43 -> 0.91,
# 0.415 -> 0.72) but the output format collapses on seeds 2 and 3 (likelihood displacement: the chosen log-prob falls
# from -3 to -13 and greedy accuracy to ~0); with 1.0 seeds 0-3 end +0.50, +0.24, +0.21, +0.39.
LEARN_BETA = {"sigmoid": 1.0, "mpo": 0.1}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LOSSES))
def test_preference_training_improves_accuracy(learning_setup, tmp_path, name):
    result = preference_learning(learning_setup, tmp_path, LOSSES[name], seed=LEARN_SEED, beta=LEARN_BETA[name])
    print(name, result)
    assert result["end"] >= result["start"] + 0.15, result
    assert result["reward_accuracy"] > 0.8, result


def _prompt_is_prefix(processor) -> bool:
    """Whether the template's generation prompt is a text prefix of the conversation with the answer (not so for
    Gemma 4, whose prompt opens an empty thought channel, nor LLaVA-OneVision's "assistant\n" vs "assistant \n"):
    only then can the chosen / rejected answers continue the rendered prompt."""
    user = [{"role": "user", "content": [{"type": "text", "text": "what ?"}]}]
    answer = [{"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    prompt = processor.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    return processor.apply_chat_template(user + answer, tokenize=False).startswith(prompt)


@pytest.mark.parametrize("family", family_names())
def test_shared_prefix_loss_and_gradients_equal_plain_path(tmp_path, family, caplog):
    """DPO/MPO with each prompt + image run once for its chosen and rejected answers (policy and reference) gives the
    plain path's loss and gradients (1e-4 relative, float32)."""
    from vlmalign.trainers.dpo import MPO_PRESET

    path = make_tiny_model(family, "tiny", tmp_path / "m", seed=0)
    prefs = make_dataset("color", "preference", 6, seed=2)
    results = []
    for shared in (True, False):
        trainer = DPOTrainer(str(path), args=config(tmp_path / str(shared), beta=0.2, shared_prefix=shared,
                                                    **MPO_PRESET), train_dataset=prefs)
        with torch.no_grad():  # move the policy away from the reference copy
            for p in trainer.model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        with caplog.at_level(logging.INFO, logger="vlmalign.data.collate"):
            batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
        prefix = _prompt_is_prefix(trainer.processing_class)
        assert ("shared" in batch) == (shared and prefix)
        fell_back = any("shared-prefix preference batch unavailable" in r.getMessage() for r in caplog.records)
        assert fell_back == (shared and not prefix)
        caplog.clear()
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}))
    (a, grads_a), (b, grads_b) = results
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    total = torch.sqrt(sum((g ** 2).sum() for g in grads_b.values()))
    for name in grads_b:
        assert (grads_a[name] - grads_b[name]).norm() <= 1e-4 * max(grads_b[name].norm(), 1e-3 * total), name


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3"])
def test_padding_free_loss_and_gradients_equal_shared_prefix(tmp_path, family, caplog):
    """MPO with `padding_free=True` (chosen and rejected sequences packed, policy and reference) gives the
    shared-prefix path's loss and gradients (1e-4 relative); Gemma 3 cannot be packed and runs padded, saying so."""
    import logging

    from vlmalign.trainers.dpo import MPO_PRESET

    path = make_tiny_model(family, "tiny", tmp_path / "m", seed=0)
    prefs = make_dataset("color", "preference", 6, seed=2)
    prefs = prefs.map(lambda r, i: {"rejected": [{**r["rejected"][0], "content": [{**r["rejected"][0]["content"][0], "text":
                      r["rejected"][0]["content"][0]["text"] + " no" * (2 * i)}]}]}, with_indices=True)
    results = []
    for padding_free in (False, True):
        trainer = DPOTrainer(str(path), args=config(tmp_path / str(padding_free), beta=0.2, padding_free=padding_free,
                                                    **MPO_PRESET), train_dataset=prefs)
        with torch.no_grad():  # move the policy away from the reference copy
            for p in trainer.model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
        assert ("shared" in batch) != padding_free
        padding = batch["shared"]["completion_mask"] if "shared" in batch else batch["attention_mask"]
        assert (padding == 0).any()
        trainer.model.zero_grad()
        with caplog.at_level(logging.INFO, logger="vlmalign.trainers.dpo"):
            loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}))
    assert ("padding_free: family gemma3" in caplog.text) == (family == "gemma3")
    (a, grads_a), (b, grads_b) = results
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    total = torch.sqrt(sum((g ** 2).sum() for g in grads_a.values()))
    for name in grads_a:
        assert (grads_a[name] - grads_b[name]).norm() <= 1e-4 * max(grads_a[name].norm(), 1e-3 * total), name
