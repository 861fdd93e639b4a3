"""UMoE (Yang et al. 2025, "UMoE: Unifying Attention and FFN with Shared Experts"; DESIGN 5.7).

Shape suffixes: S sequence, B batch, T = S * B tokens (megatron's [s, b] order), D model width, C query / key width
(d_qk, model.head_dim), E experts, K attention choices per token (model.attention_top_k), H = K + 1 mixing heads
(the shared expert's first, when there is one), R rank of the expert queries (model.query_rank), X = T * K
assignments in token-major order (t * K + k), A assignments grouped by expert.

A layer is megatron-core's TransformerLayer (pre-norm RMSNorm, residual adds) with its two slots filled:

    z = rms1(x)
    x = x + PreMixingAttention(z)     the attention MoE (below)
    x = x + FFN-MoE(rms2(x))          wider.models.gpt_moe.MoEMLP: its own softmax router, the SAME experts
                                      (umoe_mode 'shared'), plus its own shared expert

Pre-mixing attention (the paper's reformulation: attention = token mixing, then a token-wise FFN expert):
    k     = z W_k                                    one shared key head [S, B, C]
    q_i   = z W_res + B_i RMSNorm(A_i z)             expert i's own low-rank query (A_i: D x R, B_i: R x C; one
                                                     RMSNorm weight of size R shared by all experts, as the official
                                                     code has it)
    x~_i  = softmax(q_i k^T / sqrt(C)) Z             causal; RoPE on q and k; the VALUES are the normed hidden states
                                                     Z themselves (no V projection)
    out   = sum_{i in topK} g_i FFN_i(x~_i) + FFN_shared(x~_shared)
with g the softmax router's probabilities of the normed token (top-K, not renormalised) and a shared expert whose
mixed token comes from its own query z W_shared. The FFN sublayer calls the same FFN_i on rms2(x) directly (no
mixing) with its own router and top-k, and its own shared expert.

Where the pieces live, and why:
- The experts are a wider.moe.layer.MoE (DeepSpeed-recognised: expert parallelism over DeepSpeed's EP groups,
  ZeRO 1/2 expert groups, one checkpoint file per expert). In 'shared' mode the FFN slot's MoE owns the bank and the
  attention holds a SharedRef to it (a plain reference, not a registered submodule: the experts are counted,
  reduced and saved once). In 'separate' / 'attention' modes the attention owns its own bank, built with router
  'none' (its router lives in the attention). Attention routing is recorded on the bank as router "attention", the
  FFN's as "ffn": TensorBoard shows layer03.attention and layer03.ffn separately.
- The attention's per-assignment inputs (x~_i) reach the experts through MoE.run_experts(x_XD=...), the common
  dispatch (capacity, sort by expert, all-to-all under expert parallelism, grouped GEMM, combine).
- The expert queries (A_i, B_i: E * R * (D + C) parameters, about 5% of a layer at umoe_small's shape) are ordinary
  dense parameters, replicated on every rank at any ep_size: a query must meet every key of its sequence, which lives
  on the token's own rank, so sharding them would add a second all-to-all round trip for a few percent of the
  weights. They run as a grouped GEMM over a dropless plan of the attention's choices (the expert capacity, if any,
  applies to the experts only: a dropped choice's query is computed and then weighted 0).
- W_res, W_k and W_shared are one fused megatron-core ColumnParallelLinear; RoPE is megatron-core's
  (apply_rotary_pos_emb on the frequencies GPTModel computes for kv_channels = C; rotate-half pairing, where the
  official code pairs interleaved channels: an equivalent parametrisation, the pairing being a fixed permutation of
  W_q's and W_k's rows); the mixing is torch SDPA; embeddings, norms, output layer, dense FFN and shared experts are
  megatron-core's.

Sequence-level balance loss (moe.aux_loss_scope 'sequence', moe.aux_loss_weight 0.001) on each router, every call.

Parameter count (closed form, count_umoe; V padded vocabulary, untied embeddings, no biases, RMSNorm):
    premix attention = D (2C + C [shared]) + D E (router) + E R (D + C) + R + 2 D f n_shared
    FFN MoE          = D E (router) + 2 D f n_shared        (+ E * 2 D f, the bank, when the FFN owns it)
    bank             = E * 2 D f                            (once per layer in 'shared' mode, twice in 'separate')
    layer            = 2 D (norms) + attention + FFN (+ banks);   total = 2 V D + L * layer + D (final norm)
Active: the attention's K experts' queries and experts plus the FFN's top-k experts (of the same bank), routers,
shared experts and dense parts. umoe_small: 540.5M (V 32000), umoe_1b: 3.68B total, 1.06B active; the official
configurations (model_libs/configs in github.com/ysngki/UMoE) give the same module shapes; see README for the table.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from wider.config import ConfigError, ModelConfig, RunConfig
from wider.models.gpt import ParamCount, norm_params, attention_params, embedding_params, ffn_params, gpt_layer_spec, padded_vocab_size
from wider.models.gpt_moe import MoEMLP, dense_ffn, expert_params, gpt_model, moe_config, validate_moe_common
from wider.models.widenet import SharedRef
from wider.moe import dispatch
from wider.moe.config import MoEConfig, MoERuntime
from wider.moe.kernels import grouped_mm
from wider.moe.router import SoftmaxTopKRouter

MODES = ("shared", "separate", "attention", "ffn")


def qk_dim(m: ModelConfig) -> int:
    return m.head_dim or m.hidden_size // m.num_attention_heads


def has_premix(m: ModelConfig) -> bool:
    return m.umoe_mode in ("shared", "separate", "attention")


def has_ffn_moe(m: ModelConfig) -> bool:
    return m.umoe_mode in ("shared", "separate", "ffn")


class PreMixingAttention(nn.Module):
    """megatron-core's self-attention slot: forward(z [S, B, D], attention_mask, rotary_pos_emb=...) -> (out, None).

    bank: the experts (a wider.moe.layer.MoE built from bank_config); bank_config None leaves it to be pointed at the
    FFN's MoE after the model is built (umoe_mode 'shared')."""

    def __init__(self, config, layer_number: int, experts: int, top_k: int, query_rank: int, shared_ffn_size: int,
                 shared_spec, bank_config: Optional[MoEConfig], init_std: float, **_unused):
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear

        D, C, E, R = config.hidden_size, config.kv_channels, experts, query_rank
        self.config, self.layer_number = config, layer_number
        self.hidden_size, self.qk_dim, self.num_experts, self.top_k, self.rank = D, C, E, top_k, R
        self.heads = top_k + (1 if shared_ffn_size else 0)
        self.dropout_p = float(config.attention_dropout)
        # [W_res | W_k | W_shared]: one GEMM for the three dense projections of z.
        self.linear_qk = ColumnParallelLinear(D, (3 if shared_ffn_size else 2) * C, config=config,
                                              init_method=config.init_method, bias=False, gather_output=True,
                                              skip_bias_add=True)
        self.router = SoftmaxTopKRouter(D, E, top_k, 0.0, False, init_std)
        self.q_down_EDR = nn.Parameter(torch.empty(E, D, R).normal_(0.0, init_std))
        self.q_norm_R = nn.Parameter(torch.ones(R))
        self.q_up_ERC = nn.Parameter(torch.empty(E, R, C).normal_(0.0, init_std))
        self.shared_ffn = dense_ffn(config, shared_spec, shared_ffn_size) if shared_ffn_size else None
        self.bank = None
        if bank_config is not None:
            from wider.moe.layer import MoE

            self.bank = MoE(bank_config)

    def _queries(self, z_TD: torch.Tensor, routing) -> torch.Tensor:
        """B_i RMSNorm(A_i z) for every assignment: [T * K, C] in token-major order (grouped GEMMs over a dropless
        plan of the choices, then put back in token order)."""
        kernels = self.bank.config.kernels
        p = dispatch.plan(routing.expert_ids_TK, routing.weights_TK, self.num_experts, None, kernels.gather)
        h_AR = dispatch.gather_mm(z_TD, p, self.q_down_EDR, kernels.expert)  # keeps z_TD, not its K gathered copies
        h_AR = F.rms_norm(h_AR, (self.rank,), self.q_norm_R.to(h_AR.dtype), eps=self.config.layernorm_epsilon)
        return dispatch.scatter_to_assignments(grouped_mm(h_AR, self.q_up_ERC, p.counts_E, kernels.expert), p)

    # Generation (wider.generation's contract, way 1): under megatron's StaticInferenceContext this module keeps
    # its own cache of the rotated keys and of the values (the normed tokens z) per layer.
    handles_inference_context = True

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                rotary_pos_emb=None, packed_seq_params=None, attention_bias=None, inference_context=None, **_):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("PreMixingAttention supports neither packed sequences nor attention bias")
        from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

        from wider.models.attention import attend, static_context_extend

        z_SBD = hidden_states
        S, B, D = z_SBD.shape
        T, K, C, H = S * B, self.top_k, self.qk_dim, self.heads
        z_TD = z_SBD.reshape(T, D)
        bank = self.bank
        routing, p = bank.route(z_TD, gate=self.router)

        qk_SBX, _ = self.linear_qk(z_SBD)
        dense = qk_SBX.split(C, dim=-1)  # W_res z, W_k z[, W_shared z]
        q_SBKC = self._queries(z_TD, routing).view(S, B, K, C) + dense[0].unsqueeze(2)
        q_SBHC = torch.cat([dense[2].unsqueeze(2), q_SBKC], dim=2) if self.shared_ffn is not None else q_SBKC
        k_SB1C = dense[1].unsqueeze(2)
        offset = 0 if inference_context is None else inference_context.sequence_len_offset
        if rotary_pos_emb is not None:
            freqs = rotary_pos_emb[0] if isinstance(rotary_pos_emb, tuple) else rotary_pos_emb
            freqs = freqs[offset:offset + S]  # under an inference context the table covers every position
            q_SBHC = apply_rotary_pos_emb(q_SBHC, freqs, config=self.config)
            k_SB1C = apply_rotary_pos_emb(k_SB1C, freqs, config=self.config)
        values_SBD = z_SBD
        if inference_context is not None:  # earlier positions' rotated keys and values come from the cache
            k_SB1C, values_SBD = static_context_extend(inference_context, self.layer_number, k_SB1C, z_SBD)
        L = k_SB1C.shape[0]

        # Every head mixes the same values (the normed tokens) with its own query against the one key head.
        q = q_SBHC.permute(1, 2, 0, 3)
        k = k_SB1C.permute(1, 2, 0, 3).expand(B, H, L, C)
        v = values_SBD.permute(1, 0, 2).unsqueeze(1).expand(B, H, L, D)
        mixed_BHSD = attend(q, k, v, 1.0 / math.sqrt(C), hide=attention_mask,
                            dropout_p=self.dropout_p if self.training else 0.0)
        mixed_SBHD = mixed_BHSD.permute(2, 0, 1, 3)

        routed_XD = mixed_SBHD[:, :, H - K:].reshape(T * K, D)  # token-major: (s, b) then choice k
        out_TD = bank.run_experts(p, x_XD=routed_XD)
        bank.record(routing, p, (S, B), "attention")  # the aux loss is collected by wider.moe.stats.take
        out_SBD = out_TD.view(S, B, D)
        if self.shared_ffn is not None:
            shared, bias = self.shared_ffn(mixed_SBHD[:, :, 0].contiguous())
            out_SBD = out_SBD + (shared if bias is None else shared + bias)
        return out_SBD, None


