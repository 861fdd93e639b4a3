"""Switch / GLaM baselines: megatron-core's GPT with wider's MoE in the MLP slot of every or every other block.

The layer spec is the dense GPT's (wider.models.gpt) with the MLP slot of the MoE blocks filled by
`MoEMLP`, an adapter that holds a `wider.moe.layer.MoE` (DeepSpeed-recognised, see its docstring). Switch
(Fedus et al.): top-1, MoE every other block; GLaM (Du et al.): top-2, every other block. The dense GPT is
the third baseline.
"""

from __future__ import annotations

import copy
import logging
from typing import Optional

import torch

from wider.config import ConfigError, ModelConfig, RunConfig
from wider.models.gpt import (ParamCount, norm_params, attention_params, embedding_params, ffn_params, gpt_layer_spec,
                              padded_vocab_size, transformer_config)
from wider.moe.config import MoEConfig, MoERuntime
from wider.moe.experts import scaled_output_std
from wider.moe.router import widenet_noise_std


class MoEMLP(torch.nn.Module):
    """megatron-core MLP slot holding a wider MoE: forward(hidden [s, b, h]) -> (output, None).

    Tokens are flattened in megatron's [s, b] order, so the capacity's "token order" is position-major.

    shared_spec / shared_ffn_size: an always-on shared expert beside the routed ones (DeepSeek-MoE / UMoE), a
    megatron-core MLP of that width built from the dense layer's MLP spec, added to the MoE output for every
    token. It is a dense module (replicated, reduced over data parallelism) and lives here rather than inside the
    MoE module, because DeepSpeed treats every key of an MoE module whose name contains "expert" as an expert
    shard. The MoE's statistics name their router moe_config.router_name (UMoE: "ffn", so that its FFN routing and its
    attention routing over the same experts show separately)."""

    def __init__(self, config, moe_config: MoEConfig, shared_spec=None, shared_ffn_size: int = 0,
                 shared_bias: bool = True):
        super().__init__()
        self.config = config
        from wider.moe.layer import MoE

        self.moe = MoE(moe_config)
        self.shared_ffn = dense_ffn(config, shared_spec, shared_ffn_size, shared_bias) if shared_ffn_size else None

    def forward(self, hidden_states: torch.Tensor, padding_mask=None, **_):
        out, _aux, _counts = self.moe(hidden_states)
        if self.shared_ffn is not None:
            shared, bias = self.shared_ffn(hidden_states)
            out = out + (shared if bias is None else shared + bias)
        return out, None


def dense_ffn(config, mlp_spec, width: int, bias: bool = True):
    """A megatron-core MLP of the given inner width from the dense layer's MLP spec (a shared expert). megatron's MLP
    sizes fc1 from its ffn_hidden_size argument but fc2 from config.ffn_hidden_size, so it gets a copy of the config
    with that width (a shallow copy: the TransformerConfig's derived fields stay as they are). bias False: no biases
    whatever the model's add_bias_linear (gpt_moe / widenet shared experts are experts: bias-free)."""
    from megatron.core.transformer.spec_utils import build_module

    narrow = copy.copy(config)
    narrow.ffn_hidden_size = width
    if not bias:
        narrow.add_bias_linear = False
    return build_module(mlp_spec, config=narrow, ffn_hidden_size=width)


def moe_config(m: ModelConfig, runtime: MoERuntime, label: str, shared: bool = False, **overrides) -> MoEConfig:
    """The wider.moe.layer.MoE of this model config (softmax router; overrides: other MoEConfig fields)."""
    noise = widenet_noise_std(m.num_experts) if m.router_noise == "inverse_experts" else 0.0
    return MoEConfig.of(runtime, **{**dict(
        hidden_size=m.hidden_size, num_experts=m.num_experts, top_k=m.moe_top_k, ffn_size=m.expert_ffn_size,
        activation=m.activation, noise_std=noise, renormalize=m.router_renormalize, init_std=m.init_method_std,
        output_std=scaled_output_std(m.init_method_std, m.num_layers), label=label, shared=shared,
        selection=m.moe_router, score=m.router_score, ec_softmax_over=m.ec_softmax_over,
        selection_bias=m.router_bias), **overrides})


def moe_layer_spec(m: ModelConfig, runtime: MoERuntime, label: str, shared: bool = False):
    """The dense layer spec with the MLP slot holding an MoE (and model.shared_experts always-on experts beside it,
    one dense FFN of their summed width built from the dense MLP spec)."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    spec = copy.deepcopy(gpt_layer_spec(m))
    params = {"moe_config": moe_config(m, runtime, label, shared)}
    if m.shared_experts:
        params.update(shared_spec=gpt_layer_spec(m).submodules.mlp, shared_ffn_size=m.shared_experts * m.expert_ffn_size,
                      shared_bias=False)
    spec.submodules.mlp = ModuleSpec(module=MoEMLP, params=params)
    return spec


def is_moe_block(m: ModelConfig, index: int) -> bool:
    """Block `index` (0-based) has an MoE FFN: every moe_layer_freq-th block, counting from 1."""
    return (index + 1) % m.moe_layer_freq == 0


def block_specs(m: ModelConfig, runtime: MoERuntime):
    """megatron TransformerBlockSubmodules: one layer spec per block, and the final norm."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    dense = gpt_layer_spec(m)
    specs = [moe_layer_spec(m, runtime, f"layer{i + 1:02d}") if is_moe_block(m, i) else dense
             for i in range(m.num_layers)]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=dense.submodules.input_layernorm)


