"""The MoE layer every architecture reuses, recognised by DeepSpeed as its own.

Shape suffixes: T tokens, D model width, E experts, L local experts, K choices, A kept assignments,
R rows received by this rank's experts.

router -> plan (capacity, sort by expert) -> gather rows -> [all-to-all over the EP group] -> grouped
experts -> [all-to-all back] -> weighted sum into the tokens (dispatch.combine). On one expert-parallel rank the
gather and the combine are fused into the two grouped GEMMs' autograd nodes (GroupedExperts.forward_plan), so
the forward keeps neither k-fold copy of the tokens (R x D) for the backward.

Why a subclass of `deepspeed.moe.layer.MoE` (DESIGN section 6): DeepSpeed 0.19.8's engine treats a model as
MoE only when `isinstance(module, deepspeed.moe.layer.MoE)`. That sets `has_moe_layers`, which (1) makes
ZeRO 1/2 and the plain all-reduce average expert gradients over the expert-data-parallel group of the
parameters' `group_name` (instead of over every data-parallel rank, which would mix different experts),
and (2) makes `save_checkpoint` write each expert to its own file (`layer_<l>_expert_<e>_...`) from the keys
`.deepspeed_moe.experts.deepspeed_experts.<local id>.` with local ids turned into global ones, and load them
back on whatever rank holds that expert. A home-made nn.Module would be silently treated as dense.
We therefore subclass MoE but skip its __init__ (which builds DeepSpeed's own gate and one-hot dispatch),
set the attributes the engine reads (num_experts, num_local_experts, ep_size, expert_group_name), keep its
key layout (`deepspeed_moe.gate.wg.weight` for the router, `deepspeed_moe.experts.deepspeed_experts.<i>.*`
for experts, presented by state-dict hooks over our stacked weights) and tag expert parameters with
`allreduce=False` and `group_name` exactly as DeepSpeed's Experts does.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Optional

import torch
from deepspeed.moe.layer import MoE as _DeepSpeedMoE
from deepspeed.utils import groups
from torch import nn

from wider.moe import dispatch
from wider.moe.experts import GroupedExperts, init_expert_weights, scaled_output_std
from wider.moe.router import (SigmoidTopKRouter, SoftmaxTopKRouter, router_entropy, sequence_balance_loss,
                              sequence_entropy_loss, sequence_prob_sums)
from wider.moe.settings import MoESettings

_EXPERT_KEY = re.compile(r"^deepspeed_experts\.(\d+)\.(w1|w2)$")
_STACKED = {"w1": "w1_LDF", "w2": "w2_LFD"}


@dataclass
class CallRecord:
    """What one call of an MoE layer reports (all but `aux` detached)."""

    aux: torch.Tensor  # weighted aux loss of this call, with grad: added to the LM loss
    balance: torch.Tensor
    z: torch.Tensor
    entropy: torch.Tensor
    routed_E: torch.Tensor  # assignments the router made per expert (before capacity)
    kept_E: torch.Tensor  # assignments that reached the expert
    # Sequence entropy regulariser (sigmoid routers): per-sequence sums of softmax(s), with grad, [B, E]; the
    # tokens per sequence they sum over; the weight. wider.moe.stats.take pools them over every call of the
    # layer before taking the entropy (the regulariser is not a sum of per-call terms). None = no regulariser.
    prob_sums_BE: Optional[torch.Tensor] = None
    tokens_per_seq: int = 0
    entropy_weight: float = 0.0
    router: str = ""  # which router of the layer made the record ("" for an MoE FFN; SwitchHead: "v" or "o")


def expert_parallel_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert-parallel / expert-data-parallel group pair of this size."""
    return f"ep_size_{ep_size}"


def ensure_expert_groups(ep_size: int) -> None:
    """Create DeepSpeed's expert-parallel and expert-data-parallel groups for ep_size (collective: every
    rank must call it). Consecutive ranks form an EP group ([0,1], [2,3], ...); ranks holding the same
    experts form the expert-data-parallel group ([0,2,...], [1,3,...]) over which expert gradients are
    averaged."""
    if expert_parallel_group_name(ep_size) not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)


class _Core(nn.Module):
    """The `deepspeed_moe` child: keeps DeepSpeed's key layout (gate.wg.weight, experts.deepspeed_experts.*)."""

    def __init__(self, gate: Optional[nn.Module], experts: GroupedExperts):
        super().__init__()
        self.gate, self.experts = gate, experts


