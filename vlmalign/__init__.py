"""vlmalign: align vision-language models to preferences and rewards (SFT, DPO/MPO, GRPO/GSPO)."""

__version__ = "0.1.0"
