"""MoEUT (Csordas et al. 2024, "MoEUT: Mixture-of-Experts Universal Transformers"; DESIGN 5.6).

Shape suffixes: B sequences, S sequence length, D model width, V vocabulary.

G distinct layers (model.layer_group_size) are applied A, B, A, B, ... for num_layers / G repeats: `layers`
holds the G modules once, and `schedule` lists which one runs at each depth. Each layer, peri-LayerNorm:

    z = ln1(x)
    x = x + SwitchHead(x, z)     Q, K and both expert choices read z; V reads the raw x (wider.models.switchhead)
    x = x + sigma-MoE(x)         the router reads LN(x) (that LayerNorm, "ln2", lives in the router: it feeds
                                 nothing else); the experts read the raw x (wider.moe.layer.MoE, router "sigmoid")

No norm on the residual path; a final LayerNorm before the output layer; input and output embeddings untied.

Init (DESIGN 5.6), scale = sqrt(2 / num_layers): W1, Q, K, V and both kinds of router N(0, scale / sqrt(D)), the
routers' rows rescaled to equal norms; W2 N(0, scale / sqrt(num_experts * expert_size)); O N(0, scale /
sqrt(heads * d_head)). DESIGN 5.6 does not fix the embeddings: the input embedding and the output layer are
N(0, 1 / sqrt(D)) here (unit-variance logits and embedding rows of norm about 1).

Parameter count (closed form, count_moeut; vocabulary V padded as megatron does, untied embeddings):

    per layer   = 2 D                          ln1
                + 2 D H C + 2 D H E_a          Q, K; the V and O routers (H heads, d_head C, E_a experts per head)
                + 2 H E_a D C                  V and O experts
                + 2 D + D E + 2 E D f          router LayerNorm, router, E experts of width f (no biases)
    total       = 2 V D + G * per layer + 2 D  (embedding, output layer, final norm)
    active      = 2 V D + 2 D + num_layers * (per layer with E_a -> k_a and E -> k in the expert terms only)

The paper's configurations with V = 8000 give 44.34M, 125.66M, 243.32M, 318.10M, 727.42M, 1040.31M (paper:
44M, 126M, 244M, 318M, 727M, 1040M; all within 0.8%). tests/test_moeut.py also builds every preset on the
meta device (no memory) and checks the built parameter count against this formula.

Incremental decoding (wider.generation): forward(..., cache=KVCache) runs only the new tokens; the attention
application at depth i (layer schedule[i]) reads and extends cache.slot(i), so the two applications of layer
A in A, B, A, B keep separate keys and values. The caller advances the cache (KVCacheForward).

Statistics: every layer APPLICATION (depth) reports under its own label, layer01.ffn, layer01.attention.v / .o,
layer02.ffn, ... (depth d runs distinct layer d % G), so TensorBoard shows the expert usage of each depth; the
entropy regulariser of a distinct layer still pools all of its applications (wider.moe.stats.take).

Expert parallelism: moe.ep_size splits the sigma-MoE FFN experts over ranks (wider.moe.layer.MoE, all-to-all
dispatch); SwitchHead's attention experts stay replicated on every rank at any ep_size (plain parameters, dense
all-reduce; see wider.models.switchhead). tests/test_moeut.py checks ep_size 2 = ep_size 1 on two ranks.
Dense baselines of equal parameter count: presets moeut_dense_44m / 126m / 244m (arch gpt).

Built from megatron-core pieces where they fit: VocabParallelEmbedding, megatron's norm slot (apex fused
LayerNorm when installed), ColumnParallelLinear for Q / K and the output layer, megatron's RotaryEmbedding and
apply_rotary_pos_emb for the partial RoPE; the core attention is torch SDPA (as in our megatron models); the
experts (FFN and attention) run as grouped GEMMs through wider.moe (megatron-core has no grouped linear without
Transformer Engine, DESIGN 9). megatron's parallel state must exist to build and run it, as for the megatron
models. Not supported: document-reset position ids (refused) and tensor parallelism (models with experts refuse
it).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from wider.config import ConfigError, ModelConfig, RunConfig
from wider.models.attention import KVCache, KVSlot
from wider.models.gpt import ParamCount, gpt_layer_spec, padded_vocab_size, transformer_config
from wider.models.switchhead import SwitchHeadAttention, default_rope_dims, normal_init, switchhead_params
from wider.moe.config import MoEConfig, MoERuntime


def head_dim(m: ModelConfig) -> int:
    return m.head_dim or m.hidden_size // m.num_attention_heads


def _norm(config, m: ModelConfig):
    """megatron-core's norm slot of the dense layer spec (apex's fused LayerNorm when apex is installed)."""
    from megatron.core.transformer.spec_utils import build_module

    return build_module(gpt_layer_spec(m).submodules.input_layernorm, config=config, hidden_size=m.hidden_size,
                        eps=config.layernorm_epsilon)


class MoEUTLayer(nn.Module):
    """One of the G distinct layers: peri-LayerNorm SwitchHead attention, then a sigma-MoE FFN."""

    def __init__(self, config, m: ModelConfig, runtime: MoERuntime, index: int):
        super().__init__()
        from wider.moe.layer import MoE

        D = m.hidden_size
        scale = math.sqrt(2.0 / m.num_layers)
        std = scale / math.sqrt(D)
        C = head_dim(m)
        self.ln1 = _norm(config, m)
        self.attention = SwitchHeadAttention(
            config, D, m.num_attention_heads, C, m.attention_experts, m.attention_top_k, rope_dims=m.rope_dims,
            rotary_base=m.rotary_base, init_std=std, output_std=scale / math.sqrt(m.num_attention_heads * C),
            entropy_weight=runtime.settings.entropy_weight_attention, label=f"group{index}.attention",
            kernels=runtime.kernels)
        self.ffn = MoE(MoEConfig.of(runtime, hidden_size=D, num_experts=m.num_experts, top_k=m.moe_top_k,
                                    ffn_size=m.expert_ffn_size, activation="relu", router="sigmoid", init_std=std,
                                    output_std=scale / math.sqrt(m.num_experts * m.expert_ffn_size),
                                    label=f"group{index}.ffn", seq_dim=0))

    def forward(self, x_SBD: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                cache: Optional[KVSlot] = None) -> torch.Tensor:
        x_SBD = x_SBD + self.attention(x_SBD, self.ln1(x_SBD), attention_mask, cache)
        out_SBD, _aux, _counts = self.ffn(x_SBD)  # aux: collected by wider.moe.stats.take, pooled over repeats
        return x_SBD + out_SBD


class MoEUTModel(nn.Module):
    """forward(tokens [B, S], position_ids, attention_mask, labels) -> per-token loss [B, S] (logits [B, S, V]
    when labels is None), the registry's contract. cache: a KVCache for incremental decoding (tokens are then
    the new positions only; position_ids are not read: positions start at cache.length).

    config: megatron-core's TransformerConfig of the model (wider.models.gpt.transformer_config): the embedding
    (VocabParallelEmbedding), the norms (megatron's norm slot), Q / K and the output layer (ColumnParallelLinear)
    are megatron-core modules; recompute 'full' checkpoints every layer application with non-reentrant
    torch.utils.checkpoint (safe for the repeated layers' shared parameters under ZeRO-2, DESIGN 9)."""

    def __init__(self, config, m: ModelConfig, vocab: int, runtime: MoERuntime):
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding

        D, G = m.hidden_size, m.layer_group_size
        init = normal_init(1.0 / math.sqrt(D))
        self.embedding = VocabParallelEmbedding(vocab, D, init_method=init, config=config)
        self.layers = nn.ModuleList(MoEUTLayer(config, m, runtime, g) for g in range(G))
        # Layer i runs group member i % G: A, B, A, B, ... (the paper's grouping).
        self.schedule = [i % G for i in range(m.num_layers)]
        for g, layer in enumerate(self.layers):  # statistics per application: the i-th call runs at depth i * G + g
            depths = [d for d, member in enumerate(self.schedule) if member == g]
            layer.ffn.call_labels = [f"layer{d + 1:02d}.ffn" for d in depths]
            layer.attention.call_labels = [f"layer{d + 1:02d}.attention" for d in depths]
        self.final_norm = _norm(config, m)
        self.output = ColumnParallelLinear(D, vocab, config=config, init_method=init, bias=False, gather_output=True,
                                           skip_bias_add=True)
        self.recompute = m.recompute == "full"

    def applied_layers(self) -> list:
        """The layer objects in the order they run (the same objects repeat)."""
        return [self.layers[g] for g in self.schedule]

    def forward(self, tokens: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None):
        x_SBD = self.embedding(tokens).transpose(0, 1)  # megatron's [s, b, d] layout inside
        for depth, layer in enumerate(self.applied_layers()):  # one cache slot per application, not per layer
            if self.recompute and self.training and cache is None and torch.is_grad_enabled():
                x_SBD = torch.utils.checkpoint.checkpoint(layer, x_SBD, attention_mask, None, use_reentrant=False)
            else:
                x_SBD = layer(x_SBD, attention_mask, None if cache is None else cache.slot(depth))
        logits_BSV = self.output(self.final_norm(x_SBD))[0].transpose(0, 1)
        if labels is None:
            return logits_BSV
        return F.cross_entropy(logits_BSV.float().flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)


def build_moeut(cfg: RunConfig, vocab_size: int, bf16: bool = False, moe: Optional[MoERuntime] = None):
    """megatron parallel_state must be initialised (wider.parallel.init_distributed), as for the megatron models."""
    m = cfg.model
    return MoEUTModel(transformer_config(m, cfg.train.tensor_parallel, bf16), m,
                      padded_vocab_size(vocab_size, m, cfg.train.tensor_parallel), moe or MoERuntime())


def layer_params(m: ModelConfig) -> tuple[int, int]:
    """(parameters of one distinct layer, those one token applies in it) - the formula in the docstring."""
    D, E, k, f = m.hidden_size, m.num_experts, m.moe_top_k, m.expert_ffn_size
    attn_total, attn_active = switchhead_params(D, m.num_attention_heads, head_dim(m), m.attention_experts,
                                                m.attention_top_k)
    ffn_dense = 2 * D + D * E  # router LayerNorm and router
    return (2 * D + attn_total + ffn_dense + E * 2 * D * f,
            2 * D + attn_active + ffn_dense + k * 2 * D * f)


def count_moeut(cfg: RunConfig, vocab_size: int) -> ParamCount:
    m = cfg.model
    vocab = padded_vocab_size(vocab_size, m, cfg.train.tensor_parallel)
    emb = 2 * vocab * m.hidden_size  # untied input embedding and output layer
    per_layer, per_layer_active = layer_params(m)
    total = emb + m.layer_group_size * per_layer + 2 * m.hidden_size
    active = emb + m.num_layers * per_layer_active + 2 * m.hidden_size
    return ParamCount(total=total, embedding=emb, active=active,
                      extra={"padded_vocab": vocab, "distinct_layers": m.layer_group_size,
                             "repeats": m.num_layers // max(1, m.layer_group_size), "layer_params": per_layer,
                             "head_dim": head_dim(m), "rope_dims": m.rope_dims if m.rope_dims is not None
                             else default_rope_dims(head_dim(m))})


def validate_moeut(cfg: RunConfig, world_size: Optional[int]) -> None:
    from wider.models.gpt_moe import validate_moe_common

    validate_moe_common(cfg, world_size)
    m, d = cfg.model, cfg.data
    from wider.models.gpt_moe import require_own_routing

    require_own_routing(m, "sigma-MoE's sigmoid router and its entropy regulariser")
    if m.shared_experts:
        raise ConfigError(f"model.shared_experts {m.shared_experts}: MoEUT has no shared experts; drop it")

    def req(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    G = m.layer_group_size
    req(isinstance(G, int) and G >= 1 and m.num_layers % G == 0,
        f"model.layer_group_size {G!r} must be a positive divisor of num_layers {m.num_layers} (G distinct layers "
        f"repeated num_layers / G times)")
    req(isinstance(m.attention_experts, int) and m.attention_experts >= 1,
        f"model.attention_experts {m.attention_experts!r}: moeut needs SwitchHead experts per head (>= 1; MoEUT "
        "uses 8 to 13); e.g. --attention-experts 4")
    req(isinstance(m.attention_top_k, int) and 1 <= m.attention_top_k <= m.attention_experts,
        f"model.attention_top_k {m.attention_top_k!r} must be in [1, attention_experts={m.attention_experts}]")
    req(m.head_dim is None or (isinstance(m.head_dim, int) and m.head_dim > 0),
        f"model.head_dim must be a positive integer or None, got {m.head_dim!r}")
    C = head_dim(m)
    req(m.rope_dims is None or (isinstance(m.rope_dims, int) and m.rope_dims % 2 == 0 and 0 <= m.rope_dims <= C),
        f"model.rope_dims {m.rope_dims!r} must be an even count in [0, head_dim={C}] or None "
        f"({default_rope_dims(C)})")
    req(m.position_embedding == "rope", f"model.position_embedding {m.position_embedding!r}: moeut uses partial "
                                        "RoPE inside SwitchHead; use 'rope'")
    req(not m.tie_embeddings, "model.tie_embeddings: MoEUT's input and output embeddings are untied; use "
                              "--no-tie-embeddings")
    req(m.hidden_dropout == 0 and m.attention_dropout == 0,
        "model.hidden_dropout / attention_dropout: moeut has no dropout; set both to 0")
    req(not d.reset_position_ids, "data.reset_position_ids: moeut's RoPE uses positions 0..S-1; set it to false")
