"""Start-up checks of the engine a run was launched with: combinations that cannot work fail here, with a message
saying what to change, instead of inside the first step."""

from __future__ import annotations

import os

from .cpu_engines import requested_engine

FSDP1_MESSAGE = (
    "FSDP version 1 is not supported by vlmalign: its flat parameters are resharded between the model's forward and "
    "the chunked LM-head projection, and generation runs outside the wrapped module. Use FSDP2: set "
    "`fsdp_version: 2` in the accelerate config (examples/accelerate/fsdp.yaml), or fsdp_config={'version': 2}.")


def fsdp_version(args) -> int | None:
    """The FSDP version a run will use (None without FSDP): the config's `fsdp_config['version']` when `args.fsdp` is
    set (transformers' default 2), else accelerate launch's ``FSDP_VERSION`` (accelerate's default 1)."""
    if getattr(args, "fsdp", None):
        config = getattr(args, "fsdp_config", None) or {}
        if not isinstance(config, dict):  # a JSON file path: transformers reads it later; assume its default
            return 2
        return int(config.get("version", config.get("fsdp_version", 2)))
    if requested_engine() == "fsdp":
        return int(os.environ.get("FSDP_VERSION", "1"))
    return None


def check_engine(args) -> None:
    """Refuse engine settings that cannot work (raised from the config's __post_init__)."""
    if fsdp_version(args) == 1:
        raise ValueError(FSDP1_MESSAGE)