class _DropUnknownMlpWarning(logging.Filter):
    """megatron's TransformerLayer logs "Unknown MLP type" for every MLP slot it does not know; MoEMLP takes
    no extra arguments, so for our models the message is noise (one line per block)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Unknown MLP type" not in record.getMessage()


_MLP_FILTER = _DropUnknownMlpWarning()


def quiet_unknown_mlp_type() -> None:
    """Install the filter above once (gpt_model does it for the language models; wider.models.blocks for the encoder
    stacks of the other tasks)."""
    layer_logger = logging.getLogger("megatron.core.transformer.transformer_layer")
    if _MLP_FILTER not in layer_logger.filters:
        layer_logger.addFilter(_MLP_FILTER)


def gpt_model(cfg: RunConfig, vocab_size: int, bf16: bool, layer_specs):
    from megatron.core.models.gpt import GPTModel

    layer_logger = logging.getLogger("megatron.core.transformer.transformer_layer")
    if _MLP_FILTER not in layer_logger.filters:
        layer_logger.addFilter(_MLP_FILTER)

    m, tp = cfg.model, cfg.train.tensor_parallel
    return GPTModel(
        config=transformer_config(m, tp, bf16),
        transformer_layer_spec=layer_specs,
        vocab_size=padded_vocab_size(vocab_size, m, tp),
        max_sequence_length=m.seq_length,
        share_embeddings_and_output_weights=m.tie_embeddings,
        position_embedding_type=m.position_embedding,
        rotary_base=m.rotary_base,
        parallel_output=True,
    )


def build_gpt_moe(cfg: RunConfig, vocab_size: int, bf16: bool = False, moe: Optional[MoERuntime] = None):
    """megatron-core GPT with MoE blocks (megatron's parallel_state must exist: wider.parallel.init_distributed;
    for ep_size > 1, moe.groups from wider.parallel.expert_groups)."""
    return gpt_model(cfg, vocab_size, bf16, block_specs(cfg.model, moe or MoERuntime()))


def expert_params(m: ModelConfig) -> int:
    """One expert FFN (no biases)."""
    f = m.expert_ffn_size
    return m.hidden_size * f * (2 if m.activation == "swiglu" else 1) + f * m.hidden_size


def moe_params(m: ModelConfig) -> tuple[int, int]:
    """(all parameters of one MoE layer, the parameters one token applies in it): router + routed experts (a token
    applies top-k of them; under expert choice, k on average) + the shared experts (dense, every token) + expert
    choice's output LayerNorm."""
    router = m.hidden_size * m.num_experts
    dense = router + m.shared_experts * expert_params(m)
    if m.moe_router == "expert_choice":
        dense += 2 * m.hidden_size
    return dense + m.num_experts * expert_params(m), dense + m.moe_top_k * expert_params(m)


def count_gpt_moe(cfg: RunConfig, vocab_size: int) -> ParamCount:
    m = cfg.model
    vocab = padded_vocab_size(vocab_size, m, cfg.train.tensor_parallel)
    emb = embedding_params(m, vocab)
    moe_total, moe_active = moe_params(m)
    base = 2 * norm_params(m) + attention_params(m)
    n_moe = sum(is_moe_block(m, i) for i in range(m.num_layers))
    n_dense = m.num_layers - n_moe
    total = emb + norm_params(m) + m.num_layers * base + n_dense * ffn_params(m) + n_moe * moe_total
    active = emb + norm_params(m) + m.num_layers * base + n_dense * ffn_params(m) + n_moe * moe_active
    return ParamCount(total=total, embedding=emb, active=active,
                      extra={"padded_vocab": vocab, "moe_layers": n_moe, "expert_params": expert_params(m),
                             "moe_layer_params": moe_total, **fine_grained_terms(m, n_moe)})


# Scaling Laws for Fine-Grained MoE (Krajewski et al. 2024), FLOP model: per token and block,
# 12 d^2 c_f for attention + the FFN's active part, and d * E * G c_r for routing (the router's logits over
# E * G experts, its softmax / top-k and the token permutation), with c_f = 6 and c_r = 14.
C_F, C_R = 6, 14


