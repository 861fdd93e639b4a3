"""Expert FFNs stored stacked, computed with one grouped GEMM per matrix.

Shape suffixes: R rows (tokens routed here, grouped by local expert), D model width, L local experts,
F expert FFN width (2F for gated activations: value and gate side by side).

Weights are stacked parameters w1_LDF / w2_LFD (one tensor per matrix, as grouped GEMMs want). DeepSpeed's
checkpoint code expects one key per expert (`...deepspeed_experts.<i>.<name>`); state-dict hooks present
exactly that layout when saving and stack it back when loading (see wider.moe.layer).

Experts have no biases (as in Switch / GShard / DeepSpeed's reference experts built without them).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("gelu", "relu", "swiglu")


def grouped_mm(x_RK: torch.Tensor, w_LKN: torch.Tensor, counts_L: torch.Tensor) -> torch.Tensor:
    """Row block i of x (counts_L[i] rows) times w_LKN[i]. torch's grouped GEMM where it runs (CPU fp32;
    CUDA bf16 with K and N multiples of 8), a loop over experts elsewhere."""
    K, N = w_LKN.shape[1], w_LKN.shape[2]
    fast = x_RK.device.type == "cpu" or (x_RK.dtype == torch.bfloat16 and K % 8 == 0 and N % 8 == 0)
    if fast and hasattr(F, "grouped_mm") and w_LKN.shape[0] < 1024:
        offs = torch.cumsum(counts_L, 0).to(torch.int32)
        return F.grouped_mm(x_RK, w_LKN.to(x_RK.dtype), offs=offs)
    parts = torch.split(x_RK, counts_L.tolist())
    return torch.cat([p @ w_LKN[i] for i, p in enumerate(parts)]) if parts else x_RK.new_zeros((0, N))


class GroupedExperts(nn.Module):
    """num_local experts, each x -> act(x W1) W2 (gated: (silu(x W1g) * x W1v) W2)."""

    def __init__(self, num_local: int, hidden_size: int, ffn_size: int, activation: str = "gelu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"expert activation {activation!r} is not one of {ACTIVATIONS}")
        self.num_local, self.hidden_size, self.ffn_size, self.activation = num_local, hidden_size, ffn_size, activation
        width = 2 * ffn_size if activation == "swiglu" else ffn_size
        self.w1_LDF = nn.Parameter(torch.empty(num_local, hidden_size, width))
        self.w2_LFD = nn.Parameter(torch.empty(num_local, ffn_size, hidden_size))

    def init_from_full(self, w1_EDF: torch.Tensor, w2_EFD: torch.Tensor, ep_rank: int) -> None:
        """Take this rank's slice of weights drawn for all E experts, so that a run with expert
        parallelism starts from exactly the weights of the same run without it."""
        L = self.num_local
        with torch.no_grad():
            self.w1_LDF.copy_(w1_EDF[ep_rank * L:(ep_rank + 1) * L])
            self.w2_LFD.copy_(w2_EFD[ep_rank * L:(ep_rank + 1) * L])

    def forward(self, x_RD: torch.Tensor, counts_L: torch.Tensor) -> torch.Tensor:
        h_RF = grouped_mm(x_RD, self.w1_LDF, counts_L)
        if self.activation == "swiglu":
            value_RF, gate_RF = h_RF.chunk(2, dim=-1)
            h_RF = F.silu(gate_RF) * value_RF
        else:
            h_RF = F.gelu(h_RF) if self.activation == "gelu" else F.relu(h_RF)
        return grouped_mm(h_RF, self.w2_LFD, counts_L)


def init_expert_weights(num_experts: int, hidden_size: int, ffn_size: int, activation: str, std: float,
                        output_std: float, generator: torch.Generator | None = None):
    """Normal init of all E experts' stacked weights on CPU (w2 with the scaled output std, as megatron
    initialises fc2)."""
    width = 2 * ffn_size if activation == "swiglu" else ffn_size
    w1 = torch.empty(num_experts, hidden_size, width).normal_(0.0, std, generator=generator)
    w2 = torch.empty(num_experts, ffn_size, hidden_size).normal_(0.0, output_std, generator=generator)
    return w1, w2


def scaled_output_std(std: float, num_layers: int) -> float:
    """megatron's output-layer init: std / sqrt(2 * num_layers)."""
    return std / math.sqrt(2.0 * num_layers)