class MoE(_DeepSpeedMoE):
    """Top-k MoE FFN: forward(hidden [..., D]) -> (output [..., D], weighted aux loss, routed counts [E]),
    the same return contract as deepspeed.moe.layer.MoE.

    router: "softmax" (Switch / GLaM / WideNet; see SoftmaxTopKRouter) or "sigmoid" (sigma-MoE, MoEUT: see
    SigmoidTopKRouter; the router LayerNorms its own input while the experts read the raw hidden states).

    Aux losses: softmax routers: balance (weight settings.aux_loss_weight) and z-loss (settings.z_loss_weight)
    are summed into one weighted scalar per call. Sigmoid routers: no balance loss (aux_loss_weight does not
    apply; the balance value is still reported); z-loss as above; and the sequence entropy regulariser
    (weight `entropy_weight`, default settings.entropy_weight_ffn), pooled over every call of the layer by
    wider.moe.stats.take. Every call appends a CallRecord to `self.records`, which wider.moe.stats collects (a
    layer shared by several blocks reports once per call, in call order). The aux returned by forward counts
    the entropy regulariser of this call alone (equal to the pooled one for a layer called once per step).

    seq_dim: where the sequence runs in the input [..., D] (megatron's [s, b, h]: 0); it decides which tokens
    the entropy regulariser pools. A [T, D] input is one sequence.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, ffn_size: int, settings: MoESettings,
                 activation: str = "gelu", noise_std: float = 0.0, renormalize: bool = False,
                 init_std: float = 0.02, output_std: Optional[float] = None, num_layers_for_init: int = 1,
                 label: str = "moe", shared: bool = False, router: str = "softmax",
                 entropy_weight: Optional[float] = None, seq_dim: int = 0):
        nn.Module.__init__(self)  # not DeepSpeed's __init__: it would build its own gate and dispatcher
        ep = settings.ep_size
        if num_experts % ep:
            raise ValueError(f"num_experts {num_experts} is not divisible by moe.ep_size {ep}")
        # Attributes DeepSpeed's engine and checkpoint code read from a MoE module.
        self.num_experts, self.ep_size, self.num_local_experts = num_experts, ep, num_experts // ep
        self.expert_group_name = expert_parallel_group_name(ep)
        self.use_residual, self.enable_expert_tensor_parallelism = False, False

        self.hidden_size, self.top_k, self.settings = hidden_size, top_k, settings
        if router not in ("softmax", "sigmoid", "none"):
            raise ValueError(f"router {router!r} is not a router kind; use 'softmax', 'sigmoid' or 'none' (an expert "
                             "bank routed by its callers: run_experts)")
        if router == "sigmoid" and (noise_std or renormalize):
            raise ValueError(f"router 'sigmoid' takes no noise and no renormalisation (got noise_std {noise_std}, "
                             f"renormalize {renormalize}); sigma-MoE uses the raw sigmoid gates: pass 0 / False")
        self.router_kind, self.seq_dim = router, seq_dim
        self.entropy_weight = (settings.entropy_weight_ffn if entropy_weight is None else float(entropy_weight)) \
            if router == "sigmoid" else 0.0
        self.label, self.shared = label, shared
        self.router_name = ""  # CallRecord.router of forward()'s records (UMoE names its FFN routing "ffn")
        self.records: list[CallRecord] = []
        self._exchange: Optional[dispatch.ExpertExchange] = None

        if router == "sigmoid":
            gate = SigmoidTopKRouter(hidden_size, num_experts, top_k, init_std)
        elif router == "softmax":
            gate = SoftmaxTopKRouter(hidden_size, num_experts, top_k, noise_std, renormalize, init_std)
        else:  # "none": the callers bring their own routers (route(..., gate=...)) and call run_experts
            gate = None
        experts = GroupedExperts(self.num_local_experts, hidden_size, ffn_size, activation)
        # Draw every expert's weights on every rank (same RNG stream), keep this rank's slice.
        out_std = output_std if output_std is not None else scaled_output_std(init_std, num_layers_for_init)
        w1, w2 = init_expert_weights(num_experts, hidden_size, ffn_size, activation, init_std, out_std)
        experts.init_from_full(w1, w2, self._ep_rank())
        for p in experts.parameters():  # as deepspeed.moe.experts.Experts tags them
            p.allreduce = False
            p.group_name = self.expert_group_name
        self.deepspeed_moe = _Core(gate, experts)
        experts.register_state_dict_post_hook(_split_experts_hook)
        experts.register_load_state_dict_pre_hook(_stack_experts_hook)

    def _ep_rank(self) -> int:
        if self.ep_size == 1:
            return 0
        if self.expert_group_name not in groups._get_expert_parallel_group_dict():
            raise RuntimeError(f"expert-parallel groups for ep_size {self.ep_size} do not exist yet; call "
                               f"wider.moe.layer.ensure_expert_groups({self.ep_size}) on every rank before "
                               "building the model")
        return groups._get_expert_parallel_rank(self.expert_group_name)

    # DeepSpeed's engine calls this after wrapping the model.
    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        if self.ep_size > 1:
            if self.expert_group_name not in groups._get_expert_parallel_group_dict():
                groups._create_expert_and_data_parallel(
                    self.ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel_)
        self._exchange = None  # rebuilt from the (possibly new) group at the next forward

    def exchange(self) -> dispatch.ExpertExchange:
        if self._exchange is None:
            group = groups._get_expert_parallel_group(self.expert_group_name) if self.ep_size > 1 else None
            if self.ep_size > 1:
                self._ep_rank()  # raises the clear error when the groups are missing
            self._exchange = dispatch.ExpertExchange(group, self.ep_size, self.num_local_experts)
        return self._exchange

    def forward(self, hidden_states: torch.Tensor, used_token: Optional[torch.Tensor] = None):
        if used_token is not None:
            raise NotImplementedError("used_token masking is not supported by wider's MoE")
        if self.deepspeed_moe.gate is None:
            raise RuntimeError(f"MoE {self.label!r} was built with router 'none' (an expert bank): route with "
                               "route(x, gate=...) and compute with run_experts(...)")
        shape = hidden_states.shape
        x_TD = hidden_states.reshape(-1, self.hidden_size)
        routing, p = self.route(x_TD)
        out_TD = self.run_experts(p, x_TD=x_TD)
        aux = self.record(routing, p, tuple(shape[:-1]), self.router_name)
        return out_TD.reshape(shape), aux, p.routed_E

    def route(self, x_TD: torch.Tensor, gate: Optional[nn.Module] = None) -> tuple:
        """(Routing, Plan) of the tokens x_TD by `gate` (default this layer's router; UMoE's attention brings its
        own router over the same experts), with this layer's capacity for that router's top-k."""
        gate = self.deepspeed_moe.gate if gate is None else gate
        cap = dispatch.capacity(x_TD.shape[0], gate.top_k, self.num_experts,
                                self.settings.capacity_factor_for(self.training), self.settings.min_capacity)
        route = _route_compiled if (COMPILE_ROUTING and x_TD.is_cuda) else _route
        fn, args = gate.routing_call(self.training)
        return route(fn, x_TD, args, self.num_experts, cap)

    def run_experts(self, p: dispatch.Plan, x_TD: Optional[torch.Tensor] = None,
                    x_XD: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The experts on the plan's kept assignments, weighted and summed per token: out_TD. Inputs: x_TD (each
        token's hidden state, fed to all its chosen experts) or x_XD [T * K, D] (one input per assignment, in
        token-major order t * K + k: UMoE's pre-mixing attention)."""
        if (x_TD is None) == (x_XD is None):
            raise ValueError("run_experts takes exactly one of x_TD (per-token inputs) and x_XD (per-assignment inputs)")

        ex = self.exchange()
        experts = self.deepspeed_moe.experts
        if ex.ep_size == 1:
            # Fixed shapes, no host synchronisation: all T*K rows are gathered; the grouped GEMMs compute only
            # the kept ones (their offsets end at n_kept) and the combine reads only those. The gather and the
            # combine are fused into the GEMMs' autograd nodes: no R x D tensor is kept for the backward.
            return experts.forward_plan(x_TD, p, x_XD=x_XD)
        # all_to_all_single takes its split sizes as host integers: one synchronisation is unavoidable.
        n_kept = int(p.counts_E.sum())
        rows = dispatch.gather_tokens(x_TD, p, n_kept) if x_XD is None else dispatch.gather_assignments(x_XD, p, n_kept)
        x_RD, counts_L, state = ex.send(rows, p.counts_E)
        return dispatch.combine(ex.back(experts(x_RD, counts_L), state), p)

    def record(self, routing, p: dispatch.Plan, token_shape: tuple, router_name: str = "") -> torch.Tensor:
        """Append this call's CallRecord (under `router_name`) and return its weighted aux loss. token_shape: the
        routed input's shape without D (the sequence along self.seq_dim), for the sequence-level losses."""
        s = self.settings
        sigmoid = self.router_kind == "sigmoid"  # a bank ("none") is routed by softmax routers (UMoE)
        balance = routing.aux["balance"]
        if not sigmoid and s.aux_loss_scope == "sequence":
            balance = sequence_balance_loss(routing.probs_TE, routing.expert_ids_TK, token_shape, self.seq_dim)
        aux = routing.aux["z"] * s.z_loss_weight
        if not sigmoid:
            aux = aux + balance * s.aux_loss_weight
        record = CallRecord(aux=aux, balance=balance.detach(), z=routing.aux["z"].detach(),
                            entropy=router_entropy(routing.probs_TE), routed_E=p.routed_E.detach(),
                            kept_E=p.counts_E.detach(), router=router_name)
        if sigmoid and self.entropy_weight > 0:
            T = routing.probs_TE.shape[0]
            record.prob_sums_BE = sequence_prob_sums(routing.probs_TE, token_shape, self.seq_dim)
            record.tokens_per_seq = token_shape[self.seq_dim] if len(token_shape) > 1 else T
            record.entropy_weight = self.entropy_weight
            aux = aux + self.entropy_weight * sequence_entropy_loss(record.prob_sums_BE, record.tokens_per_seq)
        self.records.append(record)
        return aux


