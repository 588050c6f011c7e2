"""TRL 1.16's config arguments that vlmalign's own fields do not cover: declared here with TRL's names and
defaults, so a TRL script's parser, YAML or keyword arguments are accepted, and each one either acts as in TRL or is
refused (when set to anything but TRL's default) with the reason and what to use instead. Nothing is silently
ignored. `TRL_ARGUMENTS` classifies every TRL 1.16 argument of SFTConfig / DPOConfig / GRPOConfig that is not a
plain `transformers.TrainingArguments` field; docs/trl-compatibility.md is generated from it
(benchmarks/make_trl_compat_table.py).

Statuses: ``acts`` (accepted, acts as in TRL), ``differs`` (accepted; the note says how vlmalign differs),
``refused`` (accepted only at TRL's default; the note is the error message), ``packing`` (packing options that are
not implemented: DPO's padding_free, packing_strategy, eval_packing; refused like ``refused``). The vLLM options
(``use_vllm``, ``vllm_*``) are fields of `vlmalign.rl.vllm_config.VLLMArguments`; SFT's padding_free / packing
are fields of `SFTConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

_PACKING = ("packing / padding-free batches are not available yet (their own work item); vlmalign pads each "
            "batch to its longest row. Leave packing / padding_free off.")

# name -> (status, note); notes of refused options are the error messages
COMMON = {
    "trust_remote_code": ("acts", "Passed to from_pretrained for the model and the processor."),
    "router_aux_loss_coef": ("differs", "The weight of the router load-balancing loss of mixture-of-experts models "
                             "(policy pass only, logged as aux_loss; a non-MoE model is refused, as in TRL). Unset "
                             "(None): on only where the model's config has output_router_logits=True, with its "
                             "router_aux_loss_coef (TRL turns it on for any MoE model whose config declares a "
                             "coefficient); 0.0 turns it off."),
    "dataset_num_proc": ("differs", "Accepted (scripts read it for their own dataset.map); vlmalign's row "
                         "validation runs in the main process, as it decodes each image once."),
    "truncation_mode": ("differs", "vlmalign never cuts a sequence (a cut can split an image's tokens): rows longer "
                        "than max_length are dropped and counted, or rejected (truncation_policy='raise'). Only "
                        "TRL's default 'keep_start' is accepted."),
    "pad_to_multiple_of": ("refused", "padding to a multiple is not implemented; batches are padded to their "
                           "longest row. Leave pad_to_multiple_of at 'auto'."),
    "activation_offloading": ("refused", "activation offloading is not implemented; use gradient_checkpointing "
                              "to save activation memory."),
    "pad_token": ("refused", "vlmalign takes the pad token from the processor (see vlmalign.models.tokenizer); set "
                  "processing_class.tokenizer.pad_token before creating the trainer instead."),
    "padding_free": ("packing", _PACKING),
}
SFT = {
    "chat_template_path": ("refused", "set processing_class.chat_template (and pass processing_class=) instead; "
                           "vlmalign uses the processor's own template."),
    "dataset_text_field": ("refused", "plain-text language modelling is not a VLM format: give `messages` (or "
                           "`prompt` + `completion`) rows. Leave dataset_text_field at 'text'."),
    "dataset_kwargs": ("refused", "vlmalign always prepares the dataset itself (nothing to skip); pass rows in one "
                       "of the accepted formats instead of dataset_kwargs."),
    "eos_token": ("refused", "vlmalign ends each assistant turn as the chat template does; set the tokenizer's "
                  "eos_token before creating the trainer instead."),
    "shuffle_dataset": ("acts", "True shuffles the rows once (seeded by `seed`) before training, as TRL does."),
    "padding_free": ("acts", "The rows of each batch run as one sequence without padding, attention kept inside "
                     "each row (per-row positions, Qwen's 3-D positions per row); same loss as the padded batch. "
                     "Gemma 3 runs padded (logged)."),
    "packing": ("differs", "Packs the rows of each batch into one padding-free sequence (as padding_free); TRL "
                "packs across the dataset into fixed-length blocks, which would cut rows (and images)."),
    "packing_strategy": ("packing", _PACKING),
    "eval_packing": ("packing", _PACKING),
    "completion_only_loss": ("acts", "None / True: prompt + completion rows train on the completion only (always "
                             "so in vlmalign); False (train on the prompt too) is refused."),
    "assistant_only_loss": ("differs", "vlmalign always trains on the assistant turns only (the loss never covers "
                            "system / user text or image tokens); TRL's default False trains on the whole "
                            "conversation. True acts as in TRL."),
    "loss_type": ("acts", "'nll' (the only accepted value; TRL's 'dft' is refused: not implemented)."),
}
DPO = {
    "padding_free": ("acts", "The chosen and rejected sequences of each batch run as one sequence without padding "
                     "(each with its own prompt copy, positions and images; attention kept inside each sequence); "
                     "same log-probs as the padded batch. Replaces the shared-prefix path for that trainer; Gemma 3 "
                     "runs padded (logged)."),
    "ld_alpha": ("refused", "LD-DPO length desensitisation is not implemented; use loss_type with a length-"
                 "normalised variant or leave ld_alpha unset."),
    "f_divergence_type": ("refused", "only the reverse-KL (standard DPO) reward is implemented; leave "
                          "f_divergence_type at 'reverse_kl'."),
    "f_alpha_divergence_coef": ("refused", "only used by f_divergence_type='alpha_divergence', which is not "
                                "implemented; leave it at 0.5."),
    "use_weighting": ("refused", "WPO weighting is not implemented; leave use_weighting=False."),
    "sync_ref_model": ("refused", "TR-DPO reference syncing is not implemented; leave sync_ref_model=False."),
    "ref_model_mixup_alpha": ("refused", "only used with sync_ref_model, which is not implemented; leave it at 0.6."),
    "ref_model_sync_steps": ("refused", "only used with sync_ref_model, which is not implemented; leave it at 512."),
}
GRPO = {
    "cast_lm_head_to_fp32": ("refused", "not implemented: the LM head projects in its own dtype; vlmalign then "
                             "takes the log-softmax in float32 (vlmalign.losses.logprobs). Leave it False."),
    "num_generations_eval": ("refused", "evaluation uses num_generations completions per prompt; leave "
                             "num_generations_eval unset."),
    "ds3_gather_for_generation": ("refused", "vlmalign has no switch for how ZeRO-3 weights are gathered for "
                                  "generation (it generates through the wrapped model); leave it at True."),
    "generation_kwargs": ("refused", "use the sampling fields temperature, top_p, top_k, min_p, "
                          "repetition_penalty and max_completion_length; other generate() kwargs are not passed."),
    "chat_template_kwargs": ("refused", "the chat template is applied with the processor's defaults; extra "
                             "template kwargs are not passed (set them in the template itself)."),
    "cache_implementation": ("refused", "generation uses transformers' default KV cache; leave "
                             "cache_implementation unset."),
    "sapo_temperature_neg": ("acts", "Used by loss_type='sapo' (vlmalign.losses.policy_variants)."),
    "sapo_temperature_pos": ("acts", "Used by loss_type='sapo'."),
    "vespo_k_pos": ("acts", "Used by loss_type='vespo'."),
    "vespo_lambda_pos": ("acts", "Used by loss_type='vespo'."),
    "vespo_k_neg": ("acts", "Used by loss_type='vespo'."),
    "vespo_lambda_neg": ("acts", "Used by loss_type='vespo'."),
    "multi_objective_aggregation": ("refused", "only 'sum_then_normalize' (weighted sum, then group "
                                    "normalisation) is implemented; 'normalize_then_sum' (GDPO) is not."),
    "sync_ref_model": ("refused", "TR-DPO reference syncing is not implemented; leave sync_ref_model=False."),
    "ref_model_mixup_alpha": ("refused", "only used with sync_ref_model, which is not implemented; leave it at 0.6."),
    "ref_model_sync_steps": ("refused", "only used with sync_ref_model, which is not implemented; leave it at 512."),
    "top_entropy_quantile": ("refused", "high-entropy token masking is not implemented; leave "
                             "top_entropy_quantile at 1.0."),
    "entropy_coef": ("refused", "the entropy bonus is not implemented (entropy is logged as a metric); leave "
                     "entropy_coef at 0.0."),
    "use_adaptive_entropy": ("refused", "adaptive entropy control is not implemented; leave it False."),
    "entropy_coef_min": ("refused", "only used by use_adaptive_entropy, which is not implemented."),
    "entropy_coef_max": ("refused", "only used by use_adaptive_entropy, which is not implemented."),
    "entropy_coef_delta": ("refused", "only used by use_adaptive_entropy, which is not implemented."),
    "entropy_target": ("refused", "only used by use_adaptive_entropy, which is not implemented."),
    "max_tool_calling_iterations": ("refused", "tool calling during generation is not implemented."),
    "off_policy_mask_threshold": ("refused", "off-policy sequence masking is not implemented; leave "
                                  "off_policy_mask_threshold unset."),
    "use_bias_correction_kl": ("acts", "True (TRL's default) multiplies the k3 KL term by the importance ratio; "
                               "False uses plain k3. Equal on-policy."),
    "log_multimodal": ("differs", "Accepted; completions.jsonl (log_completions) records text and rewards, "
                       "never images."),
    "num_completions_to_print": ("differs", "Accepted; with log_completions, that many completions of each "
                                 "logged batch are logged (logger.info: text, reward, advantage); TRL prints a rich "
                                 "table."),
    "log_unique_prompts": ("refused", "not implemented; completions.jsonl holds every prompt of a logged batch."),
    "log_completions_hub_repo": ("refused", "pushing completion logs to the Hub is not implemented; "
                                 "completions.jsonl is written to output_dir."),
    "use_transformers_continuous_batching": ("refused", "continuous batching is not implemented; generation "
                                             "prefills each prompt once per group (shared_prefix) instead."),
    "transformers_continuous_batching_config": ("refused", "continuous batching is not implemented."),
    "use_transformers_paged": ("refused", "paged attention generation is not implemented."),
}
_VLLM_ACTS = "vLLM generation as in TRL (vlmalign/rl/vllm_config.py; README, vLLM section)."
for _name in ("use_vllm", "vllm_mode", "vllm_model_impl", "vllm_server_base_url", "vllm_server_port",
              "vllm_server_timeout", "vllm_gpu_memory_utilization", "vllm_max_model_length",
              "vllm_tensor_parallel_size", "vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
              "vllm_importance_sampling_clip_max", "vllm_importance_sampling_clip_min",
              "vllm_importance_sampling_cap"):
    GRPO[_name] = ("acts", _VLLM_ACTS)
GRPO["vllm_server_host"] = ("differs", "Default 127.0.0.1 (TRL: 0.0.0.0): the server is bound to this machine "
                            "unless another address is asked for.")
GRPO["vllm_group_port"] = ("differs", "Accepted and unused: weights go to the server over HTTP, not through a "
                           "NCCL group.")
GRPO["vllm_enable_sleep_mode"] = ("refused", "vLLM sleep mode is not supported; leave vllm_enable_sleep_mode off.")
GRPO["vllm_structured_outputs_regex"] = ("refused", "structured outputs are not supported; leave "
                                         "vllm_structured_outputs_regex unset.")

TRL_ARGUMENTS = {"SFTConfig": {**COMMON, **SFT}, "DPOConfig": {**COMMON, **DPO},
                 "GRPOConfig": {**{k: v for k, v in COMMON.items() if k not in ("dataset_num_proc", "truncation_mode",
                                                                              "activation_offloading", "padding_free",
                                                                              "pad_token")}, **GRPO}}


def check_trl_arguments(config) -> None:
    """Raise ValueError naming every refused TRL argument set to something other than TRL's default."""
    table = TRL_ARGUMENTS[_config_name(config)]
    problems = []
    for f in fields(config):
        status, note = table.get(f.name, ("", ""))
        if status not in ("refused", "vllm", "packing"):
            continue
        default = f.default_factory() if callable(getattr(f, "default_factory", None)) else f.default
        value = getattr(config, f.name)
        if value != default and not (isinstance(default, bool) and value == str(default)):
            problems.append(f"{f.name}={value!r} is not supported: {note}")
    if problems:
        raise ValueError(f"{type(config).__name__}: " + "\n".join(problems))


