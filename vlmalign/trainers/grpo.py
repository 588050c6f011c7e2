"""GRPO / GSPO / DAPO / Dr. GRPO for VLMs: sample groups of completions, score them, update with a clipped objective.

Batch geometry (TRL 1.16's; W processes, G = `num_generations`; see `vlmalign.rl.buffer`):

* `per_device_train_batch_size` counts *completions* per process per micro-step;
* `steps_per_generation` (default `gradient_accumulation_steps`) micro-steps share one generation batch of
  `generation_batch_size = per_device_train_batch_size * W * steps_per_generation` completions (all processes),
  i.e. `generation_batch_size / G` prompts; give one of the two, the other is derived; it must be a multiple of G;
* the generation batch is used `num_iterations` (mu) times, so prompts are sampled every
  `steps_per_generation * num_iterations` micro-steps; each pass over it uses a fresh seeded permutation cut into
  `steps_per_generation` micro-batches;
* old-policy log-probs are computed once per generation batch, and only when the batch is used across optimiser
  steps (`gradient_accumulation_steps % (steps_per_generation * num_iterations) != 0`); otherwise the loss uses
  the current log-probs, detached (ratio 1), as in TRL.

Per generation batch: each process samples its completions (one random stream per completion, so the result does
not depend on the number of processes: `vlmalign.rl.sampling`) and scores them with the reward functions (as TRL
does); only the reward tensors are gathered, and every process computes the group advantages of the whole batch
(groups may be split across processes) and keeps its slice. Loss normalisation: `dapo` divides the summed token loss by the loss tokens
of the whole generation batch, scaled to one optimiser step and to DDP's gradient averaging
(`N * GA / (steps_per_generation * W)`, TRL's); `grpo`, `bnpo` and `dr_grpo` are micro-batch means divided by GA.
Log-probs (policy, old, reference) are those of the sampling distribution, logits / `temperature`, as in TRL.

Shared prefix (`shared_prefix=True`, the default): generation prefills each prompt once per group, and every
training pass (policy forward/backward, old-policy and reference log-probs) runs each prompt and its image once for
the completions of its group (`vlmalign.models.shared_prefix`; same values and gradients as the plain path, which
repeats the prompt per completion). The buffer then shuffles whole groups (`vlmalign.rl.buffer`). Falls back to
the plain path by itself where the family does not support it; works under gradient checkpointing, bf16 and LoRA.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field

import torch
from accelerate.utils import gather_object

from .engines.gather import gathered_for_generation
from ..losses.policy import IMPORTANCE_SAMPLING_LEVELS, POLICY_LOSS_TYPES, TOKEN_NORMALISED_LOSS_TYPES, policy_loss
from ..models import vision_balance
from ..models.forward import unwrap_model
from ..losses.sampling_correction import sampling_importance_weights, sampling_logp_difference
from ..rl.advantages import SCALE_REWARDS, group_advantages, slice_for_process
from ..rl.buffer import GenerationBatch, GenerationBuffer, RepeatSampler, load_buffer, save_buffer
from ..rl.completions import (completion_logps, completion_metrics, micro_batch_inputs, micro_batch_logps,
                              write_completions_log)
from ..rl.reward_guard import guard_reward_function
from ..rl.rewards import compute_rewards, get_reward_function, reward_function_name, reward_metrics
from ..rl.rollout import SamplingConfig
from ..rl.sampling import derive_seed, sample_completions
from ..rl.vllm_config import VLLMArguments
from .base import BaseConfig, VLMTrainer
from .trl_fields import GRPOTrlFields, check_trl_arguments
from .reference import make_reference_model, reference_forward

#: GSPO (Zheng et al. 2025, arXiv 2507.18071) as in TRL's paper index; also set steps_per_generation to
#: 4 x gradient_accumulation_steps (`GRPOConfig.gspo(...)` does both).
GSPO_PRESET = dict(importance_sampling_level="sequence", loss_type="grpo", beta=0.0, epsilon=3e-4, epsilon_high=4e-4)
GSPO_STEPS_PER_GENERATION_FACTOR = 4
BUFFER_FILE = "generation_buffer_rank{rank}.safetensors"

logger = logging.getLogger(__name__)


@dataclass
class GRPOConfig(VLLMArguments, BaseConfig, GRPOTrlFields):
    """Configuration of `GRPOTrainer` (a `transformers.TrainingArguments`); defaults are TRL 1.16's. The
    `use_vllm` / `vllm_*` fields: `vlmalign.rl.vllm_config`."""

    learning_rate: float = 1e-6
    num_generations: int = field(default=8, metadata={"help": "Completions per prompt (G, >= 2)."})
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    generation_batch_size: int | None = field(default=None, metadata={"help": "Completions per generation batch, "
                                              "all processes (default per_device_train_batch_size x W x "
                                              "steps_per_generation)."})
    steps_per_generation: int | None = field(default=None, metadata={"help": "Micro-steps per generation batch "
                                             "(default gradient_accumulation_steps)."})
    num_iterations: int = field(default=1, metadata={"help": "Passes over each generation batch (mu)."})
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    beta: float = field(default=0.0, metadata={"help": "k3 KL coefficient; > 0 keeps a reference model."})
    importance_sampling_level: str = "token"
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    mask_truncated_completions: bool = False
    reward_weights: list[float] | None = None
    reward_timeout: float | None = field(default=None, metadata={"help": "Seconds a reward function may take on a "
                                         "generation batch before training stops with an error naming it (default: "
                                         "no limit)."})
    trust_reward_code: bool = field(default=False, metadata={"help": "Allow reward functions given as "
                                    "'module:function' (imports and runs that module). Off by default."})
    shuffle_dataset: bool = True
    log_completions: bool = False
    completions_log_steps: int | None = field(default=None, metadata={"help": "Write completions.jsonl every N "
                                              "steps (default logging_steps)."})
    shared_prefix: bool = field(default=True, metadata={"help": "Run each prompt (and its image) once per group in "
                                "generation and in every training pass; micro-batches then hold whole groups "
                                "when per_device_train_batch_size is a multiple of num_generations."})
    # The LM head runs outside the wrapped forward (vlmalign.models.forward bypasses it), which DDP's unused-parameter
    # search would mark unused and then see used ("marked ready twice"); every trainable parameter is used anyway
    # (a batch without images runs a zero-weighted vision pass in a multi-process run: models/vision_balance.py).
    ddp_find_unused_parameters: bool | None = False

    def __post_init__(self):
        check_trl_arguments(self)
        if isinstance(self.scale_rewards, str) and self.scale_rewards.lower() in ("true", "false"):
            self.scale_rewards = self.scale_rewards.lower() == "true"   # `--scale_rewards False` on a command line
        if isinstance(self.scale_rewards, bool):
            self.scale_rewards = "group" if self.scale_rewards else "none"
        super().__post_init__()
        for name, value, valid in (("scale_rewards", self.scale_rewards, SCALE_REWARDS),
                                   ("loss_type", self.loss_type, POLICY_LOSS_TYPES),
                                   ("importance_sampling_level", self.importance_sampling_level,
                                    IMPORTANCE_SAMPLING_LEVELS)):
            if value not in valid:
                raise ValueError(f"{name} must be one of {valid}, got {value!r}")
        for name, value, ok, rule in (
                ("beta", self.beta, self.beta >= 0, ">= 0"), ("epsilon", self.epsilon, self.epsilon > 0, "> 0"),
                ("epsilon_high", self.epsilon_high, self.epsilon_high is None or self.epsilon_high > 0, "> 0"),
                ("delta", self.delta, self.delta is None or self.delta > 0, "> 0"),
                ("max_completion_length", self.max_completion_length, self.max_completion_length >= 1, ">= 1"),
                ("temperature", self.temperature, self.temperature > 0, "> 0 (sampling needs it; greedy "
                 "decoding would give every completion of a group the same reward)"),
                ("top_p", self.top_p, 0 < self.top_p <= 1, "in (0, 1]"), ("top_k", self.top_k, self.top_k >= 0, ">= 0"),
                ("repetition_penalty", self.repetition_penalty, self.repetition_penalty > 0, "> 0"),
                ("reward_timeout", self.reward_timeout, self.reward_timeout is None or self.reward_timeout > 0, "> 0")):
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {value}")
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (group statistics), got {self.num_generations}")
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {self.num_iterations}")
        if self.auto_find_batch_size:
            raise ValueError("auto_find_batch_size is not supported: the batch geometry is fixed up front")
        per_step = self.per_device_train_batch_size * self.world_size
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ValueError("give generation_batch_size or steps_per_generation, not both")
        if self.generation_batch_size is not None:
            if self.generation_batch_size % per_step:
                raise ValueError(f"generation_batch_size ({self.generation_batch_size}) must be a multiple of "
                                 f"per_device_train_batch_size x processes ({per_step})")
            self.steps_per_generation = self.generation_batch_size // per_step
        else:
            self.steps_per_generation = self.steps_per_generation or self.gradient_accumulation_steps
            self.generation_batch_size = per_step * self.steps_per_generation
        if self.generation_batch_size % self.num_generations:
            raise ValueError(f"generation_batch_size ({self.generation_batch_size}) must be a multiple of "
                             f"num_generations ({self.num_generations})")
        if self.importance_sampling_level != "token" and self.loss_type in ("bnpo", "dr_grpo", "dapo"):
            warnings.warn(f"importance_sampling_level={self.importance_sampling_level!r} with loss_type="
                          f"{self.loss_type!r} weights sequences by length; GSPO uses loss_type='grpo'", stacklevel=2)
        if self.completions_log_steps is None:
            self.completions_log_steps = max(1, int(self.logging_steps))

    @classmethod
    def gspo(cls, **kwargs) -> "GRPOConfig":
        """A config with `GSPO_PRESET` and steps_per_generation = 4 x gradient_accumulation_steps; `kwargs`
        override (e.g. a larger `epsilon` for a tiny model)."""
        settings = {**GSPO_PRESET, **kwargs}
        if settings.get("steps_per_generation") is None and settings.get("generation_batch_size") is None:
            ga = settings.get("gradient_accumulation_steps", 1)
            settings["steps_per_generation"] = GSPO_STEPS_PER_GENERATION_FACTOR * ga
        return cls(**settings)


def collate_rows(rows: list[dict]) -> dict:
    """No processing at load time: the trainer encodes what it generates from and trains on."""
    return {"rows": rows}


class GRPOTrainer(VLMTrainer):
    """`GRPOTrainer(model=..., reward_funcs=[...], args=GRPOConfig(...), train_dataset=..., processing_class=...,
    peft_config=...)`.

    Rows: `prompt` (conversational) + `images` / `image`; every other column goes to the reward functions.
    `reward_funcs`: callables, built-in names ("accuracy", "format", "think_format") or "module:function" paths.
    Reference (beta > 0): the PEFT policy with adapters disabled, otherwise a frozen copy of the initial policy."""

    data_kind = "prompt"
    model_accepts_loss_kwargs = False
    loss_is_scaled_for_ga = True   # compute_loss scales for gradient accumulation itself (per loss_type)
    _resumable_attrs = ("_step", "_rounds")   # a resumed run continues the cycle and the sampling streams

    def __init__(self, model, reward_funcs, args: GRPOConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None, callbacks=None, **kwargs):
        args = args if args is not None else GRPOConfig(output_dir="grpo-output")
        funcs = [reward_funcs] if callable(reward_funcs) or isinstance(reward_funcs, str) else list(reward_funcs)
        if not funcs:
            raise ValueError("GRPOTrainer needs at least one reward function")
        # every function gets copies of its inputs (it cannot change the training rows) and, if set, a time limit
        self.reward_funcs = [guard_reward_function(get_reward_function(f, trust_reward_code=args.trust_reward_code),
                                                   args.reward_timeout) for f in funcs]
        self.reward_func_names = [reward_function_name(f) for f in self.reward_funcs]
        if args.reward_weights is not None and len(args.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"{len(args.reward_weights)} reward_weights for {len(self.reward_funcs)} reward functions")
        if eval_dataset is not None and (args.per_device_eval_batch_size * args.world_size) % args.num_generations:
            raise ValueError("per_device_eval_batch_size x processes must be a multiple of num_generations")
        if args.use_vllm:
            from ..rl.vllm_engine import require_vllm
            require_vllm()                                # before loading anything: name what to install
        super().__init__(model, args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, peft_config=peft_config, callbacks=callbacks, **kwargs)
        self.ref_model = make_reference_model(self.model, args, None, self.accelerator) if args.beta > 0 else None
        if self.ref_model is not None:
            self.balance_vision(self.ref_model)
        self.sampling = SamplingConfig.from_config(args, do_sample=True)
        self._step = 0                            # micro-steps taken (TRL's _step)
        self._rounds = {"train": 0, "eval": 0}    # generation batches sampled (seeds the sampling streams)
        self._buffer: GenerationBuffer | None = None
        self.vllm = None
        if args.use_vllm:
            from ..rl.vllm_backend import build_vllm_generation, max_images_per_row
            self.vllm = build_vllm_generation(self.model, self.encoder, args, self.accelerator, self.sampling,
                                              max_images_per_row(self.train_dataset))
        if args.shared_prefix and args.per_device_train_batch_size % args.num_generations:
            logger.info("shared_prefix: per_device_train_batch_size (%d) is not a multiple of num_generations (%d), "
                        "so groups are split between micro-batches and each part runs its prompt once",
                        args.per_device_train_batch_size, args.num_generations)

    def make_collator(self):
        return collate_rows

    # ---------------------------------------------------------------------------------------------- data

    def _get_train_sampler(self, train_dataset=None):
        args = self.args
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return RepeatSampler(len(dataset), args.num_generations, args.generation_batch_size // args.num_generations,
                             args.steps_per_generation * args.num_iterations, shuffle=args.shuffle_dataset,
                             seed=args.seed)

    def _get_eval_sampler(self, eval_dataset):
        return RepeatSampler(len(eval_dataset), self.args.num_generations, shuffle=False)

    def get_train_dataloader(self):
        if self.train_dataset is None:
            raise ValueError("GRPOTrainer: training requires a train_dataset")
        # one process's share of a generation batch per micro-step (re-yielded for the reuse steps)
        size = self._train_batch_size * self.args.steps_per_generation
        return self._get_dataloader(self.train_dataset, "Training", size, self._get_train_sampler, is_training=True)

    @property
    def needs_old_logps(self) -> bool:
        """Whether a generation batch is used across optimiser steps (then the sampling policy's log-probs are
        needed); TRL's condition."""
        args = self.args
        return args.gradient_accumulation_steps % (args.steps_per_generation * args.num_iterations) != 0

    def _prepare_inputs(self, inputs):
        if not self.model.training:
            return inputs                                     # evaluation: prediction_step scores the batch
        args = self.args
        position = self._step % (args.steps_per_generation * args.num_iterations)
        if position == 0 or self._buffer is None:
            round_ = self._rounds["train"]
            batch = self._generate_and_score(inputs["rows"])
            seed = derive_seed(args.seed, round_, self.accelerator.process_index)
            self._buffer = GenerationBuffer(batch, args.steps_per_generation, seed=seed, by_group=args.shared_prefix)
        iteration, micro = divmod(position, args.steps_per_generation)
        self._step += 1
        return self._with_forward_batch(self._buffer.micro_batch(iteration, micro))

    def _with_forward_batch(self, micro: dict) -> dict:
        return micro_batch_inputs(self.encoder, micro, self.accelerator.device, shared_prefix=self.args.shared_prefix)

    # ------------------------------------------------------------------------------------ generate + score

    def _generate_and_score(self, rows: list[dict]) -> GenerationBatch:
        args, acc = self.args, self.accelerator
        mode = "train" if self.model.training else "eval"
        round_ = self._rounds[mode]
        self._rounds[mode] += 1
        n, rank, world = len(rows), acc.process_index, acc.num_processes
        seeds = [derive_seed(args.seed, mode == "eval", round_, rank * n + i) for i in range(n)]
        if self.vllm is not None:
            rollout = self._vllm_generate(rows, seeds)
        else:
            with gathered_for_generation(self.model, acc), vision_balance.suspended(unwrap_model(self.model)):
                rollout = sample_completions(self.model, self.encoder, rows, seeds, self.sampling,
                                             shared_prefix=args.shared_prefix)
        groups = rollout.group_index.cpu()                 # [N] completions of one prompt share an id
        shared = groups if args.shared_prefix else None    # group ids for the shared-prefix log-prob passes
        prompts = getattr(rollout, "unique_prompt_inputs", None)   # encoded once: reused by every pass below
        encoded = None if prompts is None else (prompts, groups)
        device = acc.device
        ids, mask = rollout.completion_ids.to(device), rollout.completion_mask.to(device)
        truncated = rollout.truncated.to(device)

        # rewards where the completions are (this process's rows), then only the reward tensors are gathered:
        # advantages over the whole generation batch (groups may be split across processes), then this slice
        local_ids = [c[m.bool()].tolist() for c, m in zip(ids.cpu(), mask.cpu())]
        # every column of every row (rows may be plain dicts with differing keys): missing values are None
        names = dict.fromkeys(k for r in rows for k in r if k != "prompt")
        columns = {k: [r.get(k) for r in rows] for k in names}
        per_func, total = compute_rewards(self.reward_funcs, [r["prompt"] for r in rows], rollout.texts, local_ids,
                                          columns, args.reward_weights)
        if world > 1:
            per_func, total = acc.gather(per_func.to(device)).cpu(), acc.gather(total.to(device)).cpu()
        advantages, group_stats = group_advantages(total, args.num_generations, args.scale_rewards)

        loss_mask = mask * (~truncated).unsqueeze(1).to(mask.dtype) if args.mask_truncated_completions else mask
        num_items = acc.gather(loss_mask.sum().reshape(1).float()).sum().item()
        batch_size = args.per_device_train_batch_size if mode == "train" else args.per_device_eval_batch_size
        old = ref = weights = None
        correct = self.vllm is not None and args.vllm_importance_sampling_correction
        if mode == "train" and (self.needs_old_logps or correct):
            old = self._old_logps(rows, ids, mask, batch_size, shared, encoded)
        if self.vllm is not None and old is not None:
            weights = self._sampling_correction(old, rollout.sampling_logps, loss_mask, correct)
        if args.beta > 0:
            with reference_forward(self.model, self.ref_model) as ref_model:
                ref = completion_logps(ref_model, self.encoder, rows, ids, mask, batch_size=batch_size,
                                       temperature=args.temperature, group_ids=shared, encoded=encoded)

        metrics = reward_metrics(per_func, total, self.reward_func_names)
        metrics.update(group_stats)                       # reward_std: mean group std, as TRL logs it
        metrics.update(completion_metrics(acc.gather(mask.sum(1)), acc.gather(truncated.long())))
        for name, value in metrics.items():
            self.record(name, value)
        if args.log_completions and mode == "train" and self.state.global_step % args.completions_log_steps == 0:
            light = [{k: v for k, v in r.items() if k not in ("images", "image")} | {"images": [None] * len(
                r.get("images") or [])} for r in rows]          # image count only: no image crosses processes
            all_rows, all_texts = gather_object(light), gather_object(rollout.texts)
            if acc.is_main_process:
                write_completions_log(f"{args.output_dir}/completions.jsonl", self.state.global_step, all_rows,
                                      all_texts, per_func, self.reward_func_names, total, advantages)
                for i in range(min(args.num_completions_to_print or 0, len(all_texts))):  # TRL's option
                    logger.info("step %d completion %d (reward %.4g, advantage %.4g): %r", self.state.global_step,
                                i, float(total[i]), float(advantages[i]), all_texts[i])
        return GenerationBatch(rows=rows, completion_ids=ids, completion_mask=mask, loss_mask=loss_mask,
                               advantages=slice_for_process(advantages, rank, world).to(device),
                               num_items_in_batch=num_items, old_logps=old, ref_logps=ref, group_ids=groups,
                               sampling_weights=weights, encoded_prompts=prompts)

    def _vllm_generate(self, rows, seeds):
        """Completions from vLLM, its weights first brought up to the policy's when an optimiser step changed them
        (server: the main process pushes, the other processes wait)."""
        acc, step = self.accelerator, self.state.global_step
        if self.vllm.synced_step != step:
            if self.args.vllm_mode == "colocate" or acc.is_main_process:
                self.vllm.sync(self.model, step)
            if self.args.vllm_mode == "server":
                acc.wait_for_everyone()
                self.vllm.synced_step = step
        return self.vllm.generate(rows, seeds, self.sampling, device=acc.device)

    def _sampling_correction(self, old, sampling_logps, mask, correct: bool):
        """Log |trainer - vLLM| per token (TRL's metric names); with the correction on, the TIS weights."""
        args, acc = self.args, self.accelerator
        diff = sampling_logp_difference(old, sampling_logps, mask)
        valid = mask.bool()
        stats = [diff["mean"] * valid.sum(), diff["max"], valid.sum().float()]
        weights = None
        if correct:
            weights = sampling_importance_weights(old, sampling_logps, mask, mode=args.vllm_importance_sampling_mode,
                                                  clip_max=args.vllm_importance_sampling_clip_max,
                                                  clip_min=args.vllm_importance_sampling_clip_min)
            rho = weights[valid] if valid.any() else torch.ones(1, device=weights.device)
            stats += [rho.sum(), -rho.min(), rho.max()]
        total = acc.gather(torch.stack([torch.as_tensor(v, dtype=torch.float32, device=old.device)
                                        for v in stats]).unsqueeze(0))          # [W, k]
        count = total[:, 2].sum().clamp(min=1)
        self.record("sampling/sampling_logp_difference/mean", total[:, 0].sum() / count)
        self.record("sampling/sampling_logp_difference/max", total[:, 1].max())
        if correct:
            self.record("sampling/importance_sampling_ratio/mean", total[:, 3].sum() / count)
            self.record("sampling/importance_sampling_ratio/min", -total[:, 4].max())
            self.record("sampling/importance_sampling_ratio/max", total[:, 5].max())
        return weights

    def _old_logps(self, rows, ids, mask, batch_size, group_ids=None, encoded=None) -> torch.Tensor:
        """Log-probs of the sampling policy, once per generation batch (shared-prefix path with `group_ids`)."""
        return completion_logps(self.model, self.encoder, rows, ids, mask, batch_size=batch_size,
                                temperature=self.args.temperature, group_ids=group_ids, encoded=encoded)

    # ------------------------------------------------------------------------------------- checkpoint state

    def _save_checkpoint(self, model, trial):
        """Also save a generation batch still being served (a checkpoint inside a cycle), so a resumed run trains
        on the same completions (the sampling streams are seeded, the rest is in `_resumable_attrs`)."""
        super()._save_checkpoint(model, trial)
        cycle = self.args.steps_per_generation * self.args.num_iterations
        if self._buffer is not None and self._step % cycle:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            save_buffer(self._buffer, os.path.join(folder, BUFFER_FILE.format(rank=self.accelerator.process_index)))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, BUFFER_FILE.format(rank=self.accelerator.process_index)) if checkpoint else None
        if path and os.path.isfile(path):
            rows = self.train_dataset
            position = {index: i for i, index in enumerate(rows.indices)}
            self._buffer = load_buffer(path, lambda index: rows[position[index]], self.accelerator.device)

    # ------------------------------------------------------------------------------------------------ loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        mask = inputs["completion_mask"]
        with self.router_aux.policy_pass(model) as routers:                 # MoE load balancing (policy only)
            logps, entropy = micro_batch_logps(model, inputs, temperature=args.temperature, with_entropy=True)
        old = inputs["old_logps"] if inputs["old_logps"] is not None else logps.detach()
        training = model.training
        ga = args.gradient_accumulation_steps if training else 1
        spg = args.steps_per_generation if training else 1
        # dapo: tokens of the whole generation batch, per optimiser step, times W for DDP's gradient averaging
        normalizer = inputs["num_items_in_batch"] * ga / (spg * self.accelerator.num_processes)
        loss, metrics = policy_loss(
            logps, old, inputs["advantages"], inputs["loss_mask"], epsilon_low=args.epsilon,
            epsilon_high=args.epsilon_high, delta=args.delta, importance_sampling_level=args.importance_sampling_level,
            loss_type=args.loss_type, beta=args.beta, ref_logps=inputs["ref_logps"],
            max_completion_length=args.max_completion_length, num_items_in_batch=normalizer,
            kl_importance_correction=args.use_bias_correction_kl, sapo_temperature_pos=args.sapo_temperature_pos,
            sapo_temperature_neg=args.sapo_temperature_neg,
            vespo_params=(args.vespo_k_pos, args.vespo_lambda_pos, args.vespo_k_neg, args.vespo_lambda_neg),
            sampling_weights=inputs.get("sampling_weights"))
        if args.loss_type not in TOKEN_NORMALISED_LOSS_TYPES:
            loss = loss / ga
        loss = self.router_aux.add(self, loss, routers, ga)
        maskf = mask.to(entropy.dtype)
        metrics["entropy"] = (entropy.detach() * maskf).sum() / maskf.sum().clamp(min=1)
        names = sorted(metrics)
        values = self.accelerator.gather(torch.stack([metrics[k].float() for k in names]).unsqueeze(0)).mean(0)
        for name, value in zip(names, values.tolist()):
            self.record(name, value)
        return (loss, {"loss": loss.detach()}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            batch = self._generate_and_score(inputs["rows"])
            loss = self.compute_loss(model, self._with_forward_batch(batch.select(list(range(len(batch))))))
        return loss.detach(), None, None
