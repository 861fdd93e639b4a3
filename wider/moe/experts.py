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

ACTIVATIONS = ("gelu", "relu", "silu", "swiglu")  # silu: not gated (UMoE's experts)


# torch's grouped GEMM takes fewer than 1024 groups per call (DESIGN 6); more experts (the fine-grained grid's
# G 16 x E 64 = 1024) run in chunks of this many groups.
MAX_GROUPS = 1023


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, K: int, N: int) -> bool:
    """Whether torch's grouped GEMM runs for these operands: on CPU in fp32 (torch 2.13) with K and N multiples
    of 4, on CUDA in bf16 with K and N multiples of 8 (16-byte aligned rows either way: torch refuses other
    strides, e.g. SwitchHead's 6-channel heads in tests)."""
    if not hasattr(F, "grouped_mm"):
        return False
    if device.type == "cpu":
        return dtype == torch.float32 and K % 4 == 0 and N % 4 == 0
    return device.type == "cuda" and dtype == torch.bfloat16 and K % 8 == 0 and N % 8 == 0


def grouped_mm(x_RK: torch.Tensor, w_LKN: torch.Tensor, counts_L: torch.Tensor, kernel: str = "auto") -> torch.Tensor:
    """Row block i of x (counts_L[i] rows, in order) times w_LKN[i]; rows past sum(counts_L) are not computed
    (grouped_mm leaves them unwritten, the loop returns zeros there). kernel: 'auto' (grouped GEMM where
    grouped_mm_supported, else the loop), 'grouped_mm' or 'loop' (the reference path: the same math, one
    matmul per expert)."""
    L, K, N = w_LKN.shape
    kernel = resolve_kernel(kernel, x_RK, K, N)
    if kernel == "grouped_mm":
        if L <= MAX_GROUPS:
            offs = torch.cumsum(counts_L, 0).to(torch.int32)
            return F.grouped_mm(x_RK, w_LKN.to(x_RK.dtype), offs=offs)
        # Each chunk's rows must start at row 0 of its call: the chunk boundaries are read on the host (one
        # synchronisation per call, cheaper than one matmul per expert).
        chunks = range(0, L, MAX_GROUPS)
        edges = torch.cumsum(counts_L, 0)[[c - 1 for c in chunks[1:]] + [L - 1]].tolist()
        parts, start = [], 0
        for c, end in zip(chunks, edges):
            parts.append(grouped_mm(x_RK[start:end], w_LKN[c:c + MAX_GROUPS], counts_L[c:c + MAX_GROUPS], kernel))
            start = end
        return torch.cat(parts + [x_RK.new_zeros((x_RK.shape[0] - start, N))])
    sizes = counts_L.tolist()
    n = sum(sizes)
    parts = [p @ w_LKN[i].to(x_RK.dtype) for i, p in enumerate(torch.split(x_RK[:n], sizes))]
    tail = x_RK.new_zeros((x_RK.shape[0] - n, N))
    return torch.cat(parts + [tail]) if parts else tail


def resolve_kernel(kernel: str, x: torch.Tensor, K: int, N: int) -> str:
    """'auto' -> 'grouped_mm' where grouped_mm_supported, else 'loop'; other names pass through."""
    if kernel != "auto":
        return kernel
    return "grouped_mm" if grouped_mm_supported(x.device, x.dtype, K, N) else "loop"


def grouped_wgrad(x_RK: torch.Tensor, g_RN: torch.Tensor, counts_L: torch.Tensor, kernel: str = "auto") -> torch.Tensor:
    """The weight gradient of grouped_mm: out[i] = x_i^T g_i over row block i (counts_L[i] rows), [L, K, N]; rows
    past sum(counts_L) are not read (they may hold anything). The same call torch's grouped_mm backward makes (a
    2-D x 2-D grouped GEMM with the groups along the reduced dimension); 'loop': one matmul per expert."""
    L, (R, K), N = counts_L.numel(), x_RK.shape, g_RN.shape[-1]
    kernel = resolve_kernel(kernel, x_RK, K, N)
    if kernel == "grouped_mm":
        if L <= MAX_GROUPS:
            return F.grouped_mm(x_RK.t(), g_RN, offs=torch.cumsum(counts_L, 0).to(torch.int32))
        chunks = range(0, L, MAX_GROUPS)  # as grouped_mm: chunk boundaries read on the host
        edges = [0] + torch.cumsum(counts_L, 0)[[c - 1 for c in chunks[1:]] + [L - 1]].tolist()
        return torch.cat([grouped_wgrad(x_RK[a:b], g_RN[a:b], counts_L[c:c + MAX_GROUPS], kernel)
                          for c, a, b in zip(chunks, edges[:-1], edges[1:])])
    sizes = counts_L.tolist()
    n = sum(sizes)
    xs, gs = torch.split(x_RK[:n], sizes), torch.split(g_RN[:n], sizes)
    return torch.stack([a.t() @ b for a, b in zip(xs, gs)]) if L else x_RK.new_zeros((0, K, N))


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

    kernel: str = "auto"  # 'auto' | 'grouped_mm' | 'loop' (see grouped_mm)

    def kernel_name(self, device: torch.device, dtype: torch.dtype) -> str:
        """The expert kernel 'auto' picks for activations of this device and dtype (reported at start)."""
        if self.kernel != "auto":
            return self.kernel
        F_in = self.w1_LDF.shape[-1]
        ok = (grouped_mm_supported(device, dtype, self.hidden_size, F_in)
              and grouped_mm_supported(device, dtype, self.ffn_size, self.hidden_size))
        return "grouped_mm" if ok else "loop"

    def forward(self, x_RD: torch.Tensor, counts_L: torch.Tensor) -> torch.Tensor:
        """x_RD: rows grouped by local expert (counts_L of each). Rows past sum(counts_L) are not computed:
        torch's grouped GEMM leaves them unwritten in its output and in its input gradient (stale memory), so
        callers must never read them (wider.moe.dispatch reads only kept rows, forward and backward)."""
        return grouped_mm(self._activate(grouped_mm(x_RD, self.w1_LDF, counts_L, self.kernel)), self.w2_LFD,
                          counts_L, self.kernel)

    def forward_plan(self, x_TD, p, x_XD=None) -> torch.Tensor:
        """The experts on a dispatch.Plan's assignments of the tokens x_TD (or of per-assignment inputs x_XD
        [T * K, D], token-major), weighted and summed per token (all experts on this rank: moe.ep_size 1): the same
        math as combine(forward(gather_tokens(x_TD, p)), p), with the gather fused into the first GEMM's autograd
        node and the combine into the second's (dispatch.gather_mm / mm_combine), so neither R x D tensor is
        kept for the backward."""
        from wider.moe import dispatch

        h_RF = self._activate(dispatch.gather_mm(x_TD, p, self.w1_LDF, self.kernel, x_XD=x_XD))
        return dispatch.mm_combine(h_RF, self.w2_LFD, p, self.kernel)

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
