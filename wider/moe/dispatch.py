"""Index-based dispatch: capacity, permutation by expert, all-to-all over the expert-parallel group, combine.

Shape suffixes: T tokens, D model width, E experts (global), L experts on this rank (E / ep_size),
K choices per token, A kept assignments (<= T * K), R rows received by this rank's experts.

No one-hot [tokens, experts, capacity] tensor is ever built (GShard's einsum formulation costs
T * E * C memory and FLOPs): assignments are sorted by expert id and moved with gathers, forward and
backward (no atomic scatter-adds: every gradient is read through the inverse permutation).

Capacity priority (GShard): every first choice comes before every second choice, and within one choice
rank, earlier tokens come first; an assignment whose position inside its expert is >= capacity is
dropped (its token keeps only the residual for that choice). Capacity is computed over the local
micro-batch before any all-to-all, so a rank's drops do not depend on the other ranks.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from wider.moe import triton_kernels
from wider.moe.kernels import fused_gathers, grouped_mm, grouped_wgrad, resolve_kernel


def capacity(tokens: int, top_k: int, num_experts: int, factor: Optional[float], min_capacity: int) -> Optional[int]:
    """ceil(k * factor * tokens / E), at least min_capacity; None (dropless) when factor is None."""
    if factor is None:
        return None
    return max(int(min_capacity), math.ceil(top_k * factor * tokens / num_experts))


@dataclass
class Plan:
    """Where every one of the A = T * K assignments goes. Rows [0, n_kept) are the kept assignments grouped by
    expert (priority order inside an expert), rows [n_kept, A) the dropped ones. Shapes are fixed (A rows
    whatever the drops), so that building and using a plan needs no host synchronisation on GPU; n_kept
    stays a device tensor (counts_E.sum())."""

    token_A: torch.Tensor  # token index of each row
    live_A: torch.Tensor  # bool: kept
    counts_E: torch.Tensor  # kept assignments per expert (int64)
    routed_E: torch.Tensor  # assignments the router made per expert, before capacity (int64)
    dropless: bool  # no capacity: every row is live
    source_A: torch.Tensor  # token-major index t * K + k of the assignment in each row (inverse of row_TK)
    row_TK: torch.Tensor  # the row of each assignment; dropped ones point at row 0 (a kept row) with weight 0
    live_TK: torch.Tensor  # bool: assignment kept
    weight_TK: torch.Tensor  # combine weights, with their gradient to the router; 0 where dropped
    fused: bool = False  # move rows with the fused Triton gathers (wider.moe.kernels.fused_gathers), else torch ops

    @property
    def weight_A(self) -> torch.Tensor:
        """Each row's combine weight (0 for dropped rows; detached): for statistics and tests, so computed on
        demand rather than in the hot path."""
        return self.weight_TK.detach().reshape(-1)[self.source_A]

    def kept(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(token, weight, expert) of the kept rows only (synchronises: for tests and expert parallelism)."""
        n = int(self.counts_E.sum())
        expert = torch.repeat_interleave(torch.arange(len(self.counts_E), device=self.counts_E.device),
                                         self.counts_E)
        return self.token_A[:n], self.weight_A[:n], expert


