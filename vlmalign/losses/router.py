"""Router load-balancing loss of mixture-of-experts language models (Switch Transformer, Fedus et al. 2021,
https://arxiv.org/abs/2101.03961, eqs. 4-6; the form Qwen3-MoE / Qwen3-VL-MoE use, summed over layers).

For E experts, top-k routing and the router logits of every MoE layer over the same tokens:

    f_e = (tokens routed to e, counted once per top-k slot) / (tokens x layers)
    P_e = (sum of softmax router probabilities of e)        / (tokens x layers)
    loss = E * sum_e f_e * P_e

Each row may carry a weight: 0 for padding (the model's attention mask), a count for a row that stands for several
(a prompt run once for the G completions that share it counts G times, as in the plain path where it is repeated).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def load_balancing_loss(
    router_logits: Sequence[torch.Tensor],        # per layer (and per forward): [N_i, E]
    top_k: int,
    weights: Sequence[torch.Tensor | None] | None = None,  # per entry: [N_i] row weights, None = all 1
) -> torch.Tensor:
    """The load-balancing loss over all entries (float32 scalar; differentiable through the probabilities P_e only:
    the top-k counts f_e are not differentiable, as in the paper)."""
    if not router_logits:
        raise ValueError("no router logits: the model ran no mixture-of-experts layer")
    num_experts = router_logits[0].shape[-1]
    counts = router_logits[0].new_zeros(num_experts, dtype=torch.float32)
    probs = router_logits[0].new_zeros(num_experts, dtype=torch.float32)
    total = router_logits[0].new_zeros((), dtype=torch.float32)
    for i, logits in enumerate(router_logits):
        logits = logits.reshape(-1, num_experts).float()
        weight = None if weights is None else weights[i]
        weight = (torch.ones(logits.shape[0], device=logits.device) if weight is None
                  else weight.reshape(-1).to(device=logits.device, dtype=torch.float32))
        if weight.shape[0] != logits.shape[0]:
            raise ValueError(f"entry {i}: {weight.shape[0]} row weights for {logits.shape[0]} rows of router logits")
        p = torch.softmax(logits, dim=-1)                                     # [N, E]
        chosen = torch.topk(p, top_k, dim=-1).indices                         # [N, k]
        hits = torch.zeros_like(p).scatter_(1, chosen, 1.0)                   # [N, E] 1 where e is in the top k
        counts = counts + (hits * weight[:, None]).sum(dim=0).detach()
        probs = probs + (p * weight[:, None]).sum(dim=0)
        total = total + weight.sum()
    total = total.clamp(min=1e-12)
    return num_experts * torch.sum((counts / total) * (probs / total))