def fine_grained_terms(m: ModelConfig, n_moe_blocks: int) -> dict:
    """G = d_ff / d_expert and E = all experts' parameters / the dense FFN's, and the paper's FLOPs per token
    (which, unlike 6 * N_active, charges routing by the number of experts)."""
    G = m.ffn_size / m.expert_ffn_size
    # Shared experts are experts too (DeepSeekMoE): they count in the expansion rate, not in the router's width.
    E = (m.num_experts + m.shared_experts) * m.expert_ffn_size / m.ffn_size
    d = m.hidden_size
    dense_blocks = m.num_layers - n_moe_blocks
    routing = d * m.num_experts * C_R * n_moe_blocks  # = d E G c_r without shared experts
    paper = 12 * d * d * C_F * m.num_layers + routing
    return {"granularity": G, "expansion_rate": E, "paper_flops_per_token": paper,
            "routing_flops_per_token": routing, "routing_share": routing / paper,
            "dense_blocks": dense_blocks}


def validate_moe_common(cfg: RunConfig, world_size: Optional[int]) -> None:
    m, t = cfg.model, cfg.train

    def req(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    req(isinstance(m.num_experts, int) and m.num_experts >= 1,
        f"model.num_experts must be >= 1 for arch {m.arch!r}, got {m.num_experts!r}; for a dense model use "
        "--arch gpt")
    req(isinstance(m.moe_top_k, int) and 1 <= m.moe_top_k <= m.num_experts,
        f"model.moe_top_k {m.moe_top_k!r} must be in [1, num_experts={m.num_experts}]")
    req(m.moe_ffn_hidden_size is None or m.moe_ffn_hidden_size > 0,
        f"model.moe_ffn_hidden_size must be positive or None, got {m.moe_ffn_hidden_size!r}")
    req(m.router_noise in ("none", "inverse_experts"),
        f"model.router_noise {m.router_noise!r} is invalid; use 'none' or 'inverse_experts'")
    req(m.moe_router in ("token_choice", "expert_choice"),
        f"model.moe_router {m.moe_router!r} is invalid; use 'token_choice' or 'expert_choice'")
    req(m.router_score in ("softmax", "sigmoid"),
        f"model.router_score {m.router_score!r} is invalid; use 'softmax' or 'sigmoid'")
    req(m.ec_softmax_over in ("experts", "tokens"),
        f"model.ec_softmax_over {m.ec_softmax_over!r} is invalid; use 'experts' or 'tokens'")
    req(isinstance(m.router_bias, bool), f"model.router_bias must be true or false, got {m.router_bias!r}")
    req(isinstance(m.shared_experts, int) and not isinstance(m.shared_experts, bool) and m.shared_experts >= 0,
        f"model.shared_experts must be an integer >= 0, got {m.shared_experts!r}")
    if m.moe_router == "expert_choice":
        bad = [f"--{flag} {v}" for flag, v, off in (("router-noise", m.router_noise, "none"),
                                                    ("router-renormalize", m.router_renormalize, False),
                                                    ("router-bias", m.router_bias, False),
                                                    ("router-score", m.router_score, "softmax")) if v != off]
        req(not bad, f"model.moe_router 'expert_choice' does not take {', '.join(bad)}: these are token-choice "
                     "settings (each expert takes its tokens by softmax score, the weights are those scores, and the "
                     "experts are balanced by construction); drop them")
    elif m.ec_softmax_over != "experts":
        raise ConfigError(f"model.ec_softmax_over {m.ec_softmax_over!r} applies to expert choice only; add "
                          "--moe-router expert_choice or drop it")
    req(t.tensor_parallel == 1,
        f"train.tensor_parallel {t.tensor_parallel}: wider's expert layers are not tensor-parallel; scale MoE "
        "models with expert parallelism (moe.ep_size in the ds_config) and ZeRO instead")


def require_own_routing(m: ModelConfig, why: str) -> None:
    """Architectures whose papers define their own routers (MoEUT's sigma-MoE, UMoE's banks) refuse the gpt_moe /
    widenet routing switches rather than ignore them."""
    changed = [f"--{flag} {v}" for flag, v, off in (("moe-router", m.moe_router, "token_choice"),
                                                    ("router-score", m.router_score, "softmax"),
                                                    ("router-bias", m.router_bias, False)) if v != off]
    if changed:
        raise ConfigError(f"model.arch {m.arch!r} routes as its paper does ({why}); {', '.join(changed)} applies to "
                          "gpt_moe and widenet only: drop it")


def validate_gpt_moe(cfg: RunConfig, world_size: Optional[int]) -> None:
    from wider.models.gpt import validate_head_dim

    validate_moe_common(cfg, world_size)
    validate_head_dim(cfg.model)
    m = cfg.model
    if not (isinstance(m.moe_layer_freq, int) and 1 <= m.moe_layer_freq <= m.num_layers):
        raise ConfigError(f"model.moe_layer_freq {m.moe_layer_freq!r} must be in [1, num_layers={m.num_layers}]")
