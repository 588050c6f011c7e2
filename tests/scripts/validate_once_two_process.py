"""Row validation done once per job, for tests/test_distributed_unit.py (launched with 2 processes, gloo, CPU).

Builds an SFT trainer on 6 image rows, counting on each process the images decoded (`formats._load_rgb`) and the
chat-template checks (`dataset.check_with_template`) while the trainer is built; then builds one on a dataset whose
row 3 has two images for one placeholder and records the error each process raised. Writes <out>.<rank>.json."""

import json
import os
import sys

import torch

torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from datasets import Dataset  # noqa: E402

from vlmalign import SFTConfig, SFTTrainer  # noqa: E402
from vlmalign.data import dataset as dataset_module, formats  # noqa: E402
from vlmalign.data.synthetic import make_dataset  # noqa: E402


def main(model_path: str, out_path: str) -> None:
    counts = {"decoded_images": 0, "template_checks": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    formats._load_rgb = counting("decoded_images", formats._load_rgb)
    dataset_module.check_with_template = counting("template_checks", dataset_module.check_with_template)
    args = SFTConfig(output_dir=os.path.join(os.path.dirname(out_path), "run"), per_device_train_batch_size=1,
                     max_steps=1, max_length=512, save_strategy="no", use_cpu=True, disable_tqdm=True,
                     report_to="none", dataloader_num_workers=0)
    rank = args.process_index
    good = make_dataset("color", "sft", n=6, seed=0)
    trainer = SFTTrainer(model=model_path, args=args, train_dataset=good)
    result = {"rank": rank, "world_size": args.world_size, **counts, "rows": list(trainer.train_dataset.indices)}
    rows = [dict(r) for r in good]
    rows[3]["images"] = [rows[3]["images"][0]] * 2   # one placeholder, two images
    try:
        SFTTrainer(model=trainer.model, processing_class=trainer.processing_class, args=args,
                   train_dataset=Dataset.from_list(rows))
        result["error"] = None
    except Exception as err:
        result["error"] = f"{type(err).__name__}: {err}"
    json.dump(result, open(f"{out_path}.{rank}.json", "w"))


if __name__ == "__main__":
    main(*sys.argv[1:])
