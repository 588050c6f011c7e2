"""vlmalign vs TRL 1.16 on the same tiny VLM: step time and peak memory of SFT, DPO, MPO, GRPO and GSPO.

Setup (identical for both libraries unless noted):

* model: the `small` Qwen2-VL of `vlmalign.models.tiny` (hidden 256, 4 text layers, 2 vision layers; every image
  is resized to 224 x 224 px -> 256 image tokens per prompt), float32 on CPU, loaded by each library from the same
  directory (`model=<path>`, each library's documented usage). TRL gets vlmalign's `load_processor(dir)` object as
  `processing_class` (its `AutoProcessor` route needs torchvision, absent here), left-padded for GRPO as TRL asks.
* data: vlmalign's synthetic `color` task (same rows, same 224 px images) with the assistant answers replaced by
  exactly `--completion-length` (64) tokens of task words, so SFT / DPO / MPO train on 64-token answers.
* SFTVAR: SFT on answers of 8-256 tokens (uniform, seeded; the same rows for both); vlmalign with
  `padding_free=True` (the rows of each batch packed into one sequence), TRL with its defaults (padded batch).
* GRPO / GSPO: G = `--generations` (8) completions per prompt, `--prompts` (2) prompts per generation batch, every
  completion exactly 64 tokens: `min_new_tokens = max_new_tokens = 64`, so the end-of-turn token cannot end a
  completion early. vlmalign has no generation-kwargs option: the saved model's `generation_config.json` carries
  `min_new_tokens` (transformers fills a generate call's unset options from it); TRL also gets
  `generation_kwargs={"min_new_tokens": 64}`. Completion lengths are checked in both. beta = 0.04 (a reference
  pass in every step), loss `dapo`; GRPO: one generation per optimiser step (per_device_train_batch_size = 16 =
  2 x 8 completions, steps_per_generation = gradient_accumulation_steps = 1: on-policy, no old-policy pass).
  GSPO: the GSPO preset (sequence-level ratio, loss `grpo`, beta 0, epsilon 3e-4 / 4e-4) with
  steps_per_generation = 4 (the paper's 4 x gradient_accumulation_steps): per_device_train_batch_size 4, so each
  generation batch (the same 2 prompts x 8) feeds 4 optimiser steps and needs the old-policy pass; a GSPO "step"
  below is one such cycle of 4 optimiser steps.
* both: float32 (TRL's bf16 default off; `--bf16`: bf16 autocast in both), gradient checkpointing off (TRL turns
  it on by default; `--gradient-checkpointing` turns it on in both), no LoRA (`--lora`: the same adapters), AdamW, no
  logging or saving during the run, `--threads` torch threads (default 1) in each process, dataloader in the main
  process.

Measurement: the two libraries run in two processes, alternating step by step (vlmalign step, TRL step, vlmalign
step, ...; each waits while the other runs), `--warmup` (1) unmeasured then `--steps` (3) measured steps each; the
median is reported. A step is timed from the moment the process is let go until the Trainer's `on_step_end` (so
it includes fetching and collating the batch). Peak memory: the method of `bench_shared_prefix.py`, per process:
VmHWM of /proc/self/status reset through /proc/self/clear_refs at the start of the step, minus the resident size
then (glibc's mmap threshold lowered so that freed tensors go back to the system); "loss pass" is the same
measure around `compute_loss` + backward (the policy forward and backward; DPO's reference forward included).
GRPO / GSPO time shares, measured inside each library: generation = vlmalign's `sample_completions` / TRL's
`GRPOTrainer._generate` (prompt encoding, prefill and sampling); training passes = every log-prob pass
(vlmalign's `completion_logps` + `micro_batch_logps`, TRL's `_get_per_token_logps_and_entropies`: old-policy,
reference, policy) + the backward (`accelerator.backward`); the rest (rewards, processor calls outside those,
optimiser step, data loading) is "other".

Run: `python benchmarks/bench_vs_trl.py` (about 4-5 minutes on 2 CPU cores); `--methods grpo,gspo` for a subset;
`--profile` adds a cProfile summary of one measured step of each library per method. Needs `pip install
"vlmalign[bench]"` (TRL 1.16). Writes the table to `benchmarks/results.md` (`--out`).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import multiprocessing as mp
import os
import pstats
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_shared_prefix import MMAP_ENV, _status_kb  # noqa: E402
from _bench_vs_trl_report import GSPO_STEPS_PER_GENERATION, VARLEN, fmt_ratio, render, summarise  # noqa: E402

METHODS = ("sft", "sftvar", "dpo", "mpo", "grpo", "gspo")
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


# ------------------------------------------------------------------------------------------------------ memory


class PeakMeter:
    """Peak resident memory above a baseline (VmHWM reset through clear_refs), with nested windows: `start()` at a
    step's start, `inner_start()` / `inner_stop()` around a part of it (resetting VmHWM there without losing the
    step's peak so far)."""

    def __init__(self):
        self.base = self.step_peak = 0
        self.inner_base = None
        self.inner_peak = 0

    @staticmethod
    def _reset() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def start(self) -> None:
        gc.collect()
        self.base = _status_kb("VmRSS")
        self._reset()
        self.step_peak = self.base
        self.inner_peak = 0

    def inner_start(self) -> None:
        self.step_peak = max(self.step_peak, _status_kb("VmHWM"))
        self.inner_base = _status_kb("VmRSS")
        self._reset()

    def inner_stop(self) -> None:
        if self.inner_base is None:
            return
        hwm = _status_kb("VmHWM")
        self.inner_peak = max(self.inner_peak, hwm - self.inner_base)
        self.step_peak = max(self.step_peak, hwm)
        self.inner_base = None

    def stop(self) -> tuple[float, float]:
        """(step peak, largest inner-window peak) in MiB above their baselines."""
        self.step_peak = max(self.step_peak, _status_kb("VmHWM"))
        return (self.step_peak - self.base) / 1024, self.inner_peak / 1024


