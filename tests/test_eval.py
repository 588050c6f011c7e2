"""`vlmalign eval` and `vlmalign compare` on saved tiny models, checked against an independent hand count."""

import json
import re
import subprocess
import sys
from html.parser import HTMLParser

import pytest
import torch
from transformers import AutoModelForImageTextToText

from vlmalign import SFTConfig, SFTTrainer
from vlmalign.data.synthetic import make_dataset
from vlmalign.eval.evaluate import pass_at_k
from vlmalign.models.loading import load_processor


@pytest.fixture(scope="module")
def trained_dirs(tiny_model_dir, tmp_path_factory):
    """A briefly trained model (mid accuracy: some right, some wrong) and the untrained one, both saved."""
    init = tiny_model_dir("qwen2_vl")
    out = tmp_path_factory.mktemp("eval_sft")
    model, processor = AutoModelForImageTextToText.from_pretrained(init), load_processor(init)
    args = SFTConfig(output_dir=str(out / "run"), per_device_train_batch_size=32, learning_rate=3e-3, max_steps=45,
                     warmup_steps=10, save_strategy="no", seed=0, disable_tqdm=True, adam_beta2=0.99)
    trainer = SFTTrainer(model=model, args=args, train_dataset=make_dataset("color", "sft", n=1000, seed=0),
                         processing_class=processor)
    trainer.train()
    trainer.save_model(str(out / "sft"))
    data = out / "test"
    make_dataset("color", "prompt", n=40, seed=0, split="test").save_to_disk(str(data))
    return {"init": init, "sft": out / "sft", "data": data}


def _hand_count(model_dir, data_dir):
    """Independent of vlmalign's evaluation: plain generate on each row alone, regex on the answer."""
    from datasets import load_from_disk

    model, processor = AutoModelForImageTextToText.from_pretrained(model_dir), load_processor(model_dir)
    ds = load_from_disk(str(data_dir))
    right = 0
    for row in ds:
        conv = [{"role": "user", "content": [{"type": "image", "image": row["images"][0]},
                                             {"type": "text", "text": row["prompt"][0]["content"][1]["text"]}]}]
        inputs = processor.apply_chat_template(conv, tokenize=True, return_dict=True, add_generation_prompt=True,
                                               return_tensors="pt")
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == model.config.image_token_id).long()
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False,
                             suppress_tokens=processor.tokenizer.convert_tokens_to_ids(
                                 ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]))
        text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        found = re.findall(r"<answer>(.*?)</answer>", text)
        right += bool(found) and found[-1].strip() == row["solution"]
    return right, len(ds)


def test_eval_json_matches_hand_count(trained_dirs, tmp_path):
    out = tmp_path / "eval.json"
    result = subprocess.run([sys.executable, "-m", "vlmalign.cli", "eval", "--model", str(trained_dirs["sft"]),
                             "--dataset", str(trained_dirs["data"]), "--reward", "accuracy", "--reward", "format",
                             "--max-new-tokens", "12", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(out.read_text())
    right, total = _hand_count(trained_dirs["sft"], trained_dirs["data"])
    assert summary["num_rows"] == total == 40
    assert 0 < right < total, "the briefly trained model should be partly right"
    assert summary["accuracy"] == pytest.approx(right / total)
    assert summary["rewards"]["accuracy_reward"] == pytest.approx(right / total)
    assert 0.0 <= summary["rewards"]["format_reward"] <= 1.0


def test_pass_at_k_estimator_by_hand():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)   # 1 - C(3,2)/C(4,2)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 3, 2) == 1.0


def test_eval_sampled_pass_at_k_consistent(trained_dirs):
    from datasets import load_from_disk

    from vlmalign.eval.evaluate import evaluate

    model = AutoModelForImageTextToText.from_pretrained(trained_dirs["sft"])
    result = evaluate(model, load_processor(trained_dirs["sft"]), load_from_disk(str(trained_dirs["data"])),
                      samples=4, temperature=1.0, max_new_tokens=12)
    by_hand = {k: sum(pass_at_k(4, sum(c), k) for c in result.correct) / len(result.correct) for k in (1, 2, 4)}
    assert result.pass_at_k == pytest.approx(by_hand)
    assert result.pass_at_k[1] <= result.pass_at_k[2] <= result.pass_at_k[4]
    assert all(len(c) == 4 for c in result.completions)


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.images, self.links, self.errors = [], [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for key in ("href", "src"):
            if key in attrs and not attrs[key].startswith("data:"):
                self.links.append(attrs[key])
        if tag not in ("img", "meta", "br"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def test_compare_report_is_self_contained_and_matches_json(trained_dirs, tmp_path):
    html_out, json_out = tmp_path / "report.html", tmp_path / "compare.json"
    result = subprocess.run([sys.executable, "-m", "vlmalign.cli", "compare", "--model", f"init={trained_dirs['init']}",
                             "--model", f"sft={trained_dirs['sft']}", "--dataset", str(trained_dirs["data"]), "--n", "12",
                             "--max-new-tokens", "12", "--out", str(html_out), "--json", str(json_out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(json_out.read_text())
    assert summary["num_rows"] == 12
    for name in ("init", "sft"):
        hand = sum(row[name]["correct"] for row in summary["rows"]) / 12
        assert summary["accuracy"][name] == pytest.approx(hand)
        for row in summary["rows"]:
            found = re.findall(r"<answer>(.*?)</answer>", row[name]["answer"])
            assert row[name]["correct"] == (bool(found) and found[-1].strip() == row["solution"])
    page = html_out.read_text()
    parser = _Collect()
    parser.feed(page)
    assert page.startswith("<!DOCTYPE html>") and not parser.errors and not parser.stack
    assert parser.links == [] and "http://" not in page and "https://" not in page
    assert len(parser.images) == 12 and all(src.startswith("data:image/png;base64,") for src in parser.images)
    assert page.count("✔") + page.count("✘") == 24
