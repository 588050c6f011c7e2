"""SFT under DDP (gloo, CPU) for tests/test_sft.py: global batch 8 (8 / processes per device), image rows mixed with
text-only rows (a process may see a batch without images: the vision tower then gets no gradient there).
Writes the logged loss of each step and a parameter checksum from the main process."""

import json
import os
import sys

import torch

torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from datasets import Dataset  # noqa: E402

from vlmalign import SFTConfig, SFTTrainer  # noqa: E402
from vlmalign.data.synthetic import make_dataset  # noqa: E402


def main(model_path: str, out_path: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    images = make_dataset("color", "sft", n=8, seed=0)
    rows = []
    for i in range(8):  # batch 0: 4 image rows then 4 text-only rows; with 2 processes one of them sees no image
        if i < 4:
            rows.append({"messages": images[i]["messages"], "images": images[i]["images"]})
        else:
            rows.append({"messages": [{"role": "user", "content": [{"type": "text", "text": "how many shapes are there ?"}]},
                                      {"role": "assistant", "content": [{"type": "text", "text": f"<answer>{i}</answer>"}]}],
                         "images": []})
    args = SFTConfig(output_dir=os.path.join(os.path.dirname(out_path), "run"), per_device_train_batch_size=8 // world,
                     learning_rate=1e-2, max_steps=2, logging_steps=1, save_strategy="no", seed=0, use_cpu=True,
                     disable_tqdm=True, optim="sgd", max_grad_norm=0.0, dataloader_num_workers=0)
    trainer = SFTTrainer(model=model_path, args=args, train_dataset=Dataset.from_list(rows))
    trainer.train()
    if trainer.accelerator.is_main_process:
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        checksum = sum(float(p.double().sum()) for p in trainer.model.parameters())
        json.dump({"world_size": world, "loss": losses, "checksum": checksum}, open(out_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:])
