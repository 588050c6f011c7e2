"""Tiny local models and hub-style parquet folders for running TRL's VLM example scripts on vlmalign
(benchmarks/run_trl_example_scripts.sh WORKDIR TRL_EXAMPLES_DIR). Usage: python benchmarks/trl_scripts_data.py WORKDIR"""
import os, random, sys
import datasets
from PIL import Image
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from vlmalign.models.tiny import make_tiny_model

root = sys.argv[1]
for fam in ("llava_clip", "gemma3", "qwen2_5_vl", "idefics3"):
    if not os.path.isdir(f"{root}/models/{fam}"):
        make_tiny_model(fam, "tiny", f"{root}/models/{fam}", seed=0)
COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
rng = random.Random(0)
def img(c): return Image.new("RGB", (28, 28), COLORS[c])
def write(rows, features, folder, splits=("train", "test")):
    ds = datasets.Dataset.from_list(rows, features=features)
    d = ds.train_test_split(test_size=0.2, seed=0)
    os.makedirs(f"{folder}/data", exist_ok=True)
    for split in splits:
        d[split].to_parquet(f"{folder}/data/{split}-00000-of-00001.parquet")
text = lambda t: [{"type": "text", "text": t}]
sft = []
for i in range(40):
    c = rng.choice(list(COLORS))
    sft.append({"messages": [{"role": "user", "content": [{"type": "image", "text": None}] + [{"type": "text", "text": "What colour is the image?"}]},
                             {"role": "assistant", "content": [{"type": "text", "text": c}]}], "images": [img(c)]})
f = datasets.Features({"messages": [{"role": datasets.Value("string"), "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
                       "images": datasets.List(datasets.Image())})
write(sft, f, f"{root}/data/sft")
dpo = []
for i in range(40):
    c = rng.choice(list(COLORS)); w = rng.choice([x for x in COLORS if x != c])
    dpo.append({"prompt": [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "What colour is the image?"}]}],
                "chosen": [{"role": "assistant", "content": [{"type": "text", "text": c}]}],
                "rejected": [{"role": "assistant", "content": [{"type": "text", "text": w}]}], "images": [img(c)]})
turn = [{"role": datasets.Value("string"), "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}]
f = datasets.Features({"prompt": turn, "chosen": turn, "rejected": turn, "images": datasets.List(datasets.Image())})
write(dpo, f, f"{root}/data/dpo")
# multimodal-open-r1 layout: image / problem / solution, one train split, under the hub name relative to cwd
grpo = []
for i in range(120):
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    grpo.append({"image": img(rng.choice(list(COLORS))), "problem": f"What is {a} + {b}?",
                 "solution": f"<answer> {a + b} </answer>"})
f = datasets.Features({"image": datasets.Image(), "problem": datasets.Value("string"), "solution": datasets.Value("string")})
folder = f"{root}/lmms-lab/multimodal-open-r1-8k-verified"
os.makedirs(f"{folder}/data", exist_ok=True)
datasets.Dataset.from_list(grpo, features=f).to_parquet(f"{folder}/data/train-00000-of-00001.parquet")
print("ok")