def plan(expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int, cap: Optional[int],
         gather: str = "auto", chosen_TK: Optional[torch.Tensor] = None) -> Plan:
    """Order the T*K assignments by expert (stable sorts, so the priority order holds inside an expert) and
    apply the capacity, without leaving the device. gather: the layer's Kernels.gather ('auto' | 'torch'), which
    every row movement over this plan then uses. chosen_TK (bool, with cap None): only these slots are
    assignments (expert choice gives tokens different numbers of experts); the others are planned as dropped."""
    T, K = expert_ids_TK.shape
    A = T * K
    dev = expert_ids_TK.device
    # Choice-major flattening: index a = choice * T + token, i.e. all first choices in token order, then
    # all second choices: exactly the capacity priority.
    ids_A = expert_ids_TK.t().reshape(-1)
    if chosen_TK is not None:
        if cap is not None:
            raise ValueError("plan: chosen_TK (expert choice) comes with its own capacity; pass cap None")
        ids_A = torch.where(chosen_TK.t().reshape(-1), ids_A, num_experts)  # sentinel E: after every expert
    # scatter_add, not bincount: bincount sizes its output from the data (a device-to-host sync on CUDA).
    routed_E = torch.zeros(num_experts + 1, dtype=torch.long, device=dev).scatter_add_(
        0, ids_A, torch.ones_like(ids_A))[:num_experts]
    sorted_ids_A, order_A = torch.sort(ids_A, stable=True)
    rows_A = torch.arange(A, device=dev)
    if cap is None and chosen_TK is not None:
        counts_E = routed_E
        live_A = rows_A < counts_E.sum()
    elif cap is None:
        counts_E = routed_E
        live_A = torch.ones(A, dtype=torch.bool, device=dev)
    else:
        starts_E = torch.cumsum(routed_E, 0) - routed_E
        position_A = rows_A - starts_E[sorted_ids_A]
        # Dropped rows move behind every kept row (sentinel key E); both sorts are stable.
        key_A = torch.where(position_A < cap, sorted_ids_A, num_experts)
        order_A = order_A[torch.sort(key_A, stable=True).indices]
        counts_E = routed_E.clamp(max=cap)
        live_A = rows_A < counts_E.sum()
    token_A, choice_A = order_A % T, order_A // T
    source_A = token_A * K + choice_A
    row_flat = torch.empty_like(source_A).scatter_(0, source_A, rows_A)
    live_flat = torch.empty_like(live_A).scatter_(0, source_A, live_A)
    # A dropped assignment reads row 0 (kept whenever any row is) with weight 0: finite values, zero effect,
    # where the rows behind n_kept hold whatever the grouped GEMM left there.
    row_TK = torch.where(live_flat, row_flat, 0).view(T, K)
    live_TK = live_flat.view(T, K)
    weight_TK = torch.where(live_TK, weights_TK, torch.zeros((), dtype=weights_TK.dtype, device=dev))
    return Plan(token_A=token_A, live_A=live_A, counts_E=counts_E, routed_E=routed_E,
                dropless=cap is None and chosen_TK is None, source_A=source_A, row_TK=row_TK, live_TK=live_TK, weight_TK=weight_TK,
                fused=fused_gathers(gather, dev))


def split_choices(p: Plan, n: int) -> Plan:
    """The same assignments seen as T * n tokens of K / n choices each: choice block j (choices j * K / n ...
    (j + 1) * K / n - 1) of token t becomes token t * n + j. Nothing moves (the token-major index t * K + k is
    unchanged), so gather_tokens / combine over the view read or sum per block. SwitchHead plans a token's H heads
    x K choices as one token with H * K choices (its V experts all read the token's x: gather over the plan),
    and sums the V outputs per (token, head) (combine over the view); its O experts read a (token, head) row
    each (gather over the view) and their outputs sum over every head (combine over the plan)."""
    T, K = p.row_TK.shape
    if n < 1 or K % n:
        raise ValueError(f"split_choices: {K} choices per token do not split into {n} equal blocks")
    k = K // n
    return dataclasses.replace(p, token_A=p.source_A // k, row_TK=p.row_TK.view(T * n, k),
                               live_TK=p.live_TK.view(T * n, k), weight_TK=p.weight_TK.view(T * n, k))


def _sum_rows(src_RD: torch.Tensor, row_TK: torch.Tensor, w_TK: Optional[torch.Tensor], fused: bool) -> torch.Tensor:
    """out[t] = sum_k w[t, k] * src[row[t, k]] (w None: all ones), accumulated in fp32; fused: the Triton kernel."""
    if fused:
        w = torch.ones(row_TK.shape, device=src_RD.device) if w_TK is None else w_TK
        return triton_kernels.weighted_gather_sum(src_RD, row_TK, w)
    T, K = row_TK.shape
    src_TKD = src_RD.index_select(0, row_TK.reshape(-1)).view(T, K, -1)
    if w_TK is None:
        return src_TKD.sum(1)
    # One [1 x K] @ [K x D] product per token (fp32 accumulation inside the batched GEMM).
    return torch.bmm(w_TK.to(src_RD.dtype).unsqueeze(1), src_TKD).squeeze(1)


def _token_grad(g_RD: torch.Tensor, row_TK: torch.Tensor, live_TK: Optional[torch.Tensor], fused: bool) -> torch.Tensor:
    """Gradient of a per-token gather (x_TD -> rows): each token's is the sum of its kept rows, read through
    row_TK, so no atomic adds. Dropped assignments are excluded (weight 0): they point at row 0, and the rows behind
    n_kept hold whatever the grouped GEMM left unwritten in its input gradient."""
    return _sum_rows(g_RD, row_TK, None if live_TK is None else live_TK.float(), fused)


