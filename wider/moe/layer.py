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

import contextlib
import math
import re
from typing import Callable, Iterator, Optional

import torch
from deepspeed.moe.layer import MoE as _DeepSpeedMoE
from torch import nn

from wider.moe import dispatch
from wider.moe.config import MoEConfig
from wider.moe.experts import GroupedExperts, init_expert_weights
from wider.moe.records import CallRecord
from wider.moe.router import (SigmoidTopKRouter, SoftmaxTopKRouter, route_expert_choice, router_entropy,
                              sequence_balance_loss, sequence_entropy_loss, sequence_prob_sums)

_EXPERT_KEY = re.compile(r"^deepspeed_experts\.(\d+)\.(w1|w2)$")
# DeepSpeed's per-expert key names -> wider's stacked parameters (the checkpoint reader, wider.checkpoint.native,
# maps expert files with it too).
STACKED_EXPERT_PARAMS = {"w1": "w1_LDF", "w2": "w2_LFD"}


class _Core(nn.Module):
    """The `deepspeed_moe` child: keeps DeepSpeed's key layout (gate.wg.weight, experts.deepspeed_experts.*).
    output_norm: expert choice's LayerNorm on the layer's output (llm-random's layer_norm_in_expert_choice), a
    non-expert parameter (its key holds no "expert")."""

    def __init__(self, gate: Optional[nn.Module], experts: GroupedExperts, output_norm: Optional[nn.Module] = None):
        super().__init__()
        self.gate, self.experts = gate, experts
        if output_norm is not None:
            self.output_norm = output_norm


