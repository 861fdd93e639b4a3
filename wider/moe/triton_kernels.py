"""Fused gathers for the MoE dispatch and combine on CUDA (Triton), where they pay.

Shape suffixes: T tokens, K choices per token, R rows (assignments grouped by expert), D model width.

Measured on an H100 (benchmarks/moe_profile.py, d 1024, 16384 tokens): with plain torch ops the combine and the
dispatch gradient each materialise an R x D copy (index_select) before reducing it, and the combine's
backward ran as a batched outer product (k = 1 GEMM) in a slow sm80 kernel; at top-16 these copies cost as much
as the expert GEMMs. The two kernels below read every row once and write only what is needed:

- weighted_gather_sum(src_RD, row_TK, w_TK) -> out_TD: out[t] = sum_k w[t, k] * src[row[t, k]] (fp32
  accumulation). The combine's forward (w = combine weights) and the dispatch's backward (w = 1 for kept
  assignments, 0 for dropped ones) are both this.
- scaled_gather_dot(g_TD, token_R, w_R, y_RD) -> (w_R * g[token_R], <g[token_R], y_R>): the combine's backward
  (gradient of the expert outputs, and of the combine weights) in one pass over the rows.

Rows whose weight is 0 are never read (they may be rows the grouped GEMM left unwritten). The torch
fallback in wider.moe.dispatch computes the same math; tests compare both on CUDA.
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; the CPU wheels of the development machines have none.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _weighted_gather_sum(src_ptr, row_ptr, w_ptr, out_ptr, K, D, stride_src, stride_out,
                             BLOCK_D: tl.constexpr):
        t = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        in_d = offs < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for k in range(K):
            r = tl.load(row_ptr + t * K + k).to(tl.int64)
            w = tl.load(w_ptr + t * K + k).to(tl.float32)
            v = tl.load(src_ptr + r * stride_src + offs, mask=in_d & (w != 0.0), other=0.0)
            acc += w * v.to(tl.float32)
        tl.store(out_ptr + t.to(tl.int64) * stride_out + offs, acc.to(out_ptr.dtype.element_ty), mask=in_d)

    @triton.jit
    def _scaled_gather_dot(g_ptr, token_ptr, w_ptr, y_ptr, grad_ptr, dot_ptr, D, stride_g, stride_y, stride_grad,
                           BLOCK_D: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        t = tl.load(token_ptr + r).to(tl.int64)
        w = tl.load(w_ptr + r).to(tl.float32)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs = d0 + tl.arange(0, BLOCK_D)
            in_d = offs < D
            g = tl.load(g_ptr + t * stride_g + offs, mask=in_d, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + r * stride_y + offs, mask=in_d & (w != 0.0), other=0.0).to(tl.float32)
            tl.store(grad_ptr + r * stride_grad + offs, (w * g).to(grad_ptr.dtype.element_ty), mask=in_d)
            acc += g * y
        tl.store(dot_ptr + r, tl.sum(acc, axis=0))


def _block(D: int) -> int:
    return min(triton.next_power_of_2(D), 1024)


def weighted_gather_sum(src_RD: torch.Tensor, row_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
    T, K = row_TK.shape
    D = src_RD.shape[1]
    src_RD, row_TK, w_TK = src_RD.contiguous(), row_TK.contiguous(), w_TK.contiguous()
    out_TD = src_RD.new_empty((T, D))
    block = _block(D)
    if T:
        _weighted_gather_sum[(T, triton.cdiv(D, block))](src_RD, row_TK, w_TK, out_TD, K, D, src_RD.stride(0),
                                                         out_TD.stride(0), BLOCK_D=block, num_warps=4)
    return out_TD


def scaled_gather_dot(g_TD: torch.Tensor, token_R: torch.Tensor, w_R: torch.Tensor, y_RD: torch.Tensor):
    R, D = y_RD.shape
    g_TD, token_R, w_R, y_RD = g_TD.contiguous(), token_R.contiguous(), w_R.contiguous(), y_RD.contiguous()
    grad_RD = y_RD.new_empty((R, D))
    dot_R = torch.empty(R, dtype=torch.float32, device=y_RD.device)
    if R:
        _scaled_gather_dot[(R,)](g_TD, token_R, w_R, y_RD, grad_RD, dot_R, D, g_TD.stride(0), y_RD.stride(0),
                                 grad_RD.stride(0), BLOCK_D=_block(D), num_warps=4)
    return grad_RD, dot_R