def _assignment_grad(g_RD: torch.Tensor, row_TK: torch.Tensor, live_TK: Optional[torch.Tensor],
                     fused: bool = False) -> torch.Tensor:
    """Gradient of a per-assignment gather (x_XD -> rows): each assignment's is its row's, read through row_TK (a
    permutation of the kept rows) back into token-major order; dropped assignments get zero (row 0, masked). A plain
    gather: `fused` (the signature it shares with _token_grad) changes nothing here."""
    g_XD = g_RD.index_select(0, row_TK.reshape(-1))
    if live_TK is not None:
        g_XD = g_XD * live_TK.reshape(-1, 1).to(g_XD.dtype)
    return g_XD


class _GatherTokens(torch.autograd.Function):
    """x_TD -> x_RD: row r holds token token_R[r] (each token once per kept choice, grouped by expert).
    Backward: _token_grad."""

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, token_R: torch.Tensor, row_TK: torch.Tensor, live_TK: Optional[torch.Tensor],
                fused: bool):
        ctx.save_for_backward(row_TK, live_TK)
        ctx.fused = fused
        return x_TD.index_select(0, token_R)

    @staticmethod
    def backward(ctx, g_RD: torch.Tensor):
        return _token_grad(g_RD, *ctx.saved_tensors, ctx.fused), None, None, None, None


def gather_tokens(x_TD: torch.Tensor, p: Plan, num_rows: Optional[int] = None) -> torch.Tensor:
    """The first num_rows rows of the plan (default all A) filled with their tokens' hidden states."""
    token_R = p.token_A if num_rows is None else p.token_A[:num_rows]
    return _GatherTokens.apply(x_TD, token_R, p.row_TK, None if p.dropless else p.live_TK, p.fused)


class _GatherAssignments(torch.autograd.Function):
    """x_XD -> x_RD where X = T * K rows, one per assignment in token-major order (t * K + k): row r holds
    assignment source_R[r]. Used when every assignment has its own input (UMoE's pre-mixing attention: choice k
    of token t feeds expert k the token mixed by that expert's own query). Backward: _assignment_grad."""

    @staticmethod
    def forward(ctx, x_XD: torch.Tensor, source_R: torch.Tensor, row_TK: torch.Tensor, live_TK: Optional[torch.Tensor]):
        ctx.save_for_backward(row_TK, live_TK)
        return x_XD.index_select(0, source_R)

    @staticmethod
    def backward(ctx, g_RD: torch.Tensor):
        return _assignment_grad(g_RD, *ctx.saved_tensors), None, None, None


def gather_assignments(x_XD: torch.Tensor, p: Plan, num_rows: Optional[int] = None) -> torch.Tensor:
    """The first num_rows rows of the plan (default all A) filled with per-assignment inputs x_XD [T * K, D]
    (token-major: row t * K + k is token t's k-th choice)."""
    source_R = p.source_A if num_rows is None else p.source_A[:num_rows]
    return _GatherAssignments.apply(x_XD, source_R, p.row_TK, None if p.dropless else p.live_TK)


def scatter_to_assignments(y_AD: torch.Tensor, p: Plan) -> torch.Tensor:
    """The inverse of gather_assignments for a dropless plan: rows grouped by expert -> [T * K, D] in token-major
    order (row t * K + k = the row of token t's k-th choice). A permutation, so its gradient is one gather."""
    if not p.dropless:
        raise ValueError("scatter_to_assignments needs a dropless plan (every assignment has a computed row); "
                         "plan with capacity None")
    return _GatherAssignments.apply(y_AD, p.row_TK.reshape(-1), p.source_A.view(-1, 1), None)


class _Combine(torch.autograd.Function):
    """out_TD[t] = sum_k weight_TK[t, k] * y_RD[row_TK[t, k]].

    Backward, one pass over the rows: grad y_RD[r] = w_r * g[token_r] (a gather, no scatter-add: every kept row
    belongs to exactly one assignment, and rows of dropped assignments get weight 0), and the combine weights'
    gradient <g[token_r], y_r>, put back in [T, K] order through source_R (the router's gradient flows from
    there)."""

    @staticmethod
    def forward(ctx, y_RD, weight_TK, row_TK, source_R, token_R, fused):
        ctx.save_for_backward(y_RD, weight_TK, source_R, token_R)
        ctx.fused = fused
        return _sum_rows(y_RD, row_TK, weight_TK.detach(), fused)

    @staticmethod
    def backward(ctx, g_TD: torch.Tensor):
        y_RD, weight_TK, source_R, token_R = ctx.saved_tensors
        w_R = weight_TK.detach().reshape(-1).index_select(0, source_R)
        if ctx.fused:
            grad_RD, dot_R = triton_kernels.scaled_gather_dot(g_TD, token_R, w_R, y_RD)
        else:
            g_RD = g_TD.index_select(0, token_R)
            grad_RD = g_RD * w_R.to(g_RD.dtype).unsqueeze(-1)
            live_R = (w_R != 0).unsqueeze(-1)  # never read unwritten rows
            dot_R = (torch.where(live_R, y_RD, 0).float() * g_RD.float()).sum(-1)
        grad_w = torch.zeros(weight_TK.numel(), dtype=dot_R.dtype, device=dot_R.device).scatter_(0, source_R, dot_R)
        return grad_RD, grad_w.view(weight_TK.shape).to(weight_TK.dtype), None, None, None, None