class MoE(_DeepSpeedMoE):
    """Top-k MoE FFN described by one MoEConfig (wider.moe.config): forward(hidden [..., D]) -> (output [..., D],
    weighted aux loss, routed counts [E]), the same return contract as deepspeed.moe.layer.MoE.

    Router kinds (config.router): "softmax" (Switch / GLaM / WideNet; see SoftmaxTopKRouter), "sigmoid" (sigma-MoE,
    MoEUT: see SigmoidTopKRouter; the router LayerNorms its own input while the experts read the raw hidden states)
    or "none" (an expert bank routed by its callers: route(x, gate=...) and run_experts).

    Aux losses: softmax routers: balance (weight settings.aux_loss_weight) and z-loss (settings.z_loss_weight)
    are summed into one weighted scalar per call. Sigmoid routers: no balance loss (aux_loss_weight does not
    apply; the balance value is still reported); z-loss as above; and the sequence entropy regulariser
    (config.regulariser_weight), pooled over every call of the layer by wider.moe.stats.take. Every call appends a
    CallRecord to `self.records`, which wider.moe.stats collects (a layer shared by several blocks reports once
    per call, in call order). The aux returned by forward counts the entropy regulariser of this call alone (equal
    to the pooled one for a layer called once per step).

    `config` may be replaced by a derived one for a while (reconfigured(): generation's dropless, eager routing);
    its shape, router kind and groups must stay the same, since the weights were built for them.
    """

    def __init__(self, config: MoEConfig):
        nn.Module.__init__(self)  # not DeepSpeed's __init__: it would build its own gate and dispatcher
        config.check()
        self.config = config
        groups = config.groups
        # Attributes DeepSpeed's engine and checkpoint code read from a MoE module.
        self.num_experts, self.ep_size = config.num_experts, groups.ep_size
        self.num_local_experts = config.num_local_experts
        self.expert_group_name = groups.name
        self.use_residual, self.enable_expert_tensor_parallelism = False, False
        # What wider.moe.stats reads of every routing module (SwitchHead has the same).
        self.label, self.shared = config.label, config.shared
        self.records: list[CallRecord] = []

        c = config
        if c.router == "sigmoid":
            gate = SigmoidTopKRouter(c.hidden_size, c.num_experts, c.top_k, c.init_std)
        elif c.router == "softmax":
            gate = SoftmaxTopKRouter(c.hidden_size, c.num_experts, c.top_k, c.noise_std, c.renormalize, c.init_std,
                                     c.score, c.selection_bias)
        else:  # "none": the callers bring their own routers (route(..., gate=...)) and call run_experts
            gate = None
        experts = GroupedExperts(self.num_local_experts, c.hidden_size, c.ffn_size, c.activation)
        # Draw every expert's weights on every rank (same RNG stream), keep this rank's slice.
        out_std = c.output_std if c.output_std is not None else c.init_std
        w1, w2 = init_expert_weights(c.num_experts, c.hidden_size, c.ffn_size, c.activation, c.init_std, out_std)
        experts.init_from_full(w1, w2, groups.ep_rank)
        for p in experts.parameters():  # as deepspeed.moe.experts.Experts tags them
            p.allreduce = False
            p.group_name = self.expert_group_name
        self.deepspeed_moe = _Core(gate, experts,
                                   nn.LayerNorm(c.hidden_size) if c.selection == "expert_choice" else None)
        # Aux-loss-free balancing: each step's routed load, summed by wider.moe.stats.take over the step's forward
        # passes in training, spent by update_selection_biases after the optimizer step.
        self.pending_load_E: Optional[torch.Tensor] = None
        experts.register_state_dict_post_hook(_split_experts_hook)
        experts.register_load_state_dict_pre_hook(_stack_experts_hook)
        self._exchange = dispatch.ExpertExchange(groups.group, groups.ep_size, self.num_local_experts)

    @property
    def ep_rank(self) -> int:
        """This rank's position in the expert-parallel group: it holds experts [ep_rank * L, (ep_rank + 1) * L)."""
        return self.config.groups.ep_rank

    # DeepSpeed's engine calls this after wrapping the model; DeepSpeed's own layer creates its groups here. Ours
    # came with the config (wider.parallel.expert_groups made them, and registered them where DeepSpeed's ZeRO
    # looks them up), so there is nothing to create: only a topology we do not build is refused.
    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        if use_data_before_expert_parallel_ and self.ep_size > 1:
            raise ValueError("use_data_before_expert_parallelism is not supported by wider's MoE (its expert groups "
                             "are consecutive ranks); remove it from the ds_config")

    def describe(self, device: torch.device, dtype: torch.dtype) -> str:
        """One line for the start-up banner: shape, capacity, loss weights, ep_size and the kernels that run."""
        from wider.moe.kernels import fused_gathers

        c, s = self.config, self.config.settings
        if c.router == "sigmoid":
            losses = (f"entropy ffn {s.entropy_weight_ffn} attention {s.entropy_weight_attention} z "
                      f"{s.z_loss_weight}")
        elif c.selection == "expert_choice":
            losses = f"no balance loss (balanced by construction) z {s.z_loss_weight}"
        else:
            losses = f"aux {s.aux_loss_weight} z {s.z_loss_weight}"
        if c.selection_bias:
            losses += f" | aux-loss-free bias, speed {s.bias_update_speed}"
        kernel = self.deepspeed_moe.experts.kernel_name(device, dtype, c.kernels.expert)
        if c.selection == "expert_choice":
            how = (f"expert choice (softmax over {c.ec_softmax_over}, groups {s.ec_group}, capacity factor "
                   f"{s.capacity_factor}, output LayerNorm; eval: {routing_description(c)})")
        else:
            how = (f"top-{c.top_k}, {c.router} router{' (sigmoid scores)' if c.score == 'sigmoid' else ''} | "
                   f"capacity factor {s.capacity_factor_for(True)} (eval {s.capacity_factor_for(False)}, min "
                   f"{s.min_capacity})")
        return (f"moe: {c.num_experts} experts x {c.ffn_size} wide, {how} | "
                f"{losses} | ep_size {self.ep_size} | expert kernel {kernel}"
                f"{'' if kernel == 'grouped_mm' else ' (reference loop: grouped GEMM unavailable here)'} | gathers "
                f"{'triton' if fused_gathers(c.kernels.gather, device) else 'torch'}")

    def forward(self, hidden_states: torch.Tensor, used_token: Optional[torch.Tensor] = None):
        if used_token is not None:
            raise ValueError("used_token masking is not supported by wider's MoE; pass hidden states only")
        if self.deepspeed_moe.gate is None:
            raise RuntimeError(f"MoE {self.label!r} was built with router 'none' (an expert bank): route with "
                               "route(x, gate=...) and compute with run_experts(...)")
        shape = hidden_states.shape
        x_TD = hidden_states.reshape(-1, self.config.hidden_size)
        group = self.expert_choice_group(tuple(shape[:-1]))
        if group is None:
            routing, p = self.route(x_TD)
        else:  # eager: the token-major view's width is known only after the choice (one host synchronisation)
            c = self.config
            gate = self.deepspeed_moe.gate
            routing = route_expert_choice(x_TD, gate.wg.weight, c.top_k, c.settings.capacity_factor, group,
                                          c.ec_softmax_over)
            p = dispatch.plan(routing.expert_ids_TK, routing.weights_TK, self.num_experts, None, c.kernels.gather,
                              chosen_TK=routing.live_TK)
        out_TD = self.run_experts(p, x_TD=x_TD)
        aux = self.record(routing, p, tuple(shape[:-1]), self.config.router_name)
        if self.config.selection == "expert_choice":
            out_TD = self.deepspeed_moe.output_norm(out_TD)
        return out_TD.reshape(shape), aux, p.routed_E

    def expert_choice_group(self, token_shape: tuple) -> Optional[int]:
        """The routing group (tokens) of an expert-choice call on tokens laid out as token_shape (the input's shape
        without D); None when this call routes by token choice (token-choice layers; expert choice evaluated with
        ec_eval_routing 'token_choice')."""
        c, s = self.config, self.config.settings
        if c.selection != "expert_choice":
            return None
        mode = s.ec_group if (self.training or s.ec_eval_routing == "train") else s.ec_eval_routing
        T = math.prod(token_shape)
        if mode == "token_choice":
            return None
        if mode == "batch":
            return T
        if mode == "position":
            if len(token_shape) != 2 or c.seq_dim != 0:
                raise ValueError(f"MoE {self.label!r}: expert choice with per-position groups needs tokens laid out "
                                 f"[s, b] (megatron's order, seq_dim 0), got shape {token_shape} with seq_dim "
                                 f"{c.seq_dim}; use moe.ec_group 'batch' or a token count")
            return token_shape[1]
        return int(mode)

    def route(self, x_TD: torch.Tensor, gate: Optional[nn.Module] = None) -> tuple:
        """(Routing, Plan) of the tokens x_TD by `gate` (default this layer's router; UMoE's attention brings its
        own router over the same experts), with this layer's capacity for that router's top-k."""
        gate = self.deepspeed_moe.gate if gate is None else gate
        c = self.config
        cap = dispatch.capacity(x_TD.shape[0], gate.top_k, self.num_experts,
                                c.settings.capacity_factor_for(self.training), c.settings.min_capacity)
        if c.selection == "expert_choice":
            cap = None  # token choice of an expert-choice model (causal evaluation): every choice computed
        route = _route_compiled if (c.kernels.compile_routing and x_TD.is_cuda) else _route
        fn, args = gate.routing_call(self.training)
        return route(fn, x_TD, args, self.num_experts, cap, c.kernels.gather)

    def run_experts(self, p: dispatch.Plan, x_TD: Optional[torch.Tensor] = None,
                    x_XD: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The experts on the plan's kept assignments, weighted and summed per token: out_TD. Inputs: x_TD (each
        token's hidden state, fed to all its chosen experts) or x_XD [T * K, D] (one input per assignment, in
        token-major order t * K + k: UMoE's pre-mixing attention)."""
        if (x_TD is None) == (x_XD is None):
            raise ValueError("run_experts takes exactly one of x_TD (per-token inputs) and x_XD (per-assignment inputs)")

        ex = self._exchange
        experts = self.deepspeed_moe.experts
        kernel = self.config.kernels.expert
        if ex.ep_size == 1:
            # Fixed shapes, no host synchronisation: all T*K rows are gathered; the grouped GEMMs compute only
            # the kept ones (their offsets end at n_kept) and the combine reads only those. The gather and the
            # combine are fused into the GEMMs' autograd nodes: no R x D tensor is kept for the backward.
            return experts.forward_plan(x_TD, p, x_XD=x_XD, kernel=kernel)
        # all_to_all_single takes its split sizes as host integers: one synchronisation is unavoidable.
        n_kept = int(p.counts_E.sum())
        rows = dispatch.gather_tokens(x_TD, p, n_kept) if x_XD is None else dispatch.gather_assignments(x_XD, p, n_kept)
        x_RD, counts_L, state = ex.send(rows, p.counts_E)
        return dispatch.combine(ex.back(experts(x_RD, counts_L, kernel), state), p)

    def record(self, routing, p: dispatch.Plan, token_shape: tuple, router_name: str = "") -> torch.Tensor:
        """Append this call's CallRecord (under `router_name`) and return its weighted aux loss. token_shape: the
        routed input's shape without D (the sequence along config.seq_dim), for the sequence-level losses."""
        c, s = self.config, self.config.settings
        sigmoid = c.router == "sigmoid"  # a bank ("none") is routed by softmax routers (UMoE)
        # Expert choice is balanced by construction: no balance loss, whichever way this call routed.
        balanced = sigmoid or c.selection == "expert_choice"
        balance = routing.aux["balance"]
        if not balanced and s.aux_loss_scope == "sequence":
            balance = sequence_balance_loss(routing.probs_TE, routing.expert_ids_TK, token_shape, c.seq_dim)
        aux = routing.aux["z"] * s.z_loss_weight
        if not balanced:
            aux = aux + balance * s.aux_loss_weight
        # Experts per token (0 .. E): expert choice gives tokens any number; token choice k minus the drops.
        per_token_T = p.live_TK.sum(1)
        hist = torch.zeros(self.num_experts + 1, dtype=torch.long, device=per_token_T.device).scatter_add_(
            0, per_token_T, torch.ones_like(per_token_T))
        record = CallRecord(aux=aux, balance=balance.detach(), z=routing.aux["z"].detach(),
                            entropy=router_entropy(routing.probs_TE), routed_E=p.routed_E.detach(),
                            kept_E=p.counts_E.detach(), router=router_name, experts_per_token=hist)
        weight = c.regulariser_weight
        if sigmoid and weight > 0:
            T = routing.probs_TE.shape[0]
            record.prob_sums_BE = sequence_prob_sums(routing.probs_TE, token_shape, c.seq_dim)
            record.tokens_per_seq = token_shape[c.seq_dim] if len(token_shape) > 1 else T
            record.entropy_weight = weight
            aux = aux + weight * sequence_entropy_loss(record.prob_sums_BE, record.tokens_per_seq)
        self.records.append(record)
        return aux


def routing_description(c: MoEConfig, training: bool = False) -> str:
    """How a layer of this configuration routes in evaluation (training: in training), in words: what the
    evaluation recipe prints beside a perplexity."""
    if c.selection != "expert_choice":
        return "token choice"
    mode = c.settings.ec_group if (training or c.settings.ec_eval_routing == "train") else c.settings.ec_eval_routing
    return {"token_choice": "token choice of the expert-choice scores (no other token)",
            "position": "expert choice, per-position groups (no future token)",
            "batch": "expert choice, groups of the whole micro-batch (sees future tokens)"}.get(
        mode, f"expert choice, groups of {mode} tokens (sees future tokens)")


def model_routing(model: nn.Module) -> str:
    """The evaluation routing of a model's MoE layers ('token choice' for a model without expert choice; '' for a
    dense model): one phrase when every layer agrees."""
    kinds = sorted({routing_description(m.config) for m in moe_layers(model)})
    return "; ".join(kinds)


def moe_layers(model: nn.Module) -> list:
    """Every MoE layer of the model, once each (modules() lists a shared layer once)."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def configure(model: nn.Module, derive: Callable[[MoEConfig], MoEConfig]) -> list:
    """Give every MoE layer of `model` the configuration derive(its config) (e.g. MoEConfig.dropless: used where a
    token's output must not depend on how many tokens share its forward pass: --dropless evaluation); returns
    [(layer, previous config)] for restore()."""
    saved = [(m, m.config) for m in moe_layers(model)]
    for m, c in saved:
        m.config = derive(c)
    return saved


def restore(saved: list) -> None:
    for m, c in saved:
        m.config = c


@contextlib.contextmanager
def reconfigured(model: nn.Module, derive: Callable[[MoEConfig], MoEConfig]) -> Iterator[None]:
    """configure() for the duration of a `with` block (generation asks for MoEConfig.dropless and .eager)."""
    saved = configure(model, derive)
    try:
        yield
    finally:
        restore(saved)


def _route(fn, x_TD: torch.Tensor, args: tuple, num_experts: int, cap: Optional[int], gather: str):
    """Router (fn(x_TD, *args): a router's routing_call) and plan: some forty small element-wise, sort and
    scatter kernels, forward and backward."""
    routing = fn(x_TD, *args)
    return routing, dispatch.plan(routing.expert_ids_TK, routing.weights_TK, num_experts, cap, gather)


# On CUDA the router and the plan are launch-bound (measured on an H100, benchmarks/moe_profile.py: wall time
# about 2 ms above the kernels' sum per layer fwd+bwd at 16k tokens): compiled, they fuse into a few kernels.
# Compiled once per (tokens, capacity) shape; Kernels.compile_routing False keeps eager mode.
_route_compiled = torch.compile(_route, dynamic=False)


def _split_experts_hook(module: GroupedExperts, state_dict: dict, prefix: str, local_metadata) -> None:
    """Stacked [L, ...] weights -> one key per local expert, the layout DeepSpeed's checkpointing parses."""
    for name, stacked in STACKED_EXPERT_PARAMS.items():
        key = prefix + stacked
        if key in state_dict:
            w = state_dict.pop(key)
            for i in range(w.shape[0]):
                state_dict[f"{prefix}deepspeed_experts.{i}.{name}"] = w[i]


def _stack_experts_hook(module: GroupedExperts, state_dict: dict, prefix: str, local_metadata, strict,
                        missing_keys, unexpected_keys, error_msgs) -> None:
    """One key per local expert -> the stacked parameter (the inverse of _split_experts_hook)."""
    for name, stacked in STACKED_EXPERT_PARAMS.items():
        keys = [f"{prefix}deepspeed_experts.{i}.{name}" for i in range(module.num_local)]
        if all(k in state_dict for k in keys):
            state_dict[prefix + stacked] = torch.stack([state_dict.pop(k) for k in keys])
    for key in list(state_dict):
        if key.startswith(prefix) and _EXPERT_KEY.match(key[len(prefix):]):
            error_msgs.append(f"{key}: expert {key[len(prefix):].split('.')[1]} is not one of this rank's "
                              f"{module.num_local} local experts (checkpoint from another ep_size?)")
