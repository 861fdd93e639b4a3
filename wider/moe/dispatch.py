"""Index-based dispatch: capacity, permutation by expert, all-to-all over the expert-parallel group, combine.

Shape suffixes: T tokens, D model width, E experts (global), L experts on this rank (E / ep_size),
K choices per token, A kept assignments (<= T * K), R rows received by this rank's experts.

No one-hot [tokens, experts, capacity] tensor is ever built (GShard's einsum formulation costs
T * E * C memory and FLOPs): assignments are sorted by expert id and moved with gathers / index_add.

Capacity priority (GShard): every first choice comes before every second choice, and within one choice
rank, earlier tokens come first; an assignment whose position inside its expert is >= capacity is
dropped (its token keeps only the residual for that choice). Capacity is computed over the local
micro-batch before any all-to-all, so a rank's drops do not depend on the other ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


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
    weight_A: torch.Tensor  # its combine weight (0 for dropped rows)
    live_A: torch.Tensor  # bool: kept
    counts_E: torch.Tensor  # kept assignments per expert (int64)
    routed_E: torch.Tensor  # assignments the router made per expert, before capacity (int64)
    dropless: bool  # no capacity: every row is live

    def kept(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(token, weight, expert) of the kept rows only (synchronises: for tests and expert parallelism)."""
        n = int(self.counts_E.sum())
        expert = torch.repeat_interleave(torch.arange(len(self.counts_E), device=self.counts_E.device),
                                         self.counts_E)
        return self.token_A[:n], self.weight_A[:n], expert


def plan(expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int, cap: Optional[int]) -> Plan:
    """Order the T*K assignments by expert (stable sorts, so the priority order holds inside an expert) and
    apply the capacity, without leaving the device."""
    T, K = expert_ids_TK.shape
    A = T * K
    # Choice-major flattening: index a = choice * T + token, i.e. all first choices in token order, then
    # all second choices: exactly the capacity priority.
    ids_A = expert_ids_TK.t().reshape(-1)
    w_A = weights_TK.t().reshape(-1)
    # scatter_add, not bincount: bincount sizes its output from the data (a device-to-host sync on CUDA).
    routed_E = torch.zeros(num_experts, dtype=torch.long, device=ids_A.device).scatter_add_(
        0, ids_A, torch.ones_like(ids_A))
    sorted_ids_A, order_A = torch.sort(ids_A, stable=True)
    if cap is None:
        counts_E = routed_E
        live_A = torch.ones(A, dtype=torch.bool, device=ids_A.device)
    else:
        starts_E = torch.cumsum(routed_E, 0) - routed_E
        position_A = torch.arange(A, device=ids_A.device) - starts_E[sorted_ids_A]
        # Dropped rows move behind every kept row (sentinel key E); both sorts are stable.
        key_A = torch.where(position_A < cap, sorted_ids_A, num_experts)
        order_A = order_A[torch.sort(key_A, stable=True).indices]
        counts_E = routed_E.clamp(max=cap)
        live_A = torch.arange(A, device=ids_A.device) < counts_E.sum()
    weight_A = torch.where(live_A, w_A[order_A], torch.zeros((), dtype=w_A.dtype, device=w_A.device))
    return Plan(token_A=order_A % T, weight_A=weight_A, live_A=live_A, counts_E=counts_E, routed_E=routed_E,
                dropless=cap is None)


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


def combine(y_RD: torch.Tensor, p: Plan, num_tokens: int) -> torch.Tensor:
    """out_TD = sum over a token's kept assignments of weight * expert output. y_RD holds the first R rows
    of the plan (all A rows on one rank, where rows past n_kept are not computed and may hold anything; the
    kept rows only after an expert-parallel exchange)."""
    R = y_RD.shape[0]
    w_R = p.weight_A[:R].to(y_RD.dtype).unsqueeze(-1)
    contrib_RD = y_RD * w_R
    if R == p.token_A.shape[0] and not p.dropless:
        contrib_RD = torch.where(p.live_A.unsqueeze(-1), contrib_RD, torch.zeros((), dtype=y_RD.dtype,
                                                                              device=y_RD.device))
    out_TD = y_RD.new_zeros((num_tokens, y_RD.shape[-1]))
    return out_TD.index_add(0, p.token_A[:R], contrib_RD)
