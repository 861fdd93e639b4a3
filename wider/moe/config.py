"""The typed configuration of one MoE layer: its shape, router, capacity, kernels and expert-parallel groups.

A model builder describes each MoE layer with one MoEConfig (wider.models build them from the run's ModelConfig
and a MoERuntime) and the layer (wider.moe.layer.MoE) takes nothing else. Everything the layer does at run time
follows from it: the capacity and aux-loss weights (`settings`, the ds_config "moe" block), which kernels run
(`kernels`), and which ranks hold which experts (`groups`). A caller that needs other behaviour for a while
(generation: dropless, eager routing) asks for a derived configuration (wider.moe.layer.reconfigured); nothing is a
mutable module setting.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from wider.moe.kernels import EXPERT_KERNELS, GATHER_KERNELS
from wider.moe.settings import MoESettings

ROUTERS = ("softmax", "sigmoid", "none")
SELECTIONS = ("token_choice", "expert_choice")
SCORES = ("softmax", "sigmoid")
ACTIVATIONS = ("gelu", "relu", "silu", "swiglu")  # silu: not gated (UMoE's experts); swiglu: gated


@dataclass(frozen=True)
class Kernels:
    """Which kernels an MoE layer runs (wider.moe.kernels)."""

    expert: str = "auto"  # 'auto' (torch's grouped GEMM where it runs, else the loop), 'grouped_mm' or 'loop'
    gather: str = "auto"  # 'auto' (fused Triton gathers on CUDA with Triton) or 'torch' (the reference ops)
    compile_routing: bool = True  # torch.compile the router and plan on CUDA (they are launch-bound there)

    def check(self) -> None:
        if self.expert not in EXPERT_KERNELS:
            raise ValueError(f"Kernels.expert {self.expert!r} is not one of {EXPERT_KERNELS}")
        if self.gather not in GATHER_KERNELS:
            raise ValueError(f"Kernels.gather {self.gather!r} is not one of {GATHER_KERNELS}")


@dataclass(frozen=True)
class ExpertGroups:
    """Where the experts live: `ep_size` ranks split them, this rank holds experts [ep_rank * L, (ep_rank + 1) * L)
    and exchanges tokens over `group` (a torch.distributed process group; None at ep_size 1). `name` is the
    group_name DeepSpeed tags expert parameters with (its ZeRO reduces them over the matching expert-data-parallel
    group). wider.parallel.expert_groups(ep_size) makes them for a training run; the default is one rank holding
    every expert, which needs no process group at all."""

    ep_size: int = 1
    ep_rank: int = 0
    group: Any = None
    name: str = "ep_size_1"

    def __deepcopy__(self, memo) -> "ExpertGroups":
        # A handle to process groups that exist once per process: copies of a layer spec (megatron deep-copies
        # specs) must share it, and a ProcessGroup cannot be copied anyway.
        return self


@dataclass(frozen=True)
class MoERuntime:
    """What a model builder needs to know of the run for its MoE layers: the resolved "moe" block, the kernels and
    the expert-parallel groups (wider.models.Architecture.build takes it)."""

    settings: MoESettings = field(default_factory=MoESettings)
    kernels: Kernels = field(default_factory=Kernels)
    groups: ExpertGroups = field(default_factory=ExpertGroups)


@dataclass(frozen=True)
class MoEConfig:
    """One MoE layer. Shape: hidden_size D, num_experts E, top_k experts per token, ffn_size F per expert,
    activation (gelu / relu / silu; swiglu gated). Router: 'softmax' (Switch / GLaM / WideNet: noise_std Gaussian
    noise on the logits in training, renormalize the top-k weights), 'sigmoid' (sigma-MoE / MoEUT: LayerNorm on the
    router input, raw sigmoid gates, the sequence entropy regulariser of weight entropy_weight, default
    settings.entropy_weight_ffn) or 'none' (an expert bank routed by its callers: UMoE). seq_dim: where the sequence
    runs in the input (megatron's [s, b, h]: 0), for the sequence-level losses. Init: N(0, init_std) for the first
    matrix and the router, N(0, output_std) for the second (default init_std). label / shared: how the statistics
    name the calls (a shared layer reports per call: block00, block01, ...); router_name: the CallRecord.router of
    forward()'s records (UMoE's FFN routing: 'ffn').

    The softmax router kind also chooses how tokens meet experts: selection 'token_choice' (each token its top-k
    experts) or 'expert_choice' (Zhou et al. 2022 as llm-random trains it: each expert takes the tokens it scores
    highest within a routing group, settings.ec_group, up to capacity_factor x group x k / E; ec_softmax_over
    'experts' or 'tokens'; a LayerNorm on the layer's output); score 'softmax' or 'sigmoid' (DeepSeek-V3's
    affinities; weights renormalised over the chosen experts when renormalize); selection_bias: DeepSeek-V3's
    auxiliary-loss-free balancing, a per-expert bias added to the scores for the top-k choice only, moved by
    settings.bias_update_speed after every optimizer step (wider.moe.stats.update_selection_biases)."""

    hidden_size: int
    num_experts: int
    top_k: int
    ffn_size: int
    activation: str = "gelu"
    router: str = "softmax"
    noise_std: float = 0.0
    renormalize: bool = False
    entropy_weight: Optional[float] = None
    seq_dim: int = 0
    init_std: float = 0.02
    output_std: Optional[float] = None
    label: str = "moe"
    shared: bool = False
    router_name: str = ""
    selection: str = "token_choice"
    score: str = "softmax"
    ec_softmax_over: str = "experts"
    selection_bias: bool = False
    settings: MoESettings = field(default_factory=MoESettings)
    kernels: Kernels = field(default_factory=Kernels)
    groups: ExpertGroups = field(default_factory=ExpertGroups)

    @classmethod
    def of(cls, runtime: MoERuntime, **fields) -> "MoEConfig":
        """A layer of the run described by `runtime`."""
        return cls(settings=runtime.settings, kernels=runtime.kernels, groups=runtime.groups, **fields)

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.groups.ep_size

    @property
    def regulariser_weight(self) -> float:
        """The sequence entropy regulariser's weight (sigmoid routers only; 0 = off)."""
        if self.router != "sigmoid":
            return 0.0
        return self.settings.entropy_weight_ffn if self.entropy_weight is None else float(self.entropy_weight)

    def check(self) -> None:
        """Raise ValueError naming the first bad field."""
        for name in ("hidden_size", "num_experts", "top_k", "ffn_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MoEConfig.{name} must be a positive integer, got {v!r}")
        if self.router not in ROUTERS:
            raise ValueError(f"router {self.router!r} is not a router kind; use 'softmax', 'sigmoid' or 'none' (an "
                             "expert bank routed by its callers: run_experts)")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"expert activation {self.activation!r} is not one of {ACTIVATIONS}")
        if self.router == "sigmoid" and (self.noise_std or self.renormalize):
            raise ValueError(f"router 'sigmoid' takes no noise and no renormalisation (got noise_std {self.noise_std}, "
                             f"renormalize {self.renormalize}); sigma-MoE uses the raw sigmoid gates: pass 0 / False")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection {self.selection!r} is not one of {SELECTIONS}")
        if self.score not in SCORES:
            raise ValueError(f"score {self.score!r} is not one of {SCORES}")
        if self.ec_softmax_over not in ("experts", "tokens"):
            raise ValueError(f"ec_softmax_over {self.ec_softmax_over!r} is not 'experts' or 'tokens'")
        plain = self.selection == "token_choice" and self.score == "softmax" and not self.selection_bias
        if self.router != "softmax" and not plain:
            raise ValueError(f"router {self.router!r} has its own routing: expert choice, sigmoid scores and the "
                             "selection bias apply to the softmax router kind only (Switch / GLaM / WideNet / "
                             "fine-grained MoE)")
        if self.selection == "expert_choice":
            bad = [f"{name} {v!r}" for name, v, off in (("noise_std", self.noise_std, 0.0),
                                                        ("renormalize", self.renormalize, False),
                                                        ("selection_bias", self.selection_bias, False),
                                                        ("score", self.score, "softmax")) if v != off]
            if bad:
                raise ValueError(f"expert choice routing takes no {', '.join(bad)}: these are token-choice settings "
                                 "(each expert takes its tokens by softmax score; weights are those scores). Use "
                                 "router_noise 'none', router_renormalize false, router_bias false, router_score "
                                 "'softmax'")
            if self.ec_softmax_over == "tokens" and self.settings.ec_eval_routing == "token_choice":
                raise ValueError("moe.ec_eval_routing 'token_choice' needs scores per token: with ec_softmax_over "
                                 "'tokens' use ec_eval_routing 'position'")
            if self.settings.capacity_factor_for(True) is None:
                raise ValueError("expert choice routing needs a capacity (each expert takes capacity_factor x group "
                                 "tokens x k / E of each group): set moe.capacity_factor (llm-random: 1.0) and "
                                 "moe.drop_tokens true")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k {self.top_k} exceeds num_experts {self.num_experts}")
        ep = self.groups.ep_size
        if self.num_experts % ep:
            raise ValueError(f"num_experts {self.num_experts} is not divisible by moe.ep_size {ep}")
        if ep != self.settings.ep_size:
            raise ValueError(f"the expert groups have ep_size {ep} but the \"moe\" block says {self.settings.ep_size}; "
                             "make them with wider.parallel.expert_groups(settings.ep_size)")
        if ep > 1 and self.groups.group is None:
            raise ValueError(f"ep_size {ep} needs its expert-parallel process group: pass "
                             f"groups=wider.parallel.expert_groups({ep}) (every rank calls it)")
        self.kernels.check()

    def dropless(self) -> "MoEConfig":
        """The same layer computing every routed assignment (no capacity), in training and evaluation."""
        return dataclasses.replace(self, settings=dataclasses.replace(self.settings, drop_tokens=False))

    def with_eval_routing(self, mode: str) -> "MoEConfig":
        """The same layer evaluated with moe.ec_eval_routing `mode` (expert choice; others unchanged)."""
        if self.selection != "expert_choice":
            return self
        if mode == "token_choice":
            return self.causal()
        return dataclasses.replace(self, settings=dataclasses.replace(self.settings, ec_eval_routing=mode))

    def causal(self) -> "MoEConfig":
        """The same layer routing each token by itself in evaluation (expert choice: token choice of the same
        scores; token choice layers are unchanged): what generation needs, one token at a time."""
        if self.selection == "expert_choice" and self.ec_softmax_over == "tokens":
            raise ValueError("this expert-choice layer scores by a softmax over each group's tokens, which has no "
                             "per-token counterpart: it cannot route one token at a time (generation). Train with "
                             "model.ec_softmax_over 'experts' (llm-random's granularity runs) to generate")
        return dataclasses.replace(self, settings=dataclasses.replace(self.settings, ec_eval_routing="token_choice"))

    def eager(self) -> "MoEConfig":
        """The same layer with the router and plan not compiled (shapes that change every call: generation)."""
        return dataclasses.replace(self, kernels=dataclasses.replace(self.kernels, compile_routing=False))