def umoe_block_specs(m: ModelConfig, runtime: MoERuntime):
    """One megatron layer spec per layer (each layer's MoE is labelled layer01, layer02, ...) and the final norm."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    dense = gpt_layer_spec(m)
    shared_width = m.shared_experts * m.expert_ffn_size
    specs = []
    for i in range(m.num_layers):
        label = f"layer{i + 1:02d}"
        spec = copy.deepcopy(dense)
        if has_premix(m):
            spec.submodules.self_attention = ModuleSpec(module=PreMixingAttention, params=dict(
                experts=m.num_experts, top_k=m.attention_top_k, query_rank=m.query_rank, shared_ffn_size=shared_width,
                shared_spec=dense.submodules.mlp, init_std=m.init_method_std,
                # An expert bank routed by its callers (router 'none') when the attention owns one.
                bank_config=None if m.umoe_mode == "shared" else
                moe_config(m, runtime, label, router="none", noise_std=0.0, renormalize=False)))
        if has_ffn_moe(m):
            spec.submodules.mlp = ModuleSpec(module=MoEMLP, params=dict(
                moe_config=moe_config(m, runtime, label, router_name="ffn"), shared_spec=dense.submodules.mlp,
                shared_ffn_size=shared_width))
        specs.append(spec)
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=dense.submodules.input_layernorm)


def build_umoe(cfg: RunConfig, vocab_size: int, bf16: bool = False, moe: Optional[MoERuntime] = None):
    """megatron-core GPTModel with UMoE layers; in 'shared' mode each attention is pointed at its layer's FFN experts."""
    m = cfg.model
    model = gpt_model(cfg, vocab_size, bf16, umoe_block_specs(m, moe or MoERuntime()))
    if m.umoe_mode == "shared":
        for layer in model.decoder.layers:
            layer.self_attention.bank = SharedRef(layer.mlp.moe)
    return model