class _GatherMM(torch.autograd.Function):
    """y_RN = grouped_mm(x_TD[token_R], w_LDN, counts_L): gather_tokens and the first grouped GEMM in one autograd
    node that saves x_TD (which the caller keeps anyway: the residual) instead of the R x D gathered rows. The
    backward gathers them again for the weight gradient: one more R x D gather, and R x D less activation memory
    per call (at top-16 of MoEUT-244M's sigma-MoE, R x D is 16 copies of the layer input)."""

    @staticmethod
    def forward(ctx, x_TD, w_LDN, index_R, counts_L, row_TK, live_TK, kernel, per_assignment, fused):
        ctx.save_for_backward(x_TD, w_LDN, index_R, counts_L, row_TK, live_TK)
        ctx.kernel, ctx.per_assignment, ctx.fused = kernel, per_assignment, fused
        return grouped_mm(x_TD.index_select(0, index_R), w_LDN, counts_L, kernel)

    @staticmethod
    def backward(ctx, g_RN):
        x_TD, w_LDN, index_R, counts_L, row_TK, live_TK = ctx.saved_tensors
        g_x = g_w = None
        if ctx.needs_input_grad[0]:
            # Rows past n_kept are unwritten in g_x_RD; only kept rows are read (dropped -> row 0, masked).
            g_x_RD = grouped_mm(g_RN, w_LDN.transpose(1, 2), counts_L, ctx.kernel)
            g_x = (_assignment_grad if ctx.per_assignment else _token_grad)(g_x_RD, row_TK, live_TK, ctx.fused)
            g_x = g_x.to(x_TD.dtype)
        if ctx.needs_input_grad[1]:
            g_w = grouped_wgrad(x_TD.index_select(0, index_R), g_RN, counts_L, ctx.kernel)
        return g_x, g_w, None, None, None, None, None, None, None


def gather_mm(x_TD: Optional[torch.Tensor], p: Plan, w_LDN: torch.Tensor, kernel: str = "auto",
              x_XD: Optional[torch.Tensor] = None) -> torch.Tensor:
    """grouped_mm(gather_tokens(x_TD, p), w_LDN, p.counts_E) for all A rows of a plan on one rank (rows past n_kept
    not computed), without keeping the gathered rows for the backward. x_XD instead of x_TD: one input per
    assignment, as gather_assignments (UMoE's mixed tokens)."""
    x = x_TD if x_XD is None else x_XD
    w = w_LDN.to(x.dtype)
    kernel = resolve_kernel(kernel, x, *w.shape[1:])
    index_R = p.token_A if x_XD is None else p.source_A
    return _GatherMM.apply(x, w, index_R, p.counts_E, p.row_TK, None if p.dropless else p.live_TK, kernel,
                           x_XD is not None, p.fused)