def set_dropless(model: nn.Module) -> list:
    """Make every MoE layer of `model` compute every routed assignment (no capacity, in training and evaluation);
    returns [(layer, previous settings)] for restore_settings. Used where a token's output must not depend on how
    many tokens share its forward pass: generation (wider.generation.inference_mode) and --dropless evaluation."""
    saved = [(m, m.settings) for m in model.modules() if isinstance(m, MoE)]
    for m, s in saved:
        m.settings = dataclasses.replace(s, drop_tokens=False)  # capacity_factor_for() -> None
    return saved


def restore_settings(saved: list) -> None:
    for m, s in saved:
        m.settings = s


def _route(fn, x_TD: torch.Tensor, args: tuple, num_experts: int, cap: Optional[int]):
    """Router (fn(x_TD, *args): a router's routing_call) and plan: some forty small element-wise, sort and
    scatter kernels, forward and backward."""
    routing = fn(x_TD, *args)
    return routing, dispatch.plan(routing.expert_ids_TK, routing.weights_TK, num_experts, cap)


# On CUDA the router and the plan are launch-bound (measured on an H100, benchmarks/moe_profile.py: wall time
# about 2 ms above the kernels' sum per layer fwd+bwd at 16k tokens): compiled, they fuse into a few kernels.
# Compiled once per (tokens, capacity) shape; False keeps eager mode everywhere.
COMPILE_ROUTING = True
_route_compiled = torch.compile(_route, dynamic=False)


