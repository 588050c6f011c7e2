"""Write docs/trl-compatibility.md: every TRL 1.16 SFTConfig / DPOConfig / GRPOConfig argument and what vlmalign
does with it. Inputs: tests/data/trl_config_fields.json (TRL 1.16.0's fields and defaults, dumped once from TRL),
vlmalign.trainers.trl_fields.TRL_ARGUMENTS (TRL-only arguments) and NATIVE below (arguments vlmalign's configs
define themselves). tests/test_trl_scripts.py checks that every TRL argument is classified and that refusals raise.

    PYTHONPATH=. python benchmarks/make_trl_compat_table.py
"""

import dataclasses
import json
import os

from transformers import TrainingArguments

from vlmalign import DPOConfig, GRPOConfig, SFTConfig
from vlmalign.trainers.trl_fields import TRL_ARGUMENTS

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
STATUS = {"acts": "accepted, acts as in TRL", "differs": "accepted, differs", "refused": "refused unless default",
          "vllm": "see vLLM (refused for now)", "packing": "see packing (refused for now)"}

# Arguments vlmalign's configs define natively, with how they compare to TRL.
NATIVE = {
    "model_init_kwargs": ("acts", "kwargs for from_pretrained when the model is a path (a JSON string works too). "
                          "A quantization_config in it is refused early where bitsandbytes/CUDA are missing."),
    "disable_dropout": ("differs", "Default True for all three (TRL: True for SFT/DPO, False for GRPO): dropout makes "
                        "old/new log-prob ratios noisy and the tiny/LoRA runs vlmalign targets do not need it."),
    "max_length": ("differs", "Longest sequence, image tokens included. Longer rows are dropped (counted) or "
                   "rejected (truncation_policy), never cut."),
    "loss_type": ("acts", "SFT: 'nll'. DPO: a list (CLI: --loss_type a b c) of sigmoid, hinge, ipo, exo_pair, "
                  "nca_pair, robust, bco_pair, sppo_hard, apo_zero, apo_down, discopop, sft; TRL's aot, "
                  "aot_unpaired and sigmoid_norm are refused by name. GRPO: grpo, bnpo, dr_grpo, dapo, cispo, sapo, "
                  "luspo, vespo (vlmalign.losses.policy / policy_variants)."),
    "beta": ("acts", "DPO: implicit reward temperature; GRPO: k3 KL coefficient (default 0.0, TRL's)."),
    "label_smoothing": ("acts", "cDPO / robust / EXO epsilon."),
    "loss_weights": ("acts", "One weight per loss_type (MPO: 0.8 0.2 1.0)."),
    "discopop_tau": ("acts", "DiscoPOP temperature."),
    "precompute_ref_log_probs": ("acts", "Reference log-probs computed once up front; no reference model kept."),
    "precompute_ref_batch_size": ("acts", "Rows per forward when precomputing."),
    "num_generations": ("acts", "Completions per prompt (>= 2)."),
    "max_completion_length": ("differs", "Default 256 (TRL 512): CPU-sized runs; set it explicitly to match TRL."),
    "temperature": ("acts", ""), "top_p": ("acts", ""), "top_k": ("acts", ""), "min_p": ("acts", ""),
    "repetition_penalty": ("acts", ""),
    "generation_batch_size": ("acts", "TRL's batch geometry (vlmalign.trainers.grpo docstring)."),
    "steps_per_generation": ("acts", ""), "num_iterations": ("acts", ""),
    "epsilon": ("acts", ""), "epsilon_high": ("acts", "Also CISPO's epsilon_max."), "delta": ("acts", ""),
    "importance_sampling_level": ("acts", "token, sequence (TRL's) and sequence_token (GSPO-token)."),
    "scale_rewards": ("acts", "group / batch / none, and True / False (also 'True' / 'False' strings from a "
                      "command line)."),
    "mask_truncated_completions": ("acts", ""),
    "reward_weights": ("acts", ""),
    "shuffle_dataset": ("acts", "SFT: shuffle once before training; GRPO: shuffle the prompt sampler."),
    "log_completions": ("differs", "Writes completions.jsonl in output_dir (TRL logs a table to its trackers)."),
}


