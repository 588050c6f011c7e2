"""DPO or MPO of a VLM on preference pairs (e.g. Qwen2.5-VL-3B-Instruct on HuggingFaceH4/rlaif-v_formatted).

    python examples/dpo.py --config examples/dpo_qwen25vl.yaml            # DPO (sigmoid loss)
    python examples/dpo.py --config examples/mpo_qwen25vl.yaml            # MPO: sigmoid 0.8 + bco_pair 0.2 + sft 1.0
    accelerate launch --config_file examples/accelerate/zero3.yaml examples/dpo.py --config examples/mpo_qwen25vl.yaml

rlaif-v_formatted has `prompt` / `chosen` / `rejected` / `images`: vlmalign's preference columns.
"""

import sys

from vlmalign.cli import train_command


def main(argv=None):
    train_command("dpo", sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
