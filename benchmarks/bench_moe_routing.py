"""Expert switching under policy updates: does the mixture-of-experts routing of the sampled completions change
between the old-policy pass and the current pass, and how do token-level and sequence-level importance ratios
(GRPO vs GSPO) and their clipping behave while it does?

Setup: the `tiny` (default) or `small` Qwen3-VL-MoE of `vlmalign.models.tiny` (4 experts, 2 per token), first
trained `--sft-steps` SFT steps on the synthetic `color` task (bs 32, lr 3e-3: a policy that is right part of the
time, so the group advantages are not all 0), then ONE GRPO generation batch (`--prompts` x G = `--generations`
completions, temperature 1, accuracy reward, group-normalised advantages) is trained for `--steps` optimiser
steps (Adam, `--lr`, no KL), twice from the same start and the same completions:

* GRPO: token-level ratios, clip epsilon 0.2 (vlmalign's / TRL's default);
* GSPO: sequence-level ratios s_i = exp(mean_t (logp - old_logp)), clip epsilons 3e-4 / 4e-4 (the GSPO paper's,
  vlmalign's `GSPO_PRESET`).

Before every update (step 0 = the old policy itself) and after the last one, the current policy's pass over the
batch (prompt repeated per completion, padded, `output_router_logits=True`: the router logits the model returns)
is compared with the old-policy pass:

* routing: fraction of (token, MoE layer) pairs whose selected top-k expert set differs, over the completion
  tokens (the scored ones) and over the prompt tokens (image tokens included), padding excluded;
* ratios: spread of the token-level ratios exp(logp - old) over completion tokens and of the sequence-level
  ratios (std, min, max, 5% / 50% / 95% quantiles);
* clipping: fraction of tokens (GRPO) / sequences (GSPO) whose ratio lies outside the clip band, and the fraction
  where the clip is active (outside the band on the side the advantage pushes: TRL's clip_ratio/region).

Run: `python benchmarks/bench_moe_routing.py [--size tiny|small] [--steps 8] [--lr 1e-3] [--out PATH]`
(about 2-4 minutes on one CPU core for the tiny model). Writes benchmarks/results_moe_routing.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

import torch

from vlmalign.data.collate import Encoder
from vlmalign.data.synthetic import make_dataset
from vlmalign.eval.evaluate import evaluate
from vlmalign.losses.policy import policy_loss
from vlmalign.models.families import get_family
from vlmalign.models.loading import load_processor
from vlmalign.models.shared_prefix import plain_batch
from vlmalign.models.tiny import make_tiny_model
from vlmalign.rl.advantages import group_advantages
from vlmalign.rl.rewards import accuracy_reward
from vlmalign.rl.rollout import SamplingConfig, generate
from vlmalign.trainers.grpo import GSPO_PRESET
from vlmalign.trainers.sft import SFTConfig, SFTTrainer

QUANTILES = (0.05, 0.5, 0.95)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="tiny", choices=("tiny", "small"))
    p.add_argument("--sft-steps", type=int, default=50)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--max-completion-length", type=int, default=6)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_moe_routing.md"))
    return p.parse_args(argv)


def sft_start(size: str, steps: int, seed: int, work: str):
    path = make_tiny_model("qwen3_vl_moe", size, os.path.join(work, "init"), seed=seed)
    processor = load_processor(path)
    args = SFTConfig(output_dir=os.path.join(work, "sft"), max_steps=steps, per_device_train_batch_size=32,
                     learning_rate=3e-3, lr_scheduler_type="constant_with_warmup", warmup_steps=10, adam_beta2=0.99,
                     weight_decay=0.0, max_grad_norm=1.0, save_strategy="no", logging_steps=steps, seed=seed,
                     disable_tqdm=True)
    trainer = SFTTrainer(model=str(path), args=args, train_dataset=make_dataset("color", "sft", n=2000, seed=seed),
                         processing_class=processor)
    trainer.train()
    test = make_dataset("color", "prompt", n=200, seed=0, split="test")
    accuracy = evaluate(trainer.model, processor, test, max_new_tokens=6).accuracy
    return trainer.model, processor, accuracy


def policy_pass(model, batch: dict, prompt_len: int):
    """Completion log-probs [N, C] (full-vocabulary log-softmax of the model's logits) and the selected experts
    [layers, N, T, k] from the router logits the model returns."""
    out = model(**batch, output_router_logits=True, use_cache=False)
    text = model.config.text_config
    logits = out.logits[:, prompt_len - 1:-1].float()                      # position t-1 predicts token t
    targets = batch["input_ids"][:, prompt_len:]
    logps = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    rows, length = batch["input_ids"].shape
    experts = torch.stack([torch.topk(layer.reshape(rows, length, -1), text.num_experts_per_tok, dim=-1).indices
                           for layer in out.router_logits])                  # [L, N, T, k]
    return logps, experts.sort(dim=-1).values


def spread(values: torch.Tensor) -> dict:
    values = values.double()
    q = torch.quantile(values, torch.tensor(QUANTILES, dtype=values.dtype))
    return {"std": values.std().item(), "min": values.min().item(), "max": values.max().item(),
            **{f"q{int(p * 100)}": v.item() for p, v in zip(QUANTILES, q)}}


def measure(logps, old, experts, old_experts, mask, prompt_real, prompt_len, advantages, eps_low, eps_high, level):
    valid = mask.bool()
    differs = (experts != old_experts).any(dim=-1)                          # [L, N, T]
    completion_switch = differs[:, :, prompt_len:][:, valid].float().mean().item()
    prompt_switch = differs[:, :, :prompt_len][:, prompt_real.bool()].float().mean().item()
    log_ratio = (logps - old) * mask
    token_ratio = torch.exp(log_ratio)[valid]
    seq_ratio = torch.exp(log_ratio.sum(1) / mask.sum(1).clamp(min=1))
    if level == "token":
        ratio, adv = torch.exp(log_ratio), advantages[:, None].expand_as(log_ratio)
        ratio, adv = ratio[valid], adv[valid]
    else:
        ratio, adv = seq_ratio, advantages
    outside = ((ratio < 1 - eps_low) | (ratio > 1 + eps_high)).double().mean().item()
    active = (((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))).double().mean().item()
    return {"completion_switch": completion_switch, "prompt_switch": prompt_switch, "token": spread(token_ratio),
            "sequence": spread(seq_ratio), "outside": outside, "active": active}


def run_method(model, batch, prompt_len, mask, prompt_real, advantages, args, level, eps_low, eps_high):
    model = copy.deepcopy(model)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.99))
    with torch.no_grad():
        old, old_experts = policy_pass(model, batch, prompt_len)
    rows = []
    for step in range(args.steps + 1):
        logps, experts = policy_pass(model, batch, prompt_len)
        rows.append(measure(logps.detach(), old, experts, old_experts, mask, prompt_real, prompt_len, advantages,
                            eps_low, eps_high, level))
        if step == args.steps:
            break
        loss, _ = policy_loss(logps, old, advantages, mask.float(), epsilon_low=eps_low, epsilon_high=eps_high,
                              importance_sampling_level=level, loss_type="grpo")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return rows


def table(title: str, rows: list[dict], level: str) -> list[str]:
    unit = "tokens" if level == "token" else "sequences"
    lines = [f"### {title}", "",
             "| step | expert switch, completion (token, layer) | expert switch, prompt | token ratio std | token "
             "ratio min / q5 / q50 / q95 / max | sequence ratio std | sequence ratio min / q5 / q50 / q95 / max | "
             f"{unit} outside clip band | clip active (TRL region) |",
             "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda s: " / ".join(f"{s[k]:.4f}" for k in ("min", "q5", "q50", "q95", "max"))  # noqa: E731
    for step, r in enumerate(rows):
        lines.append(f"| {step} | {r['completion_switch']:.4f} | {r['prompt_switch']:.4f} | {r['token']['std']:.4f} "
                     f"| {fmt(r['token'])} | {r['sequence']['std']:.5f} | {fmt(r['sequence'])} | {r['outside']:.4f} "
                     f"| {r['active']:.4f} |")
    return lines + [""]


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()
    with tempfile.TemporaryDirectory() as work:
        model, processor, accuracy = sft_start(args.size, args.sft_steps, args.seed, work)
    model.eval()
    family = get_family(model)
    encoder = Encoder(processor, family, family.image_token_id(model))
    data = make_dataset("color", "prompt", n=args.prompts, seed=args.seed + 1)
    rows = [{"prompt": r["prompt"], "images": r["images"]} for r in data]
    sampling = SamplingConfig(max_completion_length=args.max_completion_length, temperature=1.0)
    rollout = generate(model, encoder, rows, num_generations=args.generations, sampling=sampling,
                       generator_seed=args.seed)
    solutions = [r["solution"] for r in data for _ in range(args.generations)]
    scores = accuracy_reward(completions=rollout.texts, solution=solutions)
    rewards = torch.tensor([float(x or 0.0) for x in scores])
    advantages, _ = group_advantages(rewards, args.generations)
    batch = plain_batch(rollout.unique_prompt_inputs, rollout.completion_ids, rollout.completion_mask,
                        rollout.group_index, family, encoder.image_token_id)
    prompt_len = rollout.unique_prompt_inputs["input_ids"].shape[1]
    prompt_real = batch["attention_mask"][:, :prompt_len]
    mask = rollout.completion_mask
    results = {
        "GRPO (token-level ratio, epsilon 0.2)": (
            "token", run_method(model, batch, prompt_len, mask, prompt_real, advantages, args, "token", 0.2, 0.2)),
        f"GSPO (sequence-level ratio, epsilon {GSPO_PRESET['epsilon']} / {GSPO_PRESET['epsilon_high']})": (
            "sequence", run_method(model, batch, prompt_len, mask, prompt_real, advantages, args, "sequence",
                                   GSPO_PRESET["epsilon"], GSPO_PRESET["epsilon_high"])),
    }
    text = model.config.text_config
    lines = [
        "# Expert switching, importance ratios and clipping on a mixture-of-experts VLM",
        "",
        f"`python benchmarks/bench_moe_routing.py --size {args.size} --steps {args.steps} --lr {args.lr}` "
        f"({time.time() - started:.0f} s, torch {torch.__version__}, {args.threads} thread(s), CPU, float32).",
        "",
        f"Model: {args.size} Qwen3-VL-MoE ({text.num_hidden_layers} MoE layers, {text.num_experts} experts, "
        f"{text.num_experts_per_tok} per token), after {args.sft_steps} SFT steps on `color` (held-out greedy "
        f"accuracy {accuracy:.3f}). One generation batch: {args.prompts} prompts x G={args.generations} "
        f"completions ({int(mask.sum())} completion tokens, {int(prompt_real.sum())} prompt tokens), mean reward "
        f"{rewards.mean().item():.3f}, {int((advantages != 0).sum())} completions with a non-zero advantage. "
        f"{args.steps} Adam steps (lr {args.lr}, betas 0.9/0.99, grad-norm clip 1.0) on that batch per method, "
        "from the same start. Step k = the pass before update k+1 (step 0: the old policy itself, so 0 switches and "
        "ratios 1 by construction); the last row is after the last update.",
        "",
    ]
    for title, (level, rows_) in results.items():
        lines += table(title, rows_, level)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
