"""Shared-prefix vs plain (prompt repeated G times): training forward+backward, peak memory, generation.

Setup: the `small` Qwen2-VL of `vlmalign.models.tiny` (hidden 256, 4 layers; 224 px images -> 256 image tokens
per prompt), B = 2 prompts of different lengths (left padding), G = 8 completions of C = 64 tokens each.

* forward+backward of the per-token log-probs (loss = their sum):
  - plain:  `token_logps(model, append_completions(prompts repeated G times, ...), keep_last=C)`;
  - shared: `shared_prefix_logps` (approach (a): prompt KV cache once, expanded to the group);
  - packed: approach (b), a prototype kept here only to compare: one row per prompt [prompt, c_1 .. c_G] with a
    4-D block attention mask and the completions' 3-D positions restarted after the prompt;
  median of `--repeats` (default 5) after 1 warm-up, the variants alternating within each repetition; both the
  wall time and the process CPU time (user + system) are reported: on shared cores the CPU time is the steadier
  measure of work (the wall time swings with the other processes' load). One torch thread by default: with two
  threads on busy cores OpenMP's spin-waiting inflates both measures.
* peak memory of one forward+backward: the kernel's high-water mark of the process (VmHWM of /proc/self/status),
  reset before each measured step (`echo 5 > /proc/self/clear_refs`), minus the resident size just before the
  step. The script re-executes itself with `MALLOC_MMAP_THRESHOLD_=65536` so that glibc returns freed tensors to
  the system (otherwise the resident size of one step hides the next one's allocations). Where clear_refs is not
  writable it falls back to sampling VmRSS every 0.5 ms in a thread.
* generation (greedy, `vlmalign.rl.rollout.generate`): prefill only (max_new_tokens=1) and the full 64 tokens,
  `shared_prefix=False` (every completion's row prefilled: vision tower and prompt G times) vs True (each prompt
  prefilled once, cache expanded); the tokens are checked to be identical.

Run: `python benchmarks/bench_shared_prefix.py` (a few minutes on one CPU core). CPU float32, torch threads =
`--threads` (default 1).

Qwen3.5 (`--family qwen3_5 --repeats 3 --gen-repeats 1`, small: 4.0M parameters, 3 gated-DeltaNet + 1 full-attention
layers, transformers' torch kernels; P = 290 with 256 image tokens, G = 8, C = 64; 2 shared cores under load 5-9,
so noisy): the linear-attention states are shared like the keys/values, so the shared path keeps its gain.
forward+backward plain 17.57 s wall / 9.80 s CPU, shared 3.47 s / 2.12 s (5.06x / 4.63x), peak memory 1016 -> 239
MiB (4.25x); max |logp diff| 9.5e-7, gradient relative error 8.3e-7. Generation (greedy, same tokens): prefill 7.4x
faster (peak memory 197 -> 27 MiB), 64 new tokens 2.7x.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import threading
import time

import numpy as np
import torch
from PIL import Image

from vlmalign.data.collate import Encoder, append_completions
from vlmalign.losses.logprobs import token_logprobs_from_hidden
from vlmalign.models.families import get_family
from vlmalign.models.forward import lm_head_bypassed, token_logps
from vlmalign.models.shared_prefix import group_index, mrope_positions, shared_prefix_logps
from vlmalign.models.tiny import build_tiny_model
from vlmalign.rl.rollout import SamplingConfig, generate

MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


# ---------------------------------------------------------------------------------------------------------- setup


def setup(num_prompts: int, num_generations: int, completion_length: int, seed: int = 0,
          family_name: str = "qwen2_vl") -> dict:
    model, processor = build_tiny_model(family_name, "small", seed=seed)
    family = get_family(model)
    encoder = Encoder(processor, family, family.image_token_id(model))
    rng = np.random.default_rng(seed)
    texts = ["what color is the shape in the middle of this picture ?", "count them", "which shape is left ?"]
    rows = [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": texts[i % 3]}]}],
             "images": [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8))]}
            for i in range(num_prompts)]
    kw = dict(padding_side="left", add_generation_prompt=True, with_labels=False)
    unique = encoder.encode([r["prompt"] for r in rows], [r["images"] for r in rows], **kw)
    repeated = encoder.encode([r["prompt"] for r in rows for _ in range(num_generations)],
                              [r["images"] for r in rows for _ in range(num_generations)], **kw)
    n = num_prompts * num_generations
    gen = torch.Generator().manual_seed(seed)
    special = set(encoder.vision_token_ids.tolist()) | set(processor.tokenizer.all_special_ids)
    vocab = torch.tensor([i for i in range(len(processor.tokenizer)) if i not in special])
    completion_ids = vocab[torch.randint(0, len(vocab), (n, completion_length), generator=gen)]
    completion_mask = torch.ones_like(completion_ids)
    model.train()
    return dict(model=model, processor=processor, family=family, encoder=encoder, rows=rows, unique=unique,
                plain=append_completions(repeated, completion_ids, completion_mask, encoder),
                completion_ids=completion_ids, completion_mask=completion_mask, G=num_generations)


# -------------------------------------------------------------------------------------------------------- variants


def plain_logps(ctx) -> torch.Tensor:
    mask = ctx["completion_mask"]
    return token_logps(ctx["model"], ctx["plain"], mask, keep_last=mask.shape[1])[0]


def shared_logps(ctx) -> torch.Tensor:
    return shared_prefix_logps(ctx["model"], ctx["unique"], ctx["completion_ids"], ctx["completion_mask"], ctx["G"])[0]


def packed_logps(ctx) -> torch.Tensor:
    """Approach (b), Qwen-only prototype: one row [prompt, c_1 .. c_G] per prompt [B, P + G*C]; a 4-D mask lets
    completion g see the (valid) prompt and its own earlier tokens; positions restart after the prompt."""
    model, family, prompts = ctx["model"], ctx["family"], ctx["unique"]
    ids, pmask = prompts["input_ids"], prompts["attention_mask"]
    cids, cmask, G = ctx["completion_ids"], ctx["completion_mask"], ctx["G"]
    rows, length = ids.shape
    width = cids.shape[1]
    total = length + G * width
    packed_ids = torch.cat([ids, cids.reshape(rows, G * width)], dim=1)                      # [B, L]
    valid = torch.cat([pmask, cmask.reshape(rows, G * width)], dim=1).bool()                  # [B, L]
    block = torch.cat([torch.full((length,), -1), torch.arange(G).repeat_interleave(width)])  # -1: prompt
    pos = torch.arange(total)
    allowed = (pos[None, :] <= pos[:, None]) & ((block[:, None] == block[None, :]) | (block[None, :] == -1))
    mask4 = (allowed[None] & valid[:, None, :]) | torch.eye(total, dtype=torch.bool)[None]    # [B, L, L]
    prompt_pos, completion_pos = mrope_positions(model, family, prompts, cmask, group_index(rows, G))
    position_ids = torch.cat([prompt_pos, completion_pos.reshape(3, rows, G * width)], dim=2)  # [3, B, L]
    inputs = {k: v for k, v in prompts.items() if k not in ("input_ids", "attention_mask", family.token_type_key)}
    with lm_head_bypassed(model) as head:
        hidden = model(input_ids=packed_ids, attention_mask=mask4[:, None], position_ids=position_ids,
                       mm_token_type_ids=family.token_type_ids(packed_ids, ctx["encoder"].image_token_id),
                       use_cache=False, **inputs).logits                                     # [B, L, H]
    j = torch.arange(width)
    source = torch.where(j[None] == 0, length - 1, length + torch.arange(G)[:, None] * width + j[None] - 1)  # [G, C]
    hidden = hidden[:, source.flatten()].reshape(rows * G, width, -1)                          # [N, C, H]
    scored = cmask.bool()
    logps, _ = token_logprobs_from_hidden(hidden[scored], head, cids[scored])
    return logps.new_zeros(scored.shape).masked_scatter(scored, logps)


VARIANTS = {"plain": plain_logps, "shared": shared_logps, "packed": packed_logps}


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of `fn()`."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def train_step(ctx, name: str) -> tuple[float, float]:
    ctx["model"].zero_grad(set_to_none=True)
    return timed(lambda: VARIANTS[name](ctx).sum().backward())


# ---------------------------------------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1))


def peak_extra_mb(fn) -> tuple[float, str]:
    """Peak resident memory above the level just before `fn()`, in MiB, and the method used."""
    import gc

    gc.collect()
    before = _status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                       # resets VmHWM to the current resident size
        fn()
        return (_status_kb("VmHWM") - before) / 1024, "VmHWM"
    except OSError:
        peak, done = [before], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], _status_kb("VmRSS"))
                time.sleep(0.0005)

        thread = threading.Thread(target=sample)
        thread.start()
        try:
            fn()
        finally:
            done.set()
            thread.join()
        return (peak[0] - before) / 1024, "VmRSS sampled"


# ------------------------------------------------------------------------------------------------------------ main


def median_alternating(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """name -> (median wall s, median CPU s) of `fns[name]()` (which returns (wall, cpu)), run alternately."""
    times = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            elapsed = fn()
            if i >= warmup:
                times[name].append(elapsed)
    return {name: tuple(statistics.median(t[k] for t in values) for k in (0, 1)) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--completion-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gen-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-packed", action="store_true")
    parser.add_argument("--family", default="qwen2_vl", help="tiny-model family (`small` size); qwen3_5 / qwen3_5_moe "
                        "share their linear-attention states too (the packed prototype is skipped for them: its 4-D "
                        "block mask does not reach linear-attention layers)")
    args = parser.parse_args()
    if os.environ.get(MMAP_ENV) is None:                       # see the module docstring (memory method)
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, MMAP_ENV: "65536"})
    torch.set_num_threads(args.threads)

    ctx = setup(args.prompts, args.generations, args.completion_length, family_name=args.family)
    if args.family.startswith("qwen3_5"):
        args.skip_packed = True
    P = ctx["unique"]["input_ids"].shape[1]
    n_image = int((ctx["unique"]["input_ids"] == ctx["encoder"].image_token_id).sum(1)[0])
    print(f"small {args.family}, {sum(p.numel() for p in ctx['model'].parameters()) / 1e6:.1f}M parameters; "
          f"B={args.prompts} prompts (padded P={P}, {n_image} image tokens each), G={args.generations}, "
          f"C={args.completion_length}; torch {torch.__version__}, {args.threads} threads")

    variants = [v for v in VARIANTS if not (args.skip_packed and v == "packed")]
    # correctness first: values and gradients of every variant against the plain path
    reference, grads = None, {}
    for name in variants:
        ctx["model"].zero_grad(set_to_none=True)
        logps = VARIANTS[name](ctx)
        logps.sum().backward()
        flat = torch.cat([p.grad.flatten() for p in ctx["model"].parameters() if p.grad is not None])
        if reference is None:
            reference, grads["plain"] = logps.detach(), flat
        else:
            err = (logps.detach() - reference).abs().max().item()
            gerr = ((flat - grads["plain"]).norm() / grads["plain"].norm()).item()
            print(f"  {name:>6} vs plain: max |logp diff| {err:.2e}, gradient relative error {gerr:.2e}")

    # forward + backward time
    times = median_alternating({v: (lambda v=v: train_step(ctx, v)) for v in variants}, args.repeats)
    memory, method = {}, ""
    for v in variants:
        memory[v], method = peak_extra_mb(lambda v=v: train_step(ctx, v))

    # generation
    gen_times, tokens = {}, {}
    for new_tokens in (1, args.completion_length):
        sampling = SamplingConfig(max_completion_length=new_tokens, do_sample=False)

        def run(shared, new_tokens=new_tokens, sampling=sampling):
            def call():
                tokens[(new_tokens, shared)] = generate(
                    ctx["model"], ctx["encoder"], ctx["rows"], num_generations=args.generations, sampling=sampling,
                    shared_prefix=shared).completion_ids
            return timed(call)

        result = median_alternating({False: lambda: run(False), True: lambda: run(True)}, args.gen_repeats)
        same = torch.equal(tokens[(new_tokens, False)], tokens[(new_tokens, True)])
        gen_times[new_tokens] = (result[False], result[True], same)
    gen_memory = {s: peak_extra_mb(lambda s=s: generate(
        ctx["model"], ctx["encoder"], ctx["rows"], num_generations=args.generations,
        sampling=SamplingConfig(max_completion_length=1, do_sample=False), shared_prefix=s))[0] for s in (False, True)}

    print(f"\nforward+backward (median of {args.repeats} after 1 warm-up, alternating); speed-up = plain / variant;"
          f" peak memory above the pre-step level ({method}):")
    print(f"  {'variant':<8} {'wall s':>7} {'speed-up':>9} {'CPU s':>7} {'speed-up':>9} {'peak MiB':>9} {'less':>7}")
    for v in variants:
        (wall, cpu), (pwall, pcpu) = times[v], times["plain"]
        print(f"  {v:<8} {wall:>7.2f} {pwall / wall:>8.2f}x {cpu:>7.2f} {pcpu / cpu:>8.2f}x {memory[v]:>9.0f} "
              f"{memory['plain'] / max(memory[v], 1e-9):>6.2f}x")
    print(f"\ngeneration, greedy (median of {args.gen_repeats} after 1 warm-up, alternating); "
          "speed-up = plain / shared:")
    print(f"  {'new tokens':<11} {'plain wall':>10} {'shared':>7} {'speed-up':>9} {'plain CPU':>10} {'shared':>7} "
          f"{'speed-up':>9} {'same tokens':>12}")
    for new_tokens, ((pw, pc), (sw, sc), same) in gen_times.items():
        print(f"  {new_tokens:<11} {pw:>10.2f} {sw:>7.2f} {pw / sw:>8.2f}x {pc:>10.2f} {sc:>7.2f} {pc / sc:>8.2f}x "
              f"{str(same):>12}")
    print(f"  prefill peak memory: plain {gen_memory[False]:.0f} MiB, shared {gen_memory[True]:.0f} MiB "
          f"({gen_memory[False] / max(gen_memory[True], 1e-9):.2f}x)")


if __name__ == "__main__":
    main()
