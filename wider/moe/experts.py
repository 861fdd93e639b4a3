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

from wider.moe import dispatch
from wider.moe.config import ACTIVATIONS
from wider.moe.kernels import expert_kernel_name, grouped_mm


class GroupedExperts(nn.Module):
    """num_local experts, each x -> act(x W1) W2 (act gelu, relu or silu; gated swiglu: (silu(x W1g) * x W1v) W2)."""

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

    def kernel_name(self, device: torch.device, dtype: torch.dtype, kernel: str = "auto") -> str:
        """The expert kernel `kernel` ('auto' | 'grouped_mm' | 'loop': the layer's Kernels.expert) resolves to for
        activations of this device and dtype (reported at start)."""
        return expert_kernel_name(kernel, device, dtype, [(self.hidden_size, self.w1_LDF.shape[-1]),
                                                          (self.ffn_size, self.hidden_size)])

    def forward(self, x_RD: torch.Tensor, counts_L: torch.Tensor, kernel: str = "auto") -> torch.Tensor:
        """x_RD: rows grouped by local expert (counts_L of each). Rows past sum(counts_L) are not computed:
        torch's grouped GEMM leaves them unwritten in its output and in its input gradient (stale memory), so
        callers must never read them (wider.moe.dispatch reads only kept rows, forward and backward). kernel: see
        wider.moe.kernels.grouped_mm."""
        return grouped_mm(self._activate(grouped_mm(x_RD, self.w1_LDF, counts_L, kernel)), self.w2_LFD, counts_L,
                          kernel)

    def forward_plan(self, x_TD, p, x_XD=None, kernel: str = "auto") -> torch.Tensor:
        """The experts on a dispatch.Plan's assignments of the tokens x_TD (or of per-assignment inputs x_XD
        [T * K, D], token-major), weighted and summed per token (all experts on this rank: moe.ep_size 1): the same
        math as combine(forward(gather_tokens(x_TD, p)), p), with the gather fused into the first GEMM's autograd
        node and the combine into the second's (dispatch.gather_mm / mm_combine), so neither R x D tensor is
        kept for the backward."""
        h_RF = self._activate(dispatch.gather_mm(x_TD, p, self.w1_LDF, kernel, x_XD=x_XD))
        return dispatch.mm_combine(h_RF, self.w2_LFD, p, kernel)

    def _activate(self, h_RF: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            value_RF, gate_RF = h_RF.chunk(2, dim=-1)
            return F.silu(gate_RF) * value_RF
        return activation_fn(self.activation)(h_RF)


def activation_fn(name: str):
    """The element-wise activation of a non-gated FFN (swiglu's gate uses silu)."""
    return {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "swiglu": F.silu}[name]


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
