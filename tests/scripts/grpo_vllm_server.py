"""GRPO against a running `vlmalign vllm-serve` (tests/test_vllm.py), with 1 or 2 processes
(`accelerate launch --cpu --num_processes 2 grpo_vllm_server.py MODEL PORT OUT.json`). Writes, from the main
process, the logged losses and the largest |trainer - vLLM| log-prob difference of each generation batch."""

import json
import os
import sys

import torch

torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from vlmalign.data.synthetic import make_dataset  # noqa: E402
from vlmalign.trainers.grpo import GRPOConfig, GRPOTrainer  # noqa: E402


def length_reward(completions, **kwargs):
    return [float(len(c) % 5) + 0.5 * c.count("e") for c in completions]


def main(model_path: str, port: str, out_path: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = GRPOConfig(
        output_dir=os.path.join(os.path.dirname(out_path), "run"), per_device_train_batch_size=8 // world,
        num_generations=4, max_completion_length=8, learning_rate=1e-2, max_steps=2, logging_steps=1,
        save_strategy="no", seed=0, use_cpu=True, disable_tqdm=True, report_to="none", dataloader_num_workers=0,
        use_vllm=True, vllm_mode="server", vllm_server_port=int(port), vllm_server_timeout=600, max_length=1024)
    trainer = GRPOTrainer(model=model_path, reward_funcs=[length_reward], args=args,
                          train_dataset=make_dataset("color", "prompt", n=8, seed=0))
    trainer.train()
    if trainer.accelerator.is_main_process:
        history = trainer.state.log_history
        with open(out_path, "w") as f:
            json.dump({"loss": [h["loss"] for h in history if "loss" in h],
                       "diff": [h["sampling/sampling_logp_difference/max"] for h in history
                                if "sampling/sampling_logp_difference/max" in h],
                       "world_size": trainer.accelerator.num_processes, "synced_step": trainer.vllm.synced_step}, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
