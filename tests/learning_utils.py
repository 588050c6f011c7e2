"""The SFT start the learning tests share: a tiny model after a few SFT steps on the `color` task (bs 32, lr 3e-3),
saved, with its held-out greedy accuracy on 200 test images (RL must then raise it)."""
from __future__ import annotations

from pathlib import Path

from vlmalign.data.synthetic import make_dataset
from vlmalign.eval.evaluate import evaluate
from vlmalign.models.loading import load_processor
from vlmalign.trainers.sft import SFTConfig, SFTTrainer


def sft_start(path: Path, out: Path, steps: int):
    """-> (out, processor, held-out prompt rows, held-out accuracy) of `path` after `steps` SFT steps."""
    processor = load_processor(path)
    args = SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=32, learning_rate=3e-3,
                     lr_scheduler_type="constant_with_warmup", warmup_steps=10, adam_beta2=0.99, weight_decay=0.0,
                     max_grad_norm=1.0, save_strategy="no", logging_steps=steps, seed=0, disable_tqdm=True)
    trainer = SFTTrainer(model=str(path), args=args, train_dataset=make_dataset("color", "sft", n=2000, seed=0),
                         processing_class=processor)
    trainer.train()
    trainer.save_model(str(out))
    test = make_dataset("color", "prompt", n=200, seed=0, split="test")
    return out, processor, test, evaluate(trainer.model, processor, test, max_new_tokens=6).accuracy