def layer_params(m: ModelConfig) -> tuple[int, int]:
    """(parameters of one layer, those one token applies in it), the docstring's formula."""
    D, C, E, R, f = m.hidden_size, qk_dim(m), m.num_experts, m.query_rank, m.expert_ffn_size
    expert = expert_params(m)
    shared = ffn_params(m, m.shared_experts * f) if m.shared_experts else 0
    total = active = 2 * norm_params(m)
    if has_premix(m):
        dense = D * (3 if m.shared_experts else 2) * C + D * E + R + shared  # projections, router, norm, shared
        total += dense + E * R * (D + C)
        active += dense + m.attention_top_k * (R * (D + C) + expert)
    else:
        total += attention_params(m)
        active += attention_params(m)
    if has_ffn_moe(m):
        total += D * E + shared
        active += D * E + shared + m.moe_top_k * expert
    else:
        total += ffn_params(m)
        active += ffn_params(m)
    banks = {"shared": 1, "separate": 2, "attention": 1, "ffn": 1}[m.umoe_mode]
    return total + banks * E * expert, active


def count_umoe(cfg: RunConfig, vocab_size: int) -> ParamCount:
    m = cfg.model
    vocab = padded_vocab_size(vocab_size, m, cfg.train.tensor_parallel)
    emb = embedding_params(m, vocab)
    per_layer, per_layer_active = layer_params(m)
    total = emb + m.num_layers * per_layer + norm_params(m)
    active = emb + m.num_layers * per_layer_active + norm_params(m)
    extra = {"padded_vocab": vocab, "layer_params": per_layer, "qk_dim": qk_dim(m),
             "expert_banks_per_layer": {"shared": 1, "separate": 2, "attention": 1, "ffn": 1}[m.umoe_mode],
             "expert_params": expert_params(m)}
    if has_premix(m):
        # Score and mixing products of the H mixing heads: each query meets S keys (C wide) and mixes S values
        # (D wide, the hidden states): 6 * layers * S * H * (C + D) training FLOPs per token (fwd + bwd).
        heads = m.attention_top_k + (1 if m.shared_experts else 0)
        extra["attention_train_flops_per_token"] = 6.0 * m.num_layers * m.seq_length * heads * (qk_dim(m) + m.hidden_size)
    return ParamCount(total=total, embedding=emb, active=active, extra=extra)


