"""Routers: token -> (expert ids, combine weights, aux losses, statistics).

Shape suffixes: T tokens, D model width, E experts, K experts chosen per token.

Router math runs in fp32 whatever the activations' dtype (bf16 logits make top-k choices noisy and the
z-loss overflow-prone), as GShard, Switch and DeepSpeed do.

Two kinds (MoE(router=...)):
- "softmax": top-k of softmax(x W^T), optional noise and renormalisation (Switch, GLaM, WideNet).
- "sigmoid": sigma-MoE (Csordas et al. 2023; MoEUT, Csordas et al. 2024): logits s = LN(x) W^T with a LayerNorm
  on the router input only, gates sigmoid(s), top-k by gate, the raw sigmoid values as combine weights (no
  renormalisation: each expert's gate is independent, so a token may use less than "one expert's worth").
  No balance loss: the regulariser is minus the entropy of the mean softmax(s) over a sequence
  (sequence_entropy_loss), weighted by moe.entropy_weight_ffn / entropy_weight_attention.
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


def sequence_balance_loss(probs_TE: torch.Tensor, expert_ids_TK: torch.Tensor, token_shape: tuple,
                          seq_dim: int) -> torch.Tensor:
    """The balance loss per sequence, averaged over sequences (DeepSeek-V2's sequence-level auxiliary loss, which
    UMoE uses with weight 0.001): for each sequence, E * sum_i f_i * P_i with f_i the sequence's fraction of routed
    assignments to expert i and P_i its mean router probability. It asks every sequence, not only the batch, to
    spread its tokens; equals 1 when each sequence routes uniformly. token_shape: the input's shape without D,
    with the sequence along seq_dim (megatron's [s, b]: 0); a 1-D token_shape is one sequence."""
    E, K = probs_TE.shape[-1], expert_ids_TK.shape[-1]
    if len(token_shape) == 1:
        return balance_loss(probs_TE, expert_ids_TK)
    probs_BSE = probs_TE.reshape(*token_shape, E).movedim(seq_dim, -2).reshape(-1, token_shape[seq_dim], E)
    ids_BX = expert_ids_TK.reshape(*token_shape, K).movedim(seq_dim, -2).reshape(probs_BSE.shape[0], -1)
    f_BE = probs_TE.new_zeros(probs_BSE.shape[0], E).scatter_add_(1, ids_BX, torch.ones_like(ids_BX, dtype=probs_TE.dtype))
    f_BE = f_BE / ids_BX.shape[1]
    return E * (f_BE * probs_BSE.mean(1)).sum(-1).mean()


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

    def routing_call(self, training: bool) -> tuple:
        """(function, its arguments after x_TD): the router's math as a plain function of tensors and numbers,
        which the MoE layer compiles once for every layer (no guard on which module it belongs to)."""
        return route_tokens, (self.wg.weight, self.top_k, self.noise_std if training else 0.0, self.renormalize)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        fn, args = self.routing_call(self.training)
        return fn(x_TD, *args)


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


def row_normalised_normal_(w_ED: torch.Tensor, std: float) -> torch.Tensor:
    """MoEUT's router init, in place: N(0, std), then every row rescaled to norm std * sqrt(D) (the expected norm
    of such a row), so that no expert starts with a systematically larger logit."""
    with torch.no_grad():
        w_ED.normal_(0.0, std)
        w_ED.mul_(std * math.sqrt(w_ED.shape[-1]) / w_ED.norm(dim=-1, keepdim=True).clamp(min=1e-12))
    return w_ED


class SigmoidTopKRouter(nn.Module):
    """sigma-MoE's router: LayerNorm on the router input (affine, its own parameters), a bias-free linear map,
    sigmoid gates, top-k by gate, weights not renormalised.

    Init (MoEUT, DESIGN 5.6): row_normalised_normal_. The weight is named `wg` (DeepSpeed's key layout, as
    SoftmaxTopKRouter); the norm is `norm`."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, init_std: float = 0.02):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.norm = nn.LayerNorm(hidden_size)
        self.wg = nn.Linear(hidden_size, num_experts, bias=False)
        row_normalised_normal_(self.wg.weight, init_std)

    def routing_call(self, training: bool) -> tuple:
        """(function, its arguments after x_TD), as SoftmaxTopKRouter.routing_call."""
        return route_sigmoid, (self.wg.weight, self.top_k, self.norm.weight, self.norm.bias, self.norm.eps)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        fn, args = self.routing_call(self.training)
        return fn(x_TD, *args)


def route_sigmoid(x_TD: torch.Tensor, w_ED: torch.Tensor, top_k: int, norm_w_D: torch.Tensor | None,
                  norm_b_D: torch.Tensor | None, eps: float = 1e-5) -> Routing:
    """sigma-MoE routing in fp32: s = LN(x) W^T, weights = sigmoid(s) of the top-k (not renormalised).

    aux["balance"] is only a statistic here (detached: the sigmoid kind trains without a balance loss);
    aux["z"] keeps its gradient (moe.z_loss_weight, 0 by default). probs_TE = softmax(s): the distribution
    whose per-sequence mean the entropy regulariser spreads out."""
    h_TD = F.layer_norm(x_TD.float(), (x_TD.shape[-1],), None if norm_w_D is None else norm_w_D.float(),
                        None if norm_b_D is None else norm_b_D.float(), eps)
    return sigmoid_topk(F.linear(h_TD, w_ED.float()), top_k)


def sigmoid_topk(logits_TE: torch.Tensor, top_k: int) -> Routing:
    """The sigmoid kind's choice from fp32 logits (sigma-MoE's FFN router; SwitchHead's per-head routers with
    one row per (token, head)): raw sigmoid gates of the top-k, softmax(logits) for the regulariser and the
    statistics, the balance value as a detached statistic, the z-loss with its gradient."""
    # sigmoid is monotone: top-k of the gates is top-k of the logits, taken on the gates to keep the values.
    weights_TK, expert_ids_TK = torch.topk(torch.sigmoid(logits_TE), top_k, dim=-1)
    probs_TE = torch.softmax(logits_TE, dim=-1)
    aux = {"balance": balance_loss(probs_TE.detach(), expert_ids_TK), "z": z_loss(logits_TE)}
    return Routing(expert_ids_TK=expert_ids_TK, weights_TK=weights_TK, aux=aux, probs_TE=probs_TE)


def sequence_prob_sums(probs_TE: torch.Tensor, token_shape: tuple, seq_dim: int) -> torch.Tensor:
    """Per-sequence sums of the router distribution, [B, E] (with gradient): probs_TE's T tokens laid out as
    token_shape (the input's shape without D) with the sequence along seq_dim (megatron's [s, b]: 0). A 1-D
    token_shape is one sequence."""
    E = probs_TE.shape[-1]
    if len(token_shape) == 1:
        return probs_TE.sum(0, keepdim=True)
    return probs_TE.reshape(*token_shape, E).sum(seq_dim).reshape(-1, E)


def sequence_entropy_loss(prob_sums_BE: torch.Tensor, count: int) -> torch.Tensor:
    """Minus the mean over sequences of the entropy of the mean router distribution p_BE = prob_sums_BE / count
    (count: tokens per sequence times the calls pooled). Minimising it spreads the sequence's tokens over the
    experts (MoEUT's regulariser) without pushing any single token's distribution towards uniform."""
    p_BE = prob_sums_BE / count
    return (p_BE * torch.log(p_BE.clamp(min=1e-20))).sum(-1).mean()


def router_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy of the router distribution, in nats (log E = uniform, 0 = one-hot)."""
    p = probs_TE.detach()
    return -(p * torch.log(p.clamp(min=1e-20))).sum(dim=-1).mean()


def widenet_noise_std(num_experts: int) -> float:
    """WideNet's router noise: N(0, 1/E) added to the logits in training (official code)."""
    return 1.0 / num_experts


__all__ = ["Routing", "SoftmaxTopKRouter", "SigmoidTopKRouter", "route_tokens", "route_sigmoid", "sigmoid_topk", "sequence_prob_sums",
           "sequence_entropy_loss", "row_normalised_normal_", "balance_loss", "sequence_balance_loss", "z_loss", "router_entropy",
           "widenet_noise_std"]
