"""What one call of a routing module reports (the MoE layer, SwitchHead's routers); wider.moe.stats collects the
records. A module of its own, without DeepSpeed, so that modules which only report (SwitchHead) do not import the
layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class CallRecord:
    """What one call of an MoE layer reports (all but `aux` detached)."""

    aux: torch.Tensor  # weighted aux loss of this call, with grad: added to the LM loss
    balance: torch.Tensor
    z: torch.Tensor
    entropy: torch.Tensor
    routed_E: torch.Tensor  # assignments the router made per expert (before capacity)
    kept_E: torch.Tensor  # assignments that reached the expert
    # Sequence entropy regulariser (sigmoid routers): per-sequence sums of softmax(s), with grad, [B, E]; the
    # tokens per sequence they sum over; the weight. wider.moe.stats.take pools them over every call of the
    # layer before taking the entropy (the regulariser is not a sum of per-call terms). None = no regulariser.
    prob_sums_BE: Optional[torch.Tensor] = None
    tokens_per_seq: int = 0
    entropy_weight: float = 0.0
    router: str = ""  # which router of the layer made the record ("" for an MoE FFN; SwitchHead: "v" or "o")
    experts_per_token: Optional[torch.Tensor] = None  # [E + 1] int64: how many tokens got 0, 1, ..., E experts