def _fields(cls):
    return {f.name: f for f in dataclasses.fields(cls)}


def main():
    with open(os.path.join(ROOT, "tests", "data", "trl_config_fields.json"), encoding="utf-8") as f:
        trl = json.load(f)
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    lines = [HEADER]
    for cls in (SFTConfig, DPOConfig, GRPOConfig):
        name = cls.__name__
        ours = _fields(cls)
        table = TRL_ARGUMENTS[name]
        lines += [f"\n## {name}\n", "| argument | TRL 1.16 default | vlmalign | notes |", "|---|---|---|---|"]
        for arg, info in trl[name].items():
            if arg in base:
                continue
            status, note = table.get(arg) or NATIVE.get(arg) or ("?", "")
            lines.append(f"| `{arg}` | `{info['default']}` | {STATUS.get(status, status)} | {note} |")
        differing = []
        for arg, info in trl[name].items():
            if arg not in base or arg not in ours:
                continue
            f = ours[arg]
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if repr(default) != info["default"]:
                differing.append(f"`{arg}` (TRL `{info['default']}`, vlmalign `{default!r}`)")
        lines.append(f"\nOther `{name}` arguments are `transformers.TrainingArguments` fields, handled by "
                     "transformers' Trainer as in TRL. Defaults that differ from TRL: " + ", ".join(differing) +
                     ". Reasons: below.\n")
    lines.append(FOOTER)
    out = os.path.join(ROOT, "docs", "trl-compatibility.md")
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote", out)


HEADER = """# TRL 1.16 compatibility

A TRL script runs on vlmalign after changing its `from trl import ...` lines to `from vlmalign import ...` (and
`from trl.rewards` to `from vlmalign.rewards`). Checked with TRL's six VLM example scripts (`examples/scripts/`:
sft_vlm, sft_vlm_gemma3, dpo_vlm with and without `--dataset_streaming`, mpo_vlm, grpo_vlm, gspo_vlm) on tiny local
models and hub-style parquet folders: all six run (see "Running TRL's scripts" below).
tests/test_trl_scripts.py covers the same usage patterns with code written here.

What vlmalign provides under TRL's names:

* `TrlParser`, `ScriptArguments`, `ModelConfig`, `get_peft_config`, `get_quantization_config`,
  `get_kbit_device_map` (`vlmalign/scripts_utils.py`). `--config file.yaml` sets defaults, the command line
  overrides them, `env:` sets environment variables, unknown keys raise. Differences: `lora_target_modules` drops
  stray commas (TRL's docstrings write `--lora_target_modules "q_proj", "v_proj"`, which passes `q_proj,`);
  `lora_target_modules` unset or `all-linear` picks the language model's linear layers (PEFT's `all-linear` also
  wraps the vision tower: set `lora_include_vision=True` for that); `get_quantization_config` raises, saying
  why, where bitsandbytes or CUDA is missing (TRL fails later inside bitsandbytes).
* `vlmalign.rewards`: `accuracy_reward`, `reasoning_accuracy_reward`, `get_cosine_scaled_reward`,
  `think_format_reward`, `get_soft_overlong_punishment`, `get_repetition_penalty_reward`, with TRL's signatures
  and values (tests/test_trl_rewards.py: 64 completions, equal to TRL 1.16.0's outputs, stored in
  tests/data/trl_rewards_table.json by benchmarks/derive_trl_reward_table.py, or TRL itself when installed). They
  also accept plain-string completions. vlmalign's own built-ins (`"accuracy"`, `"format"`, `"think_format"`,
  in `vlmalign.rl.rewards`) keep their names and read `<answer>` blocks: `think_format` wants
  `<think>..</think><answer>..</answer>` (TRL's wants `<think>..</think>` then anything), `accuracy` compares the
  last `<answer>` block (or the whole text) and falls back to a text match where the gold does not parse as math
  (TRL returns None there). Both read tagged solutions (`<answer> 7 </answer>`) by their content.
* Every argument of TRL 1.16's SFTConfig, DPOConfig and GRPOConfig exists in vlmalign's config of the same name
  (tables below). A refused argument is accepted at TRL's default and raises, naming the argument and the reason,
  for any other value; none is silently ignored.
* Data: streaming `IterableDataset`s (read as far as `max_steps` x the global batch needs, then validated like any
  dataset; `max_steps` is required, as for transformers' Trainer), `remove_unused_columns=True` (the default of
  SFTConfig and DPOConfig, as in TRL: keeps the columns the trainer reads; for GRPO it removes the reward
  functions' extra columns, as in TRL), hub-style parquet folders (`data/train-*.parquet`) in
  `vlmalign.data.io.load_dataset_any` and so in the CLI, `dataset_num_proc`.
* Problem/solution datasets on the CLI: `vlmalign grpo --dataset DIR --prompt_column problem --system_prompt
  "..." --reward_funcs format accuracy` builds the conversational prompt (system turn, then the row's image(s) and
  the problem text) and keeps `solution` for the rewards (`vlmalign/data/prompts.py`; test:
  tests/test_trl_scripts.py::test_cli_maps_problem_solution_rows_to_prompts). In YAML: `prompt_column: problem`.
  TRL's reward functions are also available by path: `--reward_funcs vlmalign.rewards:think_format_reward`.

Reward-function protocol difference: vlmalign's GRPOTrainer passes completions as strings; TRL passes
`[{"role": "assistant", "content": text}]` for conversational prompts. `vlmalign.rewards` accepts both; a custom TRL
reward function that indexes `completion[0]["content"]` needs `completion if isinstance(completion, str) else ...`.
"""

