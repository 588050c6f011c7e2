"""All five methods (SFT, DPO, MPO, GRPO, GSPO) in one process group, in sequence, for the engine matrix test
(tests/test_engines.py). Run with 1 process (`python engine_matrix.py MODEL OUT_DIR [lora]`) or under
`accelerate launch` with 2 processes and an engine (DDP, FSDP2, DeepSpeed ZeRO-2/3): the global batch is the same,
so every logged loss, GRPO completion and advantage must match the one-process run.

The data put image rows on one process and text-only rows on the other at the first step (sequential order; for
GRPO prompts 0-1 have an image, 2-3 none), so a process runs a step without any image.
SFT also saves its final model to OUT_DIR/sft_model (every engine must write a folder `from_pretrained` loads).
Writes OUT_DIR/<method>.json from the main process. Env: METHODS (comma list, default the five and
"dpo_pre": DPO with precomputed reference log-probs)."""

import json
import os
import sys

import torch

torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from accelerate.utils import gather_object  # noqa: E402
from datasets import Dataset  # noqa: E402

try:  # DeepSpeed's optional shared-memory all-reduce kernel is JIT-compiled at first use (~100 s): gloo suffices
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
except ImportError:
    pass

from vlmalign import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer  # noqa: E402
from vlmalign.data.synthetic import make_dataset  # noqa: E402

ROWS = 8            # global batch of SFT / DPO / MPO (rows), per step
COMPLETIONS = 16    # global batch of GRPO / GSPO (completions): 4 prompts x G=4
STEPS = 2


def text_only(row: dict, keys: tuple[str, ...]) -> dict:
    """The row without its image (image items removed from every message of `keys`)."""
    out = {**row, "images": []}
    for key in keys:
        out[key] = [{**m, "content": [c for c in m["content"] if c["type"] != "image"]} for m in row[key]]
    return out


def mixed(kind: str, n: int, keys: tuple[str, ...], text_rows: range) -> Dataset:
    rows = make_dataset("color", kind, n=n, seed=0)
    rows = [text_only(r, keys) if i in text_rows else dict(r) for i, r in enumerate(rows)]
    for r in rows:
        r.pop("scene", None)
    return Dataset.from_list(rows)


def length_reward(completions, **kwargs):
    """Depends on the completion only; varies within groups."""
    return [float(len(c) % 5) + 0.5 * c.count("e") for c in completions]


def common(out_dir: str, method: str, world: int, per_device: int) -> dict:
    return dict(output_dir=os.path.join(out_dir, "run", method), per_device_train_batch_size=per_device,
                learning_rate=1e-2, max_steps=STEPS, logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True,
                max_grad_norm=1.0, dataloader_num_workers=0, train_sampling_strategy="sequential")


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")


def run(method: str, model: str, out_dir: str, lora: bool) -> dict:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    peft = lora_config() if lora else None
    captured = {}
    if method == "sft":
        data = mixed("sft", ROWS * STEPS, ("messages",), range(ROWS // 2, ROWS))
        trainer = SFTTrainer(model=model, args=SFTConfig(**common(out_dir, method, world, ROWS // world)),
                             train_dataset=data, peft_config=peft)
        compute_loss = trainer.compute_loss

        def record_images(model_, inputs, *args, **kwargs):  # which process trained on a batch without images
            captured.setdefault("has_images", []).append(gather_object([inputs.get("pixel_values") is not None]))
            return compute_loss(model_, inputs, *args, **kwargs)

        trainer.compute_loss = record_images
    elif method in ("dpo", "mpo", "dpo_pre"):
        data = mixed("preference", ROWS * STEPS, ("prompt",), range(ROWS // 2, ROWS))
        extra = {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]} if method == "mpo" else {}
        if method == "dpo_pre":  # reference log-probs precomputed, each process a share of the rows
            extra = {"precompute_ref_log_probs": True, "precompute_ref_batch_size": 4}
            import vlmalign.trainers.dpo as dpo_module

            precompute = dpo_module.precompute_reference_logps

            def counted(model_, ref, rows, *args, **kwargs):
                captured.setdefault("precomputed_rows", []).append(gather_object([len(rows)]))
                return precompute(model_, ref, rows, *args, **kwargs)

            dpo_module.precompute_reference_logps = counted
        try:
            trainer = DPOTrainer(model=model, args=DPOConfig(**common(out_dir, method, world, ROWS // world), **extra),
                                 train_dataset=data, peft_config=peft)
        except ValueError as err:  # a combination the engine refuses up front
            return {"refused": str(err), "world_size": world}
        finally:
            if method == "dpo_pre":
                dpo_module.precompute_reference_logps = precompute
    else:
        data = mixed("prompt", 8, ("prompt",), range(2, 4))
        kw = dict(num_generations=4, max_completion_length=5, num_iterations=2, shuffle_dataset=False)
        if method == "grpo":
            args = GRPOConfig(**common(out_dir, method, world, COMPLETIONS // world), beta=0.04, **kw)
        else:  # GSPO with one micro-step per generation batch, so the step losses do not depend on the world size
            args = GRPOConfig.gspo(**common(out_dir, method, world, COMPLETIONS // world), steps_per_generation=1,
                                   epsilon=0.2, epsilon_high=0.28, **kw)
        trainer = GRPOTrainer(model=model, reward_funcs=[length_reward], args=args, train_dataset=data,
                              peft_config=peft)
        original = trainer._generate_and_score

        def capture(rows):
            batch = original(rows)
            texts = trainer.processing_class.tokenizer.batch_decode(
                [ids[m.bool()].tolist() for ids, m in zip(batch.completion_ids, batch.completion_mask)])
            captured.setdefault("advantages", []).append(trainer.accelerator.gather(batch.advantages).tolist())
            captured.setdefault("completions", []).append(gather_object(texts))
            captured.setdefault("prompt_rows", []).append(gather_object([r["_index"] for r in rows]))
            return batch

        trainer._generate_and_score = capture
    trainer.train()
    if method == "sft":
        trainer.save_model(os.path.join(out_dir, "sft_model"))
    ref = getattr(trainer, "ref_model", None)
    if ref is not None:  # share of the reference model's parameters this process holds (1.0: a full replica)
        params = list(ref.parameters())
        local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else
                    p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)
        captured["ref_local_fraction"] = local / sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                                     for p in params)
    history = trainer.state.log_history
    captured["loss"] = [h["loss"] for h in history if "loss" in h]
    captured["grad_norm"] = [h["grad_norm"] for h in history if "grad_norm" in h]
    captured["world_size"] = trainer.accelerator.num_processes
    captured["engine"] = str(trainer.accelerator.distributed_type)
    return captured


def main(model: str, out_dir: str, lora: str = "") -> None:
    methods = os.environ.get("METHODS", "sft,dpo,mpo,grpo,gspo,dpo_pre").split(",")
    os.makedirs(out_dir, exist_ok=True)
    try:
        for method in methods:
            result = run(method, model, out_dir, lora == "lora")
            if int(os.environ.get("RANK", "0")) == 0:
                with open(os.path.join(out_dir, f"{method}.json"), "w") as f:
                    json.dump(result, f)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