def _config_name(config) -> str:
    for cls in type(config).__mro__:
        if cls.__name__ in TRL_ARGUMENTS:
            return cls.__name__
    raise KeyError(type(config).__name__)


def _json_arg(value: Any) -> Any:
    if isinstance(value, str):
        import json
        return json.loads(value)
    return value


@dataclass
class CommonTrlFields:
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the model's own code (from_pretrained)."})
    router_aux_loss_coef: float | None = field(default=None, metadata={"help": "Weight of the MoE router "
                                               "load-balancing loss (None: the model config's, where its "
                                               "output_router_logits is on; 0 off)."})
    pad_to_multiple_of: int | str | None = field(default="auto", metadata={"help": "Refused unless 'auto'."})


@dataclass
class DataTrlFields:
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for scripts' dataset.map."})
    truncation_mode: str = field(default="keep_start", metadata={"help": "Only 'keep_start' (rows are never cut; "
                                 "see truncation_policy)."})
    activation_offloading: bool = field(default=False, metadata={"help": "Refused (not implemented)."})
    padding_free: bool = field(default=False, metadata={"help": "SFT / DPO: run each batch without padding (packed)."})
    pad_token: str | None = field(default=None, metadata={"help": "Refused: set the tokenizer's pad token."})


@dataclass
class SFTTrlFields(CommonTrlFields, DataTrlFields):
    chat_template_path: str | None = field(default=None, metadata={"help": "Refused: set the processor's template."})
    dataset_text_field: str = field(default="text", metadata={"help": "Refused unless 'text' (VLM rows only)."})
    dataset_kwargs: dict[str, Any] | str | None = field(default=None, metadata={"help": "Refused."})
    eos_token: str | None = field(default=None, metadata={"help": "Refused: set the tokenizer's eos_token."})
    shuffle_dataset: bool = field(default=False, metadata={"help": "Shuffle the rows once before training."})
    packing: bool = field(default=False, metadata={"help": "Refused for now (packing work item)."})
    packing_strategy: str = field(default="bfd", metadata={"help": "Refused for now (packing work item)."})
    eval_packing: bool | None = field(default=None, metadata={"help": "Refused for now (packing work item)."})
    completion_only_loss: bool | None = field(default=None, metadata={"help": "None/True: completion only (always)."})
    assistant_only_loss: bool = field(default=False, metadata={"help": "vlmalign always trains on assistant "
                                      "turns only."})
    loss_type: str = field(default="nll", metadata={"help": "'nll' only."})

    def _check_sft_arguments(self):
        if self.completion_only_loss is False:
            raise ValueError("SFTConfig: completion_only_loss=False (train on the prompt too) is not supported: "
                             "vlmalign trains on completions / assistant turns only")
        if self.loss_type != "nll":
            raise ValueError(f"SFTConfig: loss_type={self.loss_type!r} is not supported: only 'nll' (TRL's 'dft' "
                             "is not implemented)")
        if self.truncation_mode != "keep_start":
            raise ValueError(f"truncation_mode={self.truncation_mode!r} is not supported: {COMMON['truncation_mode'][1]}")


