"""GRPO on a tiny model for the multi-process equivalence test (tests/test_grpo.py).

Run with 1 process (`python grpo_two_process.py MODEL OUT.json`) or more (`accelerate launch --cpu
--num_processes 2 grpo_two_process.py MODEL OUT.json`): the global batch is the same (16 completions = 4 prompts x
G=4, per-device batch 16 / processes), so every quantity should match. Writes, from the main process, the
gathered completions and advantages of the first generation batch and the logged loss of each step."""

import json
import os
import sys

import torch

torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from accelerate.utils import gather_object  # noqa: E402

from vlmalign.data.synthetic import make_dataset  # noqa: E402
from vlmalign.models.loading import load_processor  # noqa: E402
from vlmalign.trainers.grpo import GRPOConfig, GRPOTrainer  # noqa: E402

GLOBAL_BATCH = 16


def length_reward(completions, **kwargs):
    """Depends on the completion only (so it is the same whichever process sampled it); varies within groups."""
    return [float(len(c) % 5) + 0.5 * c.count("e") for c in completions]


def main(model_path: str, out_path: str, loss_type: str = "dapo") -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = GRPOConfig(
        output_dir=os.path.join(os.path.dirname(out_path), "run"), per_device_train_batch_size=GLOBAL_BATCH // world,
        num_generations=4, max_completion_length=5, num_iterations=2, beta=0.04, loss_type=loss_type,
        learning_rate=1e-2, max_steps=2, logging_steps=1, save_strategy="no", seed=0, use_cpu=True,
        disable_tqdm=True, report_to="none", dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=model_path, reward_funcs=[length_reward], args=args,
                          train_dataset=make_dataset("color", "prompt", n=32, seed=0),
                          processing_class=load_processor(model_path))
    captured = {}
    original = trainer._generate_and_score

    def capture(rows):
        batch = original(rows)
        if "advantages" not in captured:  # first generation batch, gathered over processes in order
            captured["advantages"] = trainer.accelerator.gather(batch.advantages).tolist()
            texts = trainer.processing_class.tokenizer.batch_decode(
                [ids[m.bool()].tolist() for ids, m in zip(batch.completion_ids, batch.completion_mask)])
            captured["completions"] = gather_object(texts)
            captured["prompt_rows"] = gather_object([r["_index"] for r in rows])
        return batch

    trainer._generate_and_score = capture
    trainer.train()
    if trainer.accelerator.is_main_process:
        captured["loss"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        captured["grad_norm"] = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
        captured["world_size"] = trainer.accelerator.num_processes
        with open(out_path, "w") as f:
            json.dump(captured, f)
    # Tear the process group down here rather than at interpreter exit: a gloo group (and the DDP reducer in a
    # reference cycle with the trainer) destroyed during finalisation intermittently aborted a rank with
    # "terminate called without an active exception" after training had finished.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