def _split_experts_hook(module: GroupedExperts, state_dict: dict, prefix: str, local_metadata) -> None:
    """Stacked [L, ...] weights -> one key per local expert, the layout DeepSpeed's checkpointing parses."""
    for name, stacked in _STACKED.items():
        key = prefix + stacked
        if key in state_dict:
            w = state_dict.pop(key)
            for i in range(w.shape[0]):
                state_dict[f"{prefix}deepspeed_experts.{i}.{name}"] = w[i]


def _stack_experts_hook(module: GroupedExperts, state_dict: dict, prefix: str, local_metadata, strict,
                        missing_keys, unexpected_keys, error_msgs) -> None:
    """One key per local expert -> the stacked parameter (the inverse of _split_experts_hook)."""
    for name, stacked in _STACKED.items():
        keys = [f"{prefix}deepspeed_experts.{i}.{name}" for i in range(module.num_local)]
        if all(k in state_dict for k in keys):
            state_dict[prefix + stacked] = torch.stack([state_dict.pop(k) for k in keys])
    for key in list(state_dict):
        if key.startswith(prefix) and _EXPERT_KEY.match(key[len(prefix):]):
            error_msgs.append(f"{key}: expert {key[len(prefix):].split('.')[1]} is not one of this rank's "
                              f"{module.num_local} local experts (checkpoint from another ep_size?)")