class _MMCombine(torch.autograd.Function):
    """out_TD[t] = sum_k weight_TK[t, k] * (a_RF @ w_LFD[e])[row_TK[t, k]]: the second grouped GEMM and the
    combine in one autograd node that saves a_RF (the activation, which the activation's own backward keeps anyway)
    instead of the R x D expert outputs. The combine weights' gradient <g[token_r], y_r> is computed as
    <g[token_r] W^T, a_r>, an R x F product, and the weight gradient as sum_r (w_r a_r)^T g[token_r]: the backward
    gathers g once (R x D) and never scales an R x D tensor."""

    @staticmethod
    def forward(ctx, a_RF, w_LFD, weight_TK, row_TK, source_R, token_R, counts_L, kernel, fused):
        ctx.save_for_backward(a_RF, w_LFD, weight_TK, source_R, token_R, counts_L)
        ctx.kernel = kernel
        return _sum_rows(grouped_mm(a_RF, w_LFD, counts_L, kernel), row_TK, weight_TK.detach(), fused)

    @staticmethod
    def backward(ctx, g_TD):
        a_RF, w_LFD, weight_TK, source_R, token_R, counts_L = ctx.saved_tensors
        R = a_RF.shape[0]
        live_R = torch.arange(R, device=a_RF.device) < counts_L.sum()  # rows the GEMMs computed (no sync)
        w_R = torch.where(live_R, weight_TK.detach().reshape(-1).index_select(0, source_R), 0)
        g_RD = g_TD.to(a_RF.dtype).index_select(0, token_R)
        u_RF = torch.where(live_R.unsqueeze(-1), grouped_mm(g_RD, w_LFD.transpose(1, 2), counts_L, ctx.kernel), 0)
        # Rows past n_kept of a_RF hold whatever the first GEMM left there (maybe NaN): never let them in.
        dot_R = torch.where(live_R, (u_RF.float() * a_RF.float()).sum(-1), 0)
        g_a = u_RF * w_R.to(u_RF.dtype).unsqueeze(-1)
        g_w = grouped_wgrad(a_RF * w_R.to(a_RF.dtype).unsqueeze(-1), g_RD, counts_L, ctx.kernel)
        grad_weight = torch.zeros(weight_TK.numel(), dtype=dot_R.dtype, device=dot_R.device).scatter_(0, source_R, dot_R)
        return g_a, g_w, grad_weight.view(weight_TK.shape).to(weight_TK.dtype), None, None, None, None, None, None


def mm_combine(a_RF: torch.Tensor, w_LFD: torch.Tensor, p: Plan, kernel: str = "auto") -> torch.Tensor:
    """combine(grouped_mm(a_RF, w_LFD, p.counts_E), p) on one rank (a_RF: all A rows of the plan, past n_kept
    ignored), without keeping the R x D expert outputs for the backward. p may be a split_choices view."""
    w = w_LFD.to(a_RF.dtype)
    kernel = resolve_kernel(kernel, a_RF, *w.shape[1:])
    return _MMCombine.apply(a_RF, w, p.weight_TK, p.row_TK, p.source_A, p.token_A, p.counts_E, kernel, p.fused)


class _AllToAll(torch.autograd.Function):
    """Differentiable all_to_all_single with uneven splits: the backward sends gradients back the way the
    rows came."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list, in_splits: list, group) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back = grad.new_empty((sum(ctx.in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return back, None, None, None


class ExpertExchange:
    """Moves rows grouped by global expert id to the ranks that hold those experts and back.

    Rank r of an expert-parallel group of size P holds experts [r * L, (r + 1) * L) (DeepSpeed's layout:
    global id = ep_rank * num_local_experts + local id)."""

    def __init__(self, group, ep_size: int, num_local: int):
        self.group, self.ep_size, self.num_local = group, ep_size, num_local

    def send(self, x_AD: torch.Tensor, counts_E: torch.Tensor):
        """-> (rows for the local experts grouped by local expert, counts per local expert, state for back)."""
        P, L = self.ep_size, self.num_local
        if P == 1:
            return x_AD, counts_E, None
        send_PL = counts_E.view(P, L)
        recv_PL = torch.empty_like(send_PL)
        dist.all_to_all_single(recv_PL, send_PL.contiguous(), group=self.group)
        in_splits = send_PL.sum(1).tolist()
        out_splits = recv_PL.sum(1).tolist()
        x_RD = _AllToAll.apply(x_AD, out_splits, in_splits, self.group)
        # Received rows are ordered by source rank, then local expert: regroup them by local expert.
        local_R = torch.repeat_interleave(torch.arange(L, device=x_AD.device).repeat(P), recv_PL.reshape(-1))
        regroup_R = torch.sort(local_R, stable=True).indices
        return x_RD[regroup_R], recv_PL.sum(0), (regroup_R, in_splits, out_splits)

    def back(self, y_RD: torch.Tensor, state) -> torch.Tensor:
        if state is None:
            return y_RD
        regroup_R, in_splits, out_splits = state
        inverse_R = torch.empty_like(regroup_R)
        inverse_R[regroup_R] = torch.arange(regroup_R.numel(), device=regroup_R.device)
        return _AllToAll.apply(y_RD[inverse_R], in_splits, out_splits, self.group)


def combine(y_RD: torch.Tensor, p: Plan) -> torch.Tensor:
    """out_TD = sum over a token's kept assignments of weight * expert output. y_RD holds the first R rows
    of the plan (all A rows on one rank, where rows past n_kept are not computed and may hold anything; the
    kept rows only after an expert-parallel exchange): only kept rows are read."""
    R = y_RD.shape[0]
    return _Combine.apply(y_RD, p.weight_TK, p.row_TK, p.source_A[:R], p.token_A[:R], p.fused)