# ------------------------------------------------------------------------------------------------------- data


def answer_text(rng, words: list[str], length: int) -> str:
    return " ".join(rng.choice(words) for _ in range(length))


def make_rows(kind: str, n: int, length: int, tokenizer, seed: int = 0):
    """The synthetic `color` rows (224 px images) with `length`-token answers (SFT / preference), or prompts."""
    import random

    import datasets

    from vlmalign.data.synthetic import TASK_WORDS, make_dataset

    fmt = {"sft": "sft", "sftvar": "sft", "dpo": "preference", "mpo": "preference"}.get(kind, "prompt")
    data = make_dataset("color", fmt, n=n, seed=seed, image_size=224)
    words = [w for w in TASK_WORDS if len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1]
    rng = random.Random(seed)

    def answer():
        n = rng.randint(*VARLEN) if kind == "sftvar" else length
        text = answer_text(rng, words, n)
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == n
        return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]

    if fmt == "sft":
        return data.map(lambda row: {"messages": row["messages"][:-1] + answer()}, features=data.features)
    if fmt == "preference":
        return data.map(lambda row: {"chosen": answer(), "rejected": answer()}, features=data.features)
    return data


def reward_len(completions, **kwargs):
    """Varies within a group (completion text is a string in vlmalign, a message list in TRL)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(sum(map(ord, t)) % 7) for t in texts]


# ----------------------------------------------------------------------------------------------------- workers


def build_trainer(lib: str, method: str, cfg: dict, model_dir: str, out_dir: str):
    """(trainer, steps per measured unit) for one library and method."""
    from vlmalign.models.loading import load_processor

    processor = load_processor(model_dir)
    steps = cfg["warmup"] + cfg["steps"]
    G, C = cfg["generations"], cfg["completion_length"]
    common = dict(output_dir=out_dir, learning_rate=1e-6, logging_steps=10_000, save_strategy="no",
                  report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=0,
                  gradient_checkpointing=cfg["gradient_checkpointing"], bf16=cfg["bf16"])
    trl_common = {}
    if cfg["lora"]:
        from peft import LoraConfig
        # the same adapters in both: every Linear of the language model (not the vision tower, not the LM head)
        common["peft_config"] = LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    peft = {"peft_config": common.pop("peft_config")} if "peft_config" in common else {}
    rl = method in ("grpo", "gspo")
    cycle = GSPO_STEPS_PER_GENERATION if method == "gspo" else 1
    n_rows = (cfg["prompts"] if rl else cfg["batch"]) * steps * 2
    data = make_rows(method, n_rows, C, processor.tokenizer)
    if method in ("sft", "sftvar"):
        common.update(per_device_train_batch_size=cfg["batch"], max_steps=steps)
        if lib == "vlmalign":
            from vlmalign.trainers.sft import SFTConfig, SFTTrainer
            packing = dict(padding_free=True) if method == "sftvar" else {}
            trainer = SFTTrainer(model=model_dir, args=SFTConfig(**common, **packing), train_dataset=data,
                                 processing_class=processor, **peft)
        else:
            import trl
            trainer = trl.SFTTrainer(model=model_dir, args=trl.SFTConfig(**common, **trl_common,
                                     assistant_only_loss=True, max_length=None),
                                     train_dataset=data, processing_class=processor, **peft)
    elif method in ("dpo", "mpo"):
        common.update(per_device_train_batch_size=cfg["batch"] // 2, max_steps=steps, beta=0.1)
        if lib == "vlmalign":
            from vlmalign.trainers.dpo import MPO_PRESET, DPOConfig, DPOTrainer
            extra = dict(MPO_PRESET) if method == "mpo" else {}
            trainer = DPOTrainer(model=model_dir, args=DPOConfig(**common, **extra), train_dataset=data,
                                 processing_class=processor, **peft)
        else:
            import trl
            extra = dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]) \
                if method == "mpo" else {}
            trainer = trl.DPOTrainer(model=model_dir, args=trl.DPOConfig(**common, **trl_common, **extra,
                                     max_length=None), train_dataset=data, processing_class=processor, **peft)
    else:
        per_device = cfg["prompts"] * G // cycle
        common.update(per_device_train_batch_size=per_device, max_steps=steps * cycle, num_generations=G,
                      max_completion_length=C, steps_per_generation=cycle)
        if method == "gspo":
            common.update(importance_sampling_level="sequence", loss_type="grpo", beta=0.0, epsilon=3e-4,
                          epsilon_high=4e-4)
        else:
            common.update(beta=0.04, loss_type="dapo")
        if lib == "vlmalign":
            from vlmalign.trainers.grpo import GRPOConfig, GRPOTrainer
            trainer = GRPOTrainer(model=model_dir, reward_funcs=[reward_len], args=GRPOConfig(**common),
                                  train_dataset=data, processing_class=processor, **peft)
        else:
            import trl
            processor.tokenizer.padding_side = "left"
            trainer = trl.GRPOTrainer(model=model_dir, reward_funcs=[reward_len],
                                      args=trl.GRPOConfig(**common, **trl_common,
                                                          generation_kwargs={"min_new_tokens": C}),
                                      train_dataset=data, processing_class=processor, **peft)
    return trainer, cycle


def check_settings(lib: str, method: str, model, cfg: dict) -> None:
    """At the start of training (the Trainer turns checkpointing on in `train()`): the asked settings hold."""
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    assert bool(checkpointing) == cfg["gradient_checkpointing"], f"{lib} {method}: checkpointing {checkpointing}"
    assert hasattr(model, "peft_config") == cfg["lora"], f"{lib} {method}: LoRA {hasattr(model, 'peft_config')}"
    dtype = next(model.parameters()).dtype
    assert str(dtype) == "torch.float32", f"{lib} {method}: weights {dtype}"


class Timers:
    def __init__(self):
        self.reset()

    def reset(self):
        self.gen = self.passes = 0.0
        self.lengths: list[int] = []

    def wrap(self, fn, field, lengths=None):
        def wrapped(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            setattr(self, field, getattr(self, field) + time.perf_counter() - start)
            if lengths is not None:
                self.lengths += lengths(out)
            return out
        return wrapped


def instrument(lib: str, trainer, timers: Timers, meter: PeakMeter) -> None:
    """Time generation and training passes inside the library; measure the loss pass's peak memory."""
    if "GRPO" in type(trainer).__name__:
        if lib == "vlmalign":
            import vlmalign.trainers.grpo as grpo
            grpo.sample_completions = timers.wrap(grpo.sample_completions, "gen",
                                                  lambda r: r.completion_mask.sum(1).tolist())
            grpo.completion_logps = timers.wrap(grpo.completion_logps, "passes")
            grpo.micro_batch_logps = timers.wrap(grpo.micro_batch_logps, "passes")
        else:
            trainer._generate = timers.wrap(trainer._generate, "gen", lambda out: [len(c) for c in out[1]])
            trainer._get_per_token_logps_and_entropies = timers.wrap(trainer._get_per_token_logps_and_entropies,
                                                                     "passes")
    compute_loss = trainer.compute_loss

    def timed_compute_loss(*args, **kwargs):
        meter.inner_start()
        return compute_loss(*args, **kwargs)

    trainer.compute_loss = timed_compute_loss
    backward = trainer.accelerator.backward
    backward_passes = timers.wrap(backward, "passes")

    def timed_backward(*args, **kwargs):
        try:
            return backward_passes(*args, **kwargs)
        finally:
            meter.inner_stop()

    trainer.accelerator.backward = timed_backward


