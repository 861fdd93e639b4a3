"""Routers: token -> (expert ids, combine weights, aux losses, statistics).

Shape suffixes: T tokens, D model width, E experts, K experts chosen per token.

Router math runs in fp32 whatever the activations' dtype (bf16 logits make top-k choices noisy and the
z-loss overflow-prone), as GShard, Switch and DeepSpeed do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    expert_ids_TK: torch.Tensor  # int64, the chosen experts, best first
    weights_TK: torch.Tensor  # fp32 combine weights
    aux: dict = field(default_factory=dict)  # unweighted aux losses (scalars with grad): balance, z
    probs_TE: torch.Tensor | None = None  # fp32 router distribution (for statistics)


def balance_loss(probs_TE: torch.Tensor, expert_ids_TK: torch.Tensor) -> torch.Tensor:
    """Switch / GShard load-balancing loss E * sum_i f_i * P_i.

    f_i: fraction of all T*K routed assignments that went to expert i (counted over every choice, not only
    the first: DeepSpeed's top-2 gate counts first choices only, which gives a different value for k = 2);
    P_i: mean router probability of expert i. Equals 1 for a perfectly uniform router. Gradient flows
    through P only (f is a count)."""
    E = probs_TE.shape[-1]
    ids = expert_ids_TK.reshape(-1)
    # scatter_add rather than bincount, which reads the data's maximum on the host (a sync on CUDA).
    f_E = probs_TE.new_zeros(E).scatter_add_(0, ids, torch.ones_like(ids, dtype=probs_TE.dtype)) / ids.numel()
    P_E = probs_TE.mean(dim=0)
    return E * torch.sum(f_E * P_E)


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss mean(logsumexp(logits)^2): keeps router logits small."""
    return torch.logsumexp(logits_TE, dim=-1).pow(2).mean()


class SoftmaxTopKRouter(nn.Module):
    """Softmax over a bias-free linear map, top-k.

    noise_std: standard deviation of Gaussian noise added to the logits in training only (WideNet's
    official code uses 1/E; 0 = off). renormalize: scale the k chosen probabilities to sum to 1 (GShard /
    DeepSpeed top-2 do; WideNet and Switch (k = 1) do not). The parameter is named `wg` so that the module
    keeps DeepSpeed's checkpoint key layout (`...deepspeed_moe.gate.wg.weight`, a non-expert parameter).
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, noise_std: float = 0.0,
                 renormalize: bool = False, init_std: float = 0.02):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.noise_std, self.renormalize = float(noise_std), bool(renormalize)
        self.wg = nn.Linear(hidden_size, num_experts, bias=False)
        nn.init.normal_(self.wg.weight, mean=0.0, std=init_std)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        return route_tokens(x_TD, self.wg.weight, self.top_k, self.noise_std if self.training else 0.0,
                            self.renormalize)


def route_tokens(x_TD: torch.Tensor, w_ED: torch.Tensor, top_k: int, noise_std: float, renormalize: bool) -> Routing:
    """The router's math as a function of its weight (so that it compiles once for every layer: no guard on
    which module it belongs to). noise_std > 0 only in training."""
    logits_TE = F.linear(x_TD.float(), w_ED.float())
    if noise_std > 0:
        logits_TE = logits_TE + torch.randn_like(logits_TE) * noise_std
    probs_TE = torch.softmax(logits_TE, dim=-1)
    weights_TK, expert_ids_TK = torch.topk(probs_TE, top_k, dim=-1)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    aux = {"balance": balance_loss(probs_TE, expert_ids_TK), "z": z_loss(logits_TE)}
    return Routing(expert_ids_TK=expert_ids_TK, weights_TK=weights_TK, aux=aux, probs_TE=probs_TE)


def router_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy of the router distribution, in nats (log E = uniform, 0 = one-hot)."""
    p = probs_TE.detach()
    return -(p * torch.log(p.clamp(min=1e-20))).sum(dim=-1).mean()


def widenet_noise_std(num_experts: int) -> float:
    """WideNet's router noise: N(0, 1/E) added to the logits in training (official code)."""
    return 1.0 / num_experts


__all__ = ["Routing", "SoftmaxTopKRouter", "route_tokens", "balance_loss", "z_loss", "router_entropy", "widenet_noise_std"]
