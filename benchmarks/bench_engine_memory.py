"""Memory per process under DDP, FSDP2 and DeepSpeed ZeRO-3 (2 CPU processes, gloo), SFT on the `small` Qwen2-VL.

    python benchmarks/bench_engine_memory.py            # builds the model, launches each engine, prints a table

Per engine: one `accelerate launch --num_processes 2` with the shipped config of examples/accelerate (plus
`--mixed_precision no`), 3 SFT steps (AdamW, batch 4 per process, 224 px images). Each process reports, after
training, the bytes it holds of the policy's parameters and of the optimizer state (exp_avg / exp_avg_sq: ZeRO-3's
fp32 partitions, FSDP2's local shards), and its peak resident memory (ru_maxrss: process-wide, so it also counts
Python, torch and activations). Results: benchmarks/results_engine_memory.md.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "accelerate"
ENGINES = {"DDP": ["--multi_gpu"], "FSDP2": ["--config_file", str(CONFIGS / "fsdp.yaml")],
           "ZeRO-3": ["--config_file", str(CONFIGS / "zero3.yaml")]}


def _local_numel(param) -> int:
    if hasattr(param, "ds_tensor"):                 # ZeRO-3 partition
        return param.ds_tensor.numel()
    if hasattr(param, "to_local"):                  # FSDP2 DTensor shard
        return param.to_local().numel()
    return param.numel()


def _optimizer_state_bytes(trainer) -> int:
    optimizer = trainer.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)          # accelerate / DeepSpeed wrappers
    inner = getattr(inner, "optimizer", inner)
    total = 0
    for state in inner.state.values():
        for v in state.values():
            if hasattr(v, "numel") and v.dim() > 0:
                v = v.to_local() if hasattr(v, "to_local") else v          # FSDP2: the local shard
                total += v.numel() * v.element_size()
    return total


def worker(model: str, out: str) -> None:
    import torch

    torch.set_num_threads(1)
    from vlmalign import SFTConfig, SFTTrainer
    from vlmalign.data.synthetic import make_dataset

    try:  # DeepSpeed's JIT-compiled shared-memory all-reduce is not needed here (gloo)
        import deepspeed.ops
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
    except ImportError:
        pass
    args = SFTConfig(output_dir=os.path.join(out, "run"), per_device_train_batch_size=4, max_steps=3,
                     learning_rate=1e-4, save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
                     dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=args,
                         train_dataset=make_dataset("color", "sft", n=32, seed=0, image_size=224))
    trainer.train()
    engine_model = trainer.model_wrapped if trainer.is_deepspeed_enabled else trainer.model
    params = sum(_local_numel(p) * p.element_size() for p in engine_model.parameters())
    report = {"rank": int(os.environ["RANK"]), "engine": str(trainer.accelerator.distributed_type),
              "param_bytes": params, "optimizer_state_bytes": _optimizer_state_bytes(trainer),
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "total_params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                  for p in engine_model.parameters())}
    with open(os.path.join(out, f"rank{report['rank']}.json"), "w") as f:
        json.dump(report, f)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    from vlmalign.models.tiny import make_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="engine_memory_"))
    model = str(make_tiny_model("qwen2_vl", "small", tmp / "model", seed=0))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    rows = []
    chosen = os.environ.get("BENCH_ENGINES")
    for name, launch in ENGINES.items():
        if chosen and name not in chosen.split(","):
            continue
        out = tmp / name
        out.mkdir()
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(_port()), __file__, "--worker", model, str(out)]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if result.returncode != 0:
            print(f"{name}: failed\n{result.stderr[-3000:]}")
            continue
        for rank in (0, 1):
            rows.append((name, json.loads((out / f"rank{rank}.json").read_text())))
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    print("| engine | rank | parameters held (MiB) | optimizer state held (MiB) | peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['rank']} | {mib(r['param_bytes'])} | {mib(r['optimizer_state_bytes'])} | "
              f"{mib(r['peak_rss_bytes'])} |")
    if rows:
        print(f"\nmodel: {rows[0][1]['total_params']:,} parameters (fp32)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
