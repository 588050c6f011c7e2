"""Fault injection for tests/test_reliability.py: SFT that SIGKILLs itself in the middle of writing a checkpoint.

`python kill_during_save.py MODEL OUTPUT_DIR KILL_STEP` trains 4 steps saving every 2; while writing the checkpoint
of step KILL_STEP, right after the model weights, optimizer and scheduler files are written (before the RNG
states and the trainer state), the process kills itself with SIGKILL: no Python clean-up, no `finally`, as an
out-of-memory kill or a pre-empted node. The test builds the resuming trainer with `make_trainer` from here, so
both use the same configuration.
"""

import os
import signal
import sys

import torch

torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # repo root

MAX_STEPS, SAVE_STEPS = 4, 2


def make_trainer(model_path: str, output_dir: str):
    from vlmalign.data.synthetic import make_dataset
    from vlmalign.trainers.sft import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=output_dir, per_device_train_batch_size=4, learning_rate=3e-3, max_steps=MAX_STEPS,
                     save_strategy="steps", save_steps=SAVE_STEPS, logging_steps=1, seed=0, disable_tqdm=True,
                     dataloader_num_workers=0, use_cpu=True)
    return SFTTrainer(model=model_path, args=args, train_dataset=make_dataset("color", "sft", n=32, seed=0))


def main(model_path: str, output_dir: str, kill_step: int) -> None:
    trainer = make_trainer(model_path, output_dir)
    write_optimizer = trainer._save_optimizer_and_scheduler

    def write_then_die(folder):
        write_optimizer(folder)
        if trainer.state.global_step == kill_step:
            print(f"killing myself while writing {folder}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    trainer._save_optimizer_and_scheduler = write_then_die
    trainer.train()
    print("finished without being killed", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
