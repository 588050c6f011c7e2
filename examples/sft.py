"""SFT of a VLM on image+text conversations (e.g. SmolVLM on HuggingFaceH4/llava-instruct-mix-vsft).

    python examples/sft.py --config examples/sft_smolvlm.yaml
    accelerate launch --config_file examples/accelerate/ddp.yaml examples/sft.py --config examples/sft_smolvlm.yaml

llava-instruct-mix-vsft already has vlmalign's columns (`messages` + `images`), so no preprocessing is needed.
Any field of the YAML can be overridden on the command line (`--learning_rate 1e-5`).
"""

import sys

from vlmalign.cli import train_command


def main(argv=None):
    train_command("sft", sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
