"""GRPO or GSPO of a VLM with verifiable rewards (e.g. Qwen2.5-VL-3B-Instruct on
lmms-lab/multimodal-open-r1-8k-verified: a math problem about an image, a checkable `solution`).

    python examples/grpo.py --config examples/grpo_qwen25vl.yaml
    python examples/grpo.py --config examples/gspo_qwen25vl.yaml          # GSPO: the YAML sets its preset
    accelerate launch --config_file examples/accelerate/zero3.yaml examples/grpo.py --config examples/grpo_qwen25vl.yaml

The dataset's `problem` column becomes a conversational prompt asking for the <think>/<answer> format, so that the
built-in `format` and `accuracy` (math-verify) rewards apply; `image` and `solution` are used as they are.
"""

import sys

from vlmalign.cli import load_training_data, parse_training_args, run_training

SYSTEM_PROMPT = (
    "Think about the question step by step inside <think></think>, then give the final answer inside "
    "<answer></answer>."
)


def to_prompt(row):
    """multimodal-open-r1 row -> vlmalign prompt row (the image goes with the first user turn)."""
    return {"prompt": [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
                       {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["problem"]}]}]}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    script_args, config = parse_training_args("grpo", argv)
    train, evaluation = load_training_data(script_args)
    if "problem" in train.column_names:
        train = train.map(to_prompt, remove_columns=["problem"])
    run_training("grpo", script_args, config, train, evaluation)


if __name__ == "__main__":
    main()