def worker(lib: str, method: str, cfg: dict, model_dir: str, conn) -> None:
    try:
        import torch
        from transformers import TrainerCallback

        torch.set_num_threads(cfg["threads"])
        out_dir = tempfile.mkdtemp(prefix=f"bench-{lib}-{method}-")
        trainer, cycle = build_trainer(lib, method, cfg, model_dir, out_dir)
        timers, meter = Timers(), PeakMeter()
        instrument(lib, trainer, timers, meter)
        total = (cfg["warmup"] + cfg["steps"]) * cycle
        state = {}

        def begin(index):
            conn.recv()                                  # wait for our turn
            timers.reset()
            state["profiler"] = None
            if cfg["profile"] and index == cfg["warmup"]:
                state["profiler"] = cProfile.Profile()
            meter.start()
            state["wall"], state["cpu"] = time.perf_counter(), time.process_time()
            if state["profiler"] is not None:
                state["profiler"].enable()

        def end():
            wall, cpu = time.perf_counter() - state["wall"], time.process_time() - state["cpu"]
            profile = None
            if state["profiler"] is not None:
                state["profiler"].disable()
                stream = io.StringIO()
                pstats.Stats(state["profiler"], stream=stream).sort_stats("cumulative").print_stats(30)
                profile = stream.getvalue()
            step_peak, loss_peak = meter.stop()
            conn.send({"wall": wall, "cpu": cpu, "peak": step_peak, "loss_peak": loss_peak, "gen": timers.gen,
                       "passes": timers.passes, "lengths": sorted(set(timers.lengths)), "profile": profile})

        class Gate(TrainerCallback):
            def on_train_begin(self, args, st, control, **kwargs):
                check_settings(lib, method, trainer.model, cfg)
                begin(0)

            def on_step_end(self, args, st, control, **kwargs):
                if st.global_step % cycle == 0:
                    end()
                    if st.global_step < total:
                        begin(st.global_step // cycle)

        trainer.add_callback(Gate())
        conn.send("ready")
        trainer.train()
        conn.send("done")
    except Exception:                                     # report to the parent instead of hanging it
        conn.send({"error": traceback.format_exc()})


# -------------------------------------------------------------------------------------------------------- main


def run_method(method: str, cfg: dict, model_dir: str) -> dict:
    """Both libraries on one method, alternating; {lib: [per-step stats]} or {"error": ...}."""
    ctx = mp.get_context("spawn")
    libs = ("vlmalign", "trl")
    conns, procs = {}, {}
    for lib in libs:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(lib, method, cfg, model_dir, child), daemon=True)
        proc.start()
        child.close()                                       # so that a dead worker reads as EOF, not a hang
        conns[lib], procs[lib] = parent, proc
    results = {lib: [] for lib in libs}
    try:
        for lib in libs:
            message = conns[lib].recv()
            if message != "ready":
                return {"error": f"{lib}: {message['error']}"}
        for _ in range(cfg["warmup"] + cfg["steps"]):
            for lib in libs:
                conns[lib].send("go")
                message = conns[lib].recv()
                if "error" in message:
                    return {"error": f"{lib}: {message['error']}"}
                results[lib].append(message)
        for lib in libs:
            conns[lib].recv()                               # "done"
    finally:
        for proc in procs.values():
            proc.join(timeout=60)
            if proc.is_alive():
                proc.terminate()
    return {lib: values[cfg["warmup"]:] for lib, values in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=3, help="measured steps (GSPO: cycles) per library")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=2, help="GRPO / GSPO prompts per generation batch")
    parser.add_argument("--batch", type=int, default=8, help="SFT rows / DPO sequences (2 x pairs) per step")
    parser.add_argument("--completion-length", type=int, default=64)
    parser.add_argument("--profile", action="store_true", help="cProfile one measured step of each")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="both libraries checkpoint layers")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in both (float32 weights)")
    parser.add_argument("--lora", action="store_true", help="the same LoRA adapters (r 16) in both")
    parser.add_argument("--out", default=None, help="default benchmarks/results[-gc][-bf16][-lora].md")
    args = parser.parse_args()
    command = "python benchmarks/bench_vs_trl.py" + "".join(f" {a}" for a in sys.argv[1:])
    if os.environ.get(MMAP_ENV) is None:                  # see bench_shared_prefix.py (memory method)
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**os.environ, MMAP_ENV: "65536", "OMP_NUM_THREADS": str(args.threads),
                   "TOKENIZERS_PARALLELISM": "false"})
    methods = [m.strip().lower() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; valid: {METHODS}")
    cfg = dict(steps=args.steps, warmup=args.warmup, threads=args.threads, generations=args.generations,
               prompts=args.prompts, batch=args.batch, completion_length=args.completion_length,
               profile=args.profile, gradient_checkpointing=args.gradient_checkpointing, bf16=args.bf16,
               lora=args.lora)
    setting = "".join(f"-{name}" for name, on in (("gc", args.gradient_checkpointing), ("bf16", args.bf16),
                                                   ("lora", args.lora)) if on)
    out = Path(args.out) if args.out else HERE / f"results{setting}.md"

    import torch
    import transformers
    import trl
    from transformers import GenerationConfig

    from vlmalign.models.tiny import make_tiny_model

    skipped = {}
    if {"dpo", "mpo"} & set(methods):
        try:
            from vlmalign.trainers.dpo import MPO_PRESET, DPOConfig, DPOTrainer  # noqa: F401
        except Exception as err:                          # being written in parallel
            for m in ("dpo", "mpo"):
                if m in methods:
                    methods.remove(m)
                    skipped[m] = f"vlmalign.trainers.dpo is not importable ({type(err).__name__}: {err})"

    started, load_start = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-vs-trl-") as tmp:
        model_dir = make_tiny_model("qwen2_vl", "small", Path(tmp) / "model")
        gen = GenerationConfig.from_pretrained(model_dir)
        gen.min_new_tokens = args.completion_length      # equal completion lengths (see the module docstring)
        gen.save_pretrained(model_dir)
        precision = "bf16 autocast (float32 weights)" if args.bf16 else "float32"
        extras = ", gradient checkpointing on" if args.gradient_checkpointing else ", gradient checkpointing off"
        extras += ", LoRA r 16 on the language model's linear layers" if args.lora else ""
        header = (f"## vlmalign vs TRL {trl.__version__}: small Qwen2-VL (256 image tokens per prompt), CPU {precision}"
                  f"{extras}\n\n"
                  f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} torch "
                  f"thread(s) per process, {os.cpu_count()} cores; median of {args.steps} measured steps after "
                  f"{args.warmup} warm-up, the libraries alternating step by step. GRPO: {args.prompts} prompts x "
                  f"G={args.generations}, completions of exactly {args.completion_length} tokens, beta 0.04; GSPO: "
                  f"the same generation batch feeding {GSPO_STEPS_PER_GENERATION} optimiser steps. SFT: "
                  f"{args.batch} rows per step; DPO/MPO: {args.batch // 2} pairs per step; answers of "
                  f"{args.completion_length} tokens. Speed-up = TRL time / vlmalign time; memory = vlmalign / "
                  "TRL peak above the pre-step resident size (see the script's docstring).")
        rows = []
        for method in methods:
            t0 = time.perf_counter()
            result = run_method(method, cfg, str(model_dir))
            if "error" in result:
                skipped[method] = "failed: " + result["error"].strip().splitlines()[-1]
                print(f"{method}: FAILED\n{result['error']}", flush=True)
                continue
            rows.append(summarise(method, result))
            v, t = rows[-1]["vlmalign"], rows[-1]["trl"]
            print(f"{method}: vlmalign {v['wall']:.2f} s, TRL {t['wall']:.2f} s ({fmt_ratio(t['wall'], v['wall'])}); "
                  f"peak {v['peak']:.0f} / {t['peak']:.0f} MiB [{time.perf_counter() - t0:.0f} s]", flush=True)
    table = render(rows, skipped, cfg, command, header)
    table += f"\nTotal benchmark time {time.perf_counter() - started:.0f} s.\n"
    table += ("Machine load average (1 / 5 / 15 min) at the start: {:.1f} / {:.1f} / {:.1f}; at the end: {:.1f} / {:.1f} / "
              "{:.1f} ({} cores, shared with other jobs).\n").format(*load_start, *os.getloadavg(), os.cpu_count())
    print("\n" + table)
    if args.profile:
        for row in rows:
            for lib in ("vlmalign", "trl"):
                if row[lib]["profile"]:
                    print(f"\n===== cProfile: {row['method']} / {lib} (one measured step) =====")
                    print(row[lib]["profile"])
    out.write_text(table)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