def validate_umoe(cfg: RunConfig, world_size: Optional[int]) -> None:
    validate_moe_common(cfg, world_size)
    m = cfg.model

    def req(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    req(m.umoe_mode in MODES, f"model.umoe_mode {m.umoe_mode!r} is invalid; use one of {', '.join(MODES)}")
    req(m.activation != "swiglu", "model.activation 'swiglu': UMoE's experts are two-matrix FFNs; use 'silu' (the "
                                  "paper's), 'gelu' or 'relu'")
    from wider.models.gpt_moe import require_own_routing

    require_own_routing(m, "token-choice softmax routers over one expert bank, with a sequence-level balance loss")
    if has_premix(m):
        req(isinstance(m.attention_top_k, int) and 1 <= m.attention_top_k <= m.num_experts,
            f"model.attention_top_k {m.attention_top_k!r} must be in [1, num_experts={m.num_experts}] (experts each "
            "token's pre-mixing attention uses; UMoE: 3)")
        req(isinstance(m.query_rank, int) and m.query_rank >= 1,
            f"model.query_rank must be a positive integer (UMoE: 16 or 36), got {m.query_rank!r}")
        req(m.head_dim is None or (isinstance(m.head_dim, int) and m.head_dim > 0),
            f"model.head_dim (d_qk) must be a positive integer or None, got {m.head_dim!r}")
        from wider.models.gpt import check_rope_head

        check_rope_head(m)  # RoPE on every channel of the d_qk-wide queries and key
    else:
        from wider.models.gpt import validate_head_dim

        validate_head_dim(m)  # 'ffn' mode: megatron's own attention
