"""The MoE kernels and which one runs: torch's grouped GEMM (or a per-expert loop with the same math) for the
experts, and the fused Triton gathers (or torch ops) for the dispatch and combine.

Shape suffixes: R rows (grouped by local expert), K / N a GEMM's inner / output width, L local experts.

This is the leaf of wider.moe: dispatch.py and experts.py both use it and it imports neither. The choice is a
value of the layer's configuration (wider.moe.config.Kernels), passed down to every call; nothing here is a
mutable module setting.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wider.moe import triton_kernels

EXPERT_KERNELS = ("auto", "grouped_mm", "loop")
GATHER_KERNELS = ("auto", "torch")

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


def resolve_kernel(kernel: str, x: torch.Tensor, K: int, N: int) -> str:
    """'auto' -> 'grouped_mm' where grouped_mm_supported, else 'loop'; other names pass through."""
    if kernel not in EXPERT_KERNELS:
        raise ValueError(f"expert kernel {kernel!r} is not one of {EXPERT_KERNELS}")
    if kernel != "auto":
        return kernel
    return "grouped_mm" if grouped_mm_supported(x.device, x.dtype, K, N) else "loop"


def expert_kernel_name(kernel: str, device: torch.device, dtype: torch.dtype, shapes: list) -> str:
    """The kernel `kernel` resolves to for activations of this device and dtype and GEMMs of these (K, N) shapes
    (reported at start)."""
    if kernel != "auto":
        return kernel
    ok = all(grouped_mm_supported(device, dtype, K, N) for K, N in shapes)
    return "grouped_mm" if ok else "loop"


def fused_gathers(gather: str, device: torch.device) -> bool:
    """Whether the dispatch uses the fused Triton gathers: gather 'auto' on CUDA where Triton is installed."""
    if gather not in GATHER_KERNELS:
        raise ValueError(f"gather kernel {gather!r} is not one of {GATHER_KERNELS}")
    return gather == "auto" and triton_kernels.available(device)


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


def grouped_wgrad(x_RK: torch.Tensor, g_RN: torch.Tensor, counts_L: torch.Tensor, kernel: str = "auto") -> torch.Tensor:
    """The weight gradient of grouped_mm: out[i] = x_i^T g_i over row block i (counts_L[i] rows), [L, K, N]; rows
    past sum(counts_L) are not read (they may hold anything). The same call torch's grouped_mm backward makes (a
    2-D x 2-D grouped GEMM with the groups along the reduced dimension); 'loop': one matmul per expert."""
    L, K, N = counts_L.numel(), x_RK.shape[1], g_RN.shape[-1]
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
