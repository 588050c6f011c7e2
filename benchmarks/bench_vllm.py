"""HF `generate` vs vLLM for GRPO: one generation batch, and one whole GRPO step, as ratios from one run.

Setup: the `small` Qwen2-VL of `vlmalign.models.tiny` (hidden 256, 4 text layers; 224 px images -> 256 image tokens
per prompt), float32, `--prompts` (2) prompts x `--generations` (8) completions of exactly `--completion-length`
(64) tokens (the end-of-turn token cannot end one early: HF `min_new_tokens`, vLLM `min_tokens`), torch threads
`--threads` (1; vLLM's CPU worker runs in-process, `VLLM_ENABLE_V1_MULTIPROCESSING=0`, and uses the same threads).

* generation batch: HF = `vlmalign.rl.sampling.sample_completions` (shared-prefix prefill, per-completion seeds),
  vLLM = `VLLMGeneration.generate` (one request per completion, prefix caching); median of `--repeats` (3) after
  one warm-up each, alternating;
* GRPO step: `GRPOTrainer` with use_vllm False / True (colocate; TIS on, so one extra trainer pass per generation
  batch for the old log-probs; the weight sync into vLLM included), per_device_train_batch_size = prompts x G,
  one generation per optimiser step; median over `--steps` (3) steps after one warm-up step; engine start-up is
  reported separately.

Run inside the vLLM environment: `bash .ci/vllm_env.sh && /work/venvs/vllm/bin/python benchmarks/bench_vllm.py`.
On a GPU: install `vlmalign[vllm]` next to a CUDA torch and run the same script with `--device cuda`
(`--size` stays `small` unless a real checkpoint is given with `--model`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="model folder (default: build the small Qwen2-VL)")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--completion-length", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    from transformers import AutoModelForImageTextToText

    from vlmalign.data.collate import Encoder
    from vlmalign.data.formats import normalize_row
    from vlmalign.data.synthetic import make_dataset
    from vlmalign.models.families import get_family
    from vlmalign.models.loading import load_processor
    from vlmalign.models.tiny import make_tiny_model
    from vlmalign.rl.rollout import SamplingConfig
    from vlmalign.rl.sampling import derive_seed, sample_completions
    from vlmalign.rl.vllm_backend import build_vllm_generation
    from vlmalign.trainers.grpo import GRPOConfig, GRPOTrainer

    path = a.model or make_tiny_model("qwen2_vl", "small", tempfile.mkdtemp(prefix="bench-vllm-"), seed=0)
    C, G, B = a.completion_length, a.generations, a.prompts
    model = AutoModelForImageTextToText.from_pretrained(path).to(a.device)
    model.generation_config.min_new_tokens = C
    processor = load_processor(path)
    family = get_family(model)
    encoder = Encoder(processor, family, family.image_token_id(model))
    data = make_dataset("color", "prompt", n=B, seed=0)
    rows = [{**normalize_row(data[i], "prompt", i), "_index": i} for i in range(B) for _ in range(G)]
    seeds = [derive_seed(0, i) for i in range(len(rows))]
    args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=B * G, num_generations=G,
                      max_completion_length=C, use_vllm=True, vllm_engine_kwargs={"kv_cache_memory_bytes": 256 << 20},
                      max_length=1024)
    sampling = SamplingConfig(max_completion_length=C)

    class Acc:
        process_index, num_processes = 0, 1

    start = time.perf_counter()
    gen = build_vllm_generation(model, encoder, args, Acc(), sampling)
    engine_start = time.perf_counter() - start
    torch.set_num_threads(a.threads)
    gen.sync(model, 0)
    original = gen.engine.generate
    gen.engine.generate = lambda reqs, params: original(reqs, [{**q, "min_tokens": C} for q in params])

    def hf():
        out = sample_completions(model, encoder, rows, seeds, sampling)
        assert out.completion_mask.sum(1).eq(C).all(), out.completion_mask.sum(1)

    def vllm():
        out = gen.generate(rows, seeds, sampling)
        assert out.completion_mask.sum(1).eq(C).all(), out.completion_mask.sum(1)

    times = {"hf": [], "vllm": []}
    for name, fn in (("hf", hf), ("vllm", vllm)):
        fn()                                                              # warm-up
    for _ in range(a.repeats):
        for name, fn in (("hf", hf), ("vllm", vllm)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    generation = {k: statistics.median(v) for k, v in times.items()}
    del gen
    print(f"generation batch ({B} prompts x {G} x {C} tokens): HF {generation['hf']:.3f} s, vLLM "
          f"{generation['vllm']:.3f} s, HF/vLLM = {generation['hf'] / generation['vllm']:.2f}", flush=True)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t = [], None

        def on_step_begin(self, *_, **__):
            self.t = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter() - self.t)

    step = {}
    for use_vllm in (False, True):
        timer = StepTimer()
        cfg = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=B * G, num_generations=G,
                         max_completion_length=C, max_steps=a.steps + 1, learning_rate=1e-5, logging_steps=1,
                         save_strategy="no", disable_tqdm=True, report_to="none", dataloader_num_workers=0,
                         use_vllm=use_vllm, vllm_engine_kwargs={"kv_cache_memory_bytes": 256 << 20}, max_length=1024,
                         shuffle_dataset=False)
        policy = AutoModelForImageTextToText.from_pretrained(path)
        policy.generation_config.min_new_tokens = C
        t = time.perf_counter()
        trainer = GRPOTrainer(model=policy, reward_funcs=[lambda completions, **k: [float(len(c)) for c in completions]],
                              args=cfg, train_dataset=make_dataset("color", "prompt", n=B * (a.steps + 1), seed=0),
                              processing_class=processor, callbacks=[timer])
        if use_vllm:
            inner = trainer.vllm.engine.generate
            trainer.vllm.engine.generate = lambda reqs, params, inner=inner: inner(
                reqs, [{**q, "min_tokens": C} for q in params])
        init = time.perf_counter() - t
        torch.set_num_threads(a.threads)
        trainer.train()
        step["vllm" if use_vllm else "hf"] = {"median_s": statistics.median(timer.times[1:]), "init_s": init}
        del trainer
    ratio = step["hf"]["median_s"] / step["vllm"]["median_s"]
    print(f"GRPO step: HF {step['hf']['median_s']:.3f} s, vLLM {step['vllm']['median_s']:.3f} s, HF/vLLM = "
          f"{ratio:.2f} (vLLM engine start {engine_start:.1f} s)", flush=True)
    result = {"generation_s": generation, "generation_ratio_hf_over_vllm": generation["hf"] / generation["vllm"],
              "step": step, "step_ratio_hf_over_vllm": ratio, "engine_start_s": engine_start,
              "setup": vars(a), "load_avg": os.getloadavg()}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