@dataclass
class DPOTrlFields(CommonTrlFields, DataTrlFields):
    ld_alpha: float | None = field(default=None, metadata={"help": "Refused (LD-DPO not implemented)."})
    f_divergence_type: str = field(default="reverse_kl", metadata={"help": "Only 'reverse_kl'."})
    f_alpha_divergence_coef: float = field(default=0.5, metadata={"help": "Refused unless 0.5."})
    use_weighting: bool = field(default=False, metadata={"help": "Refused (WPO not implemented)."})
    sync_ref_model: bool = field(default=False, metadata={"help": "Refused (TR-DPO not implemented)."})
    ref_model_mixup_alpha: float = field(default=0.6, metadata={"help": "Refused unless 0.6."})
    ref_model_sync_steps: int = field(default=512, metadata={"help": "Refused unless 512."})

    def _check_dpo_arguments(self):
        if self.truncation_mode != "keep_start":
            raise ValueError(f"truncation_mode={self.truncation_mode!r} is not supported: {COMMON['truncation_mode'][1]}")


@dataclass
class GRPOTrlFields(CommonTrlFields):
    cast_lm_head_to_fp32: bool = False
    num_generations_eval: int | None = None
    ds3_gather_for_generation: bool = True
    generation_kwargs: dict | str | None = None
    chat_template_kwargs: dict | str | None = None
    cache_implementation: str | None = None
    sapo_temperature_neg: float = field(default=1.05, metadata={"help": "SAPO gate temperature for A <= 0."})
    sapo_temperature_pos: float = field(default=1.0, metadata={"help": "SAPO gate temperature for A > 0."})
    vespo_k_pos: float = field(default=2.0, metadata={"help": "VESPO Gamma shape k for A >= 0."})
    vespo_lambda_pos: float = field(default=3.0, metadata={"help": "VESPO Gamma rate lambda for A >= 0."})
    vespo_k_neg: float = field(default=3.0, metadata={"help": "VESPO Gamma shape k for A < 0."})
    vespo_lambda_neg: float = field(default=2.0, metadata={"help": "VESPO Gamma rate lambda for A < 0."})
    multi_objective_aggregation: str = "sum_then_normalize"
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    top_entropy_quantile: float = 1.0
    entropy_coef: float = 0.0
    use_adaptive_entropy: bool = False
    entropy_coef_min: float = 0.0
    entropy_coef_max: float = 1.0
    entropy_coef_delta: float = 0.005
    entropy_target: float = 0.2
    max_tool_calling_iterations: int | None = None
    off_policy_mask_threshold: float | None = None
    use_bias_correction_kl: bool = field(default=True, metadata={"help": "Multiply the k3 KL term by the "
                                         "importance ratio (TRL's default)."})
    log_multimodal: bool = True
    num_completions_to_print: int | None = field(default=None, metadata={"help": "With log_completions: print "
                                                 "this many completions of each logged batch."})
    log_unique_prompts: bool = False
    log_completions_hub_repo: str | None = None
    use_transformers_continuous_batching: bool = False
    transformers_continuous_batching_config: dict | str | None = None
    use_transformers_paged: bool = False
