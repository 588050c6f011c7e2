"""Gemma 3 on vLLM's CPU backend: how far its log-probs are from the trainer's (vLLM-CPU attends causally over the
image block, transformers bidirectionally). Small Gemma 3 of `vlmalign.models.tiny` with the four newline tokens
vLLM's Gemma 3 processor looks up added; 4 prompts x 4 completions of 16 tokens, before and after a perturbation
of every weight (pushed to vLLM). Measured on a 2-core CPU (vllm-cpu 0.32.0): mean 0.088 / max 0.375, then mean
0.098 / max 0.452 per token. Run in the vLLM venv: `/work/venvs/vllm/bin/python benchmarks/vllm_gemma3_gap.py`.
"""
import os, sys, time, tempfile
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0"); os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
import torch
from transformers import AutoModelForImageTextToText
from vlmalign.models.tiny import make_tiny_model
from vlmalign.models.loading import load_processor
from vlmalign.models.families import get_family
from vlmalign.data.collate import Encoder
from vlmalign.data.synthetic import make_dataset
from vlmalign.data.formats import normalize_row
from vlmalign.rl.vllm_engine import VLLMEngine, EngineSettings, write_engine_folder
from vlmalign.rl.vllm_backend import VLLMGeneration
from vlmalign.rl.rollout import SamplingConfig
from vlmalign.rl.completions import completion_logps
d = make_tiny_model("gemma3", "small", tempfile.mkdtemp())
model = AutoModelForImageTextToText.from_pretrained(d); proc = load_processor(d)
n = proc.tokenizer.add_tokens(["\n", "\n\n", "\n\n\n", "\n\n\n\n"])
model.resize_token_embeddings(len(proc.tokenizer))
print("added", n, len(proc.tokenizer), model.config.text_config.vocab_size)
family = get_family(model); enc = Encoder(proc, family, family.image_token_id(model))
folder = write_engine_folder(model, proc, tempfile.mkdtemp(), family)
eng = VLLMEngine(folder, family, EngineSettings(extra={"kv_cache_memory_bytes": 64<<20}, max_model_len=1024))
gen = VLLMGeneration(eng, enc)
ds = make_dataset("color", "prompt", n=4, seed=0)
rows = [{**normalize_row(ds[i], "prompt", i), "_index": i} for i in range(4)]
rows = [r for r in rows for _ in range(4)]
s = SamplingConfig(max_completion_length=16)
for it in range(2):
    gen.sync(model, it)
    ro = gen.generate(rows, list(range(16)), s)
    lp = completion_logps(model, enc, rows, ro.completion_ids, ro.completion_mask, batch_size=8)
    m = ro.completion_mask.bool()
    d_ = (lp - ro.sampling_logps).abs()[m]
    print("GEMMA3 round", it, "max", d_.max().item(), "mean", d_.mean().item(), flush=True)
    with torch.no_grad():
        for p in model.parameters(): p.add_(torch.randn_like(p) * 0.2 * p.std().nan_to_num(0.01))
