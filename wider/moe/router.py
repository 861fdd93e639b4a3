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
    live_TK: torch.Tensor | None = None  # bool, expert choice: the slots that hold an expert (None: all)


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
    """A bias-free linear map scored by softmax (or sigmoid), top-k.

    noise_std: standard deviation of Gaussian noise added to the logits in training only (WideNet's
    official code uses 1/E; 0 = off). renormalize: scale the k chosen weights to sum to 1 (GShard /
    DeepSpeed top-2 and DeepSeek-V3 do; WideNet and Switch (k = 1) do not). score: 'softmax' over the experts or
    'sigmoid' per expert (DeepSeek-V3's affinities). selection_bias: a per-expert bias buffer added to the scores
    for the top-k choice only (DeepSeek-V3's auxiliary-loss-free balancing; wider.moe.stats.update_selection_biases
    moves it), kept in the checkpoint; absent (None) when off, so that other models' checkpoints keep their keys.
    The parameter is named `wg` so that the module keeps DeepSpeed's checkpoint key layout
    (`...deepspeed_moe.gate.wg.weight`, a non-expert parameter); the bias buffer's name must not contain "expert"
    (DeepSpeed would treat it as an expert shard).
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, noise_std: float = 0.0,
                 renormalize: bool = False, init_std: float = 0.02, score: str = "softmax",
                 selection_bias: bool = False):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.noise_std, self.renormalize, self.score = float(noise_std), bool(renormalize), score
        self.wg = nn.Linear(hidden_size, num_experts, bias=False)
        nn.init.normal_(self.wg.weight, mean=0.0, std=init_std)
        self.selection_bias: torch.Tensor | None
        self.register_buffer("selection_bias", torch.zeros(num_experts) if selection_bias else None)

    def routing_call(self, training: bool) -> tuple:
        """(function, its arguments after x_TD): the router's math as a plain function of tensors and numbers,
        which the MoE layer compiles once for every layer (no guard on which module it belongs to)."""
        return route_tokens, (self.wg.weight, self.top_k, self.noise_std if training else 0.0, self.renormalize,
                              self.score, self.selection_bias)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        fn, args = self.routing_call(self.training)
        return fn(x_TD, *args)


def route_tokens(x_TD: torch.Tensor, w_ED: torch.Tensor, top_k: int, noise_std: float, renormalize: bool,
                 score: str = "softmax", bias_E: torch.Tensor | None = None) -> Routing:
    """The router's math as a function of its weight (so that it compiles once for every layer: no guard on
    which module it belongs to). noise_std > 0 only in training. bias_E: added to the scores for the choice only;
    the combine weights are the unbiased scores (DeepSeek-V3, section 2.1.2)."""
    logits_TE = F.linear(x_TD.float(), w_ED.float())
    if noise_std > 0:
        logits_TE = logits_TE + torch.randn_like(logits_TE) * noise_std
    if score == "sigmoid":
        scores_TE = torch.sigmoid(logits_TE)
        # The balance statistics and loss read a distribution over experts: the affinities normalised per token.
        probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
    else:
        scores_TE = probs_TE = torch.softmax(logits_TE, dim=-1)
    if bias_E is None:
        weights_TK, expert_ids_TK = torch.topk(scores_TE, top_k, dim=-1)
    else:
        expert_ids_TK = torch.topk(scores_TE.detach() + bias_E.float(), top_k, dim=-1).indices
        weights_TK = scores_TE.gather(1, expert_ids_TK)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    aux = {"balance": balance_loss(probs_TE, expert_ids_TK), "z": z_loss(logits_TE)}
    return Routing(expert_ids_TK=expert_ids_TK, weights_TK=weights_TK, aux=aux, probs_TE=probs_TE)


# --- Expert Choice (Zhou et al. 2022) as llm-random trains the fine-grained scaling-law models ----------------
# Read: llm-random, research/conditional/moe_layers/expert_choice.py and moe_gating.py at commit 67be78cb
# (2025-02-03; the class first appeared by 3af39a41, 2023-08-11), with the configuration of its granularity runs,
# configs/baselines/gpt/expert_choice/common.yaml: logits x W (no bias), softmax over the EXPERTS of each token
# (softmax_over: experts), groups of the tokens at one position across the batch (group_granular_moe_by_batch), each
# expert takes round(topk_fraction x group) of them with topk_fraction = k / E (torch.topk), the chosen softmax
# values are the combine weights, and a LayerNorm on the layer's output (layer_norm_in_expert_choice: true).


def expert_choice_capacity(group: int, top_k: int, num_experts: int, factor: float) -> int:
    """Tokens each expert takes from a routing group: round(factor x group x k / E) (llm-random's
    round(topk_fraction x group), Python's rounding), at least 1 and at most the group."""
    return min(group, max(1, round(factor * group * top_k / num_experts)))


def expert_choice_groups(tokens: int, group: int) -> list[tuple[int, int, int]]:
    """[(first token, group size, number of such groups)]: consecutive groups of `group` tokens and, when `group`
    does not divide `tokens`, one smaller group of the rest."""
    n = min(group, tokens)
    full, rest = divmod(tokens, n)
    return [(0, n, full)] + ([(full * n, rest, 1)] if rest else [])


def route_expert_choice(x_TD: torch.Tensor, w_ED: torch.Tensor, top_k: int, factor: float, group: int,
                        softmax_over: str = "experts") -> Routing:
    """Expert Choice in fp32: within each routing group of `group` consecutive tokens, expert e takes the
    expert_choice_capacity tokens with the highest score for it (ties to the earlier token: a stable sort, where
    llm-random's torch.topk leaves ties unspecified); the score is the weight of that (token, expert). Scores:
    softmax over the experts of each token ('experts') or over the group's tokens for each expert ('tokens').

    Returns a Routing in token-major form: each token's K_max slots (K_max = the most experts any token got: one
    host synchronisation) hold its experts in ascending id order, `live_TK` marks the used slots (a token may have
    0 .. E experts), the weights of unused slots are 0. aux['balance'] is a detached statistic (the experts are
    balanced by construction)."""
    T, E = x_TD.shape[0], w_ED.shape[0]
    dev = x_TD.device
    logits_TE = F.linear(x_TD.float(), w_ED.float())
    token_parts, weight_parts = [], []
    for start, n, count in expert_choice_groups(T, group):
        scores_GNE = logits_TE[start:start + n * count].view(count, n, E)
        scores_GNE = torch.softmax(scores_GNE, dim=1 if softmax_over == "tokens" else 2)
        C = expert_choice_capacity(n, top_k, E, factor)
        scores_GEN = scores_GNE.transpose(1, 2)
        pick_GEC = torch.sort(scores_GEN.detach(), dim=2, descending=True, stable=True).indices[:, :, :C]
        weight_parts.append(scores_GEN.gather(2, pick_GEC).transpose(0, 1).reshape(E, count * C))
        first_G = torch.arange(count, device=dev).view(count, 1, 1) * n + start
        token_parts.append((pick_GEC + first_G).transpose(0, 1).reshape(E, count * C))
    token_EC, weight_EC = torch.cat(token_parts, 1), torch.cat(weight_parts, 1)
    C_all = token_EC.shape[1]
    # Expert-major assignments -> token-major slots: a stable sort by token keeps each token's experts ascending.
    token_A = token_EC.reshape(-1)
    order_A = torch.sort(token_A, stable=True).indices
    per_token_T = torch.zeros(T, dtype=torch.long, device=dev).scatter_add_(0, token_A, torch.ones_like(token_A))
    K = max(1, int(per_token_T.max()))  # the one host synchronisation
    token_sorted_A = token_A[order_A]
    slot_A = torch.arange(token_A.numel(), device=dev) - (torch.cumsum(per_token_T, 0) - per_token_T)[token_sorted_A]
    expert_A = (order_A // C_all)
    flat_A = token_sorted_A * K + slot_A
    expert_ids_TK = torch.zeros(T * K, dtype=torch.long, device=dev).index_put((flat_A,), expert_A).view(T, K)
    live_TK = torch.zeros(T * K, dtype=torch.bool, device=dev).index_put(
        (flat_A,), torch.ones_like(flat_A, dtype=torch.bool)).view(T, K)
    weights_TK = torch.zeros(T * K, dtype=weight_EC.dtype, device=dev).index_put(
        (flat_A,), weight_EC.reshape(-1)[order_A]).view(T, K)
    probs_TE = logits_TE.softmax(-1)
    aux = {"balance": balance_loss(probs_TE.detach(), expert_ids_TK[live_TK].view(-1, 1)) if live_TK.any()
           else torch.zeros((), device=dev), "z": z_loss(logits_TE)}
    return Routing(expert_ids_TK=expert_ids_TK, weights_TK=weights_TK, aux=aux, probs_TE=probs_TE, live_TK=live_TK)


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


__all__ = ["Routing", "SoftmaxTopKRouter", "route_expert_choice", "expert_choice_capacity", "expert_choice_groups", "SigmoidTopKRouter", "route_tokens", "route_sigmoid", "sigmoid_topk", "sequence_prob_sums",
           "sequence_entropy_loss", "row_normalised_normal_", "balance_loss", "sequence_balance_loss", "z_loss", "router_entropy",
           "widenet_noise_std"]
