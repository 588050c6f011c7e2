"""The trainers (sft.py, dpo.py, grpo.py on base.py). Importing them first checks every private transformers member
they rely on (vlmalign/compat.py): an unsupported transformers fails here, naming the member, not mid-training."""

from .. import compat as _compat

_compat.check()
