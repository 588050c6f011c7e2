"""Pure loss math: tensors in, tensors out, no trainer state.

* :mod:`.preference`: DPO-family losses, the weighted combiner (MPO), BCO's running-mean delta, reward metrics.
* :mod:`.policy`: GRPO / GSPO clipped objective (token / sequence / sequence_token ratios; grpo, bnpo,
  dr_grpo, dapo aggregation).
* :mod:`.logprobs`: per-token log-probs and entropies without materialising [batch, length, vocab] logits.
"""

from .logprobs import (
    gather_completion_positions,
    scatter_completion_values,
    selective_log_softmax,
    token_logprobs_from_hidden,
)
from .policy import IMPORTANCE_SAMPLING_LEVELS, POLICY_LOSS_TYPES, importance_weights, k3_kl, policy_loss
from .preference import (
    PREFERENCE_LOSSES,
    RunningMeanDelta,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    combined_preference_loss,
    discopop_loss,
    dpo_reward_metrics,
    exo_pair_loss,
    hinge_loss,
    ipo_loss,
    nca_pair_loss,
    preference_loss,
    robust_loss,
    sft_loss,
    sigmoid_loss,
    sppo_hard_loss,
)

__all__ = [
    "IMPORTANCE_SAMPLING_LEVELS",
    "POLICY_LOSS_TYPES",
    "PREFERENCE_LOSSES",
    "RunningMeanDelta",
    "apo_down_loss",
    "apo_zero_loss",
    "bco_pair_loss",
    "combined_preference_loss",
    "discopop_loss",
    "dpo_reward_metrics",
    "exo_pair_loss",
    "gather_completion_positions",
    "hinge_loss",
    "importance_weights",
    "ipo_loss",
    "k3_kl",
    "nca_pair_loss",
    "policy_loss",
    "preference_loss",
    "robust_loss",
    "scatter_completion_values",
    "selective_log_softmax",
    "sft_loss",
    "sigmoid_loss",
    "sppo_hard_loss",
    "token_logprobs_from_hidden",
]