FOOTER = """
## Why some defaults differ

* `gradient_checkpointing` (TRL True, vlmalign False): the tiny and LoRA runs vlmalign targets fit without it, it
  costs about a third more compute, and the shared-prefix passes (the default, a large speed-up) fall back to the
  plain path under it. Set it to True for large models.
* `bf16` (TRL None = auto, vlmalign False): TRL's auto picks bf16 on a capable GPU; vlmalign stays in the model's
  dtype unless asked, so CPU and GPU runs give the same numbers.
* `remove_unused_columns`, `logging_steps`, `report_to`, `learning_rate`: same as TRL.
* `disable_dropout` (GRPO: TRL False, vlmalign True) and `max_completion_length` (TRL 512, vlmalign 256): see the
  table notes.
* `ddp_find_unused_parameters` (GRPO: vlmalign False): the LM head runs outside the wrapped forward; DDP's unused
  parameter search would mark it unused and then see it used.

## Running TRL's scripts

TRL's example scripts (not part of this repository) ran with only their `from trl ...` lines changed:

| script | model (tiny, local) | data | result |
|---|---|---|---|
| sft_vlm.py | llava (CLIP) | `--dataset_name DIR` (data/train-*.parquet, data/test-*.parquet) | runs |
| sft_vlm_gemma3.py | gemma3, `--use_peft --lora_target_modules all-linear --attn_implementation eager` | same | runs |
| dpo_vlm.py | idefics3, `--use_peft --lora_target_modules all-linear`, with and without `--dataset_streaming` | preference parquet folder | runs |
| mpo_vlm.py | idefics3, `--loss_type sigmoid bco_pair sft --loss_weights 0.8 0.2 1.0` | same | runs |
| grpo_vlm.py | qwen2.5-vl, `--use_peft --lora_target_modules "q_proj", "v_proj" --log_completions` | see below | runs |
| gspo_vlm.py | qwen2.5-vl, GSPO flags of the script's docstring (smaller batch) | see below | runs |

grpo_vlm.py and gspo_vlm.py hard-code `load_dataset("lmms-lab/multimodal-open-r1-8k-verified")`; they run
from a working directory holding `lmms-lab/multimodal-open-r1-8k-verified/data/train-00000-of-00001.parquet`
(datasets' `load_dataset` reads a local folder of that name first), with `image`, `problem` and `solution`
columns and more than 100 rows (the script holds out 100). dpo_vlm.py loads `AutoProcessor` itself with
`do_image_splitting=False`: for Qwen2-VL / SmolVLM checkpoints transformers needs torchvision for that
(their video processor), in TRL as here; the runs above used idefics3.
"""

if __name__ == "__main__":
    main()
