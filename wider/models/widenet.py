"""WideNet (Xue et al., "Go Wider Instead of Deeper"): one attention and one MoE shared by every block.

Each block keeps its own two LayerNorms (pre-LN: x + attn(ln1_i(x)), then x + moe(ln2_i(x))); a final
LayerNorm precedes the output layer. Routing follows the official code (DESIGN 5.4): softmax over
f(x) + eps with eps ~ N(0, 1/E) in training only, top-k weights not renormalised.

Built from megatron-core pieces: the GPT model from the MoE layer spec (wider.models.gpt_moe) for block 1,
and blocks 2..N from the same spec with empty (IdentityOp) attention and MLP slots. The attention and MoE
of block 1 are then moved onto the decoder (`decoder.shared_attention`, `decoder.shared_moe`) and every
block's slots point at them through `SharedRef`, a plain reference that is not a registered submodule.
So the shared weights appear exactly once in parameters(), in the state dict and in DeepSpeed's expert
checkpoint files (a module registered under N parents would be saved N times and, with expert
parallelism, loaded from the wrong rank's copy), while megatron's TransformerLayer code runs unchanged.

Aux losses: the shared MoE's balance (and z) loss is computed at every call, i.e. once per block, each
weighted by moe.aux_loss_weight, and the N values are summed into the loss (WideNet adds the load-balance
loss of every MoE call). Statistics are reported per call: block00 ... block{N-1}.

Incremental decoding (wider.generation, megatron's static inference context): megatron keys each
attention's KV buffers by `attention.layer_number`, and the shared attention has one number, so every block
would write its keys into block 1's buffer. Each block's attention slot is therefore a `SharedAttentionRef`
that, only when an inference context is passed, runs the shared module under the block's own layer number:
one cache slot per application (per depth), the shared weights unchanged. Training never passes an
inference context and runs exactly as before.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch

from wider.config import ConfigError, RunConfig
from wider.models.gpt import (ParamCount, attention_params, embedding_params, ffn_params, norm_params,
                              padded_vocab_size)
from wider.models.gpt_moe import gpt_model, moe_layer_spec, moe_params, validate_moe_common
from wider.moe.config import MoERuntime


class SharedRef:
    """Calls and attribute reads go to a module registered elsewhere; not itself a submodule."""

    def __init__(self, module: torch.nn.Module):
        object.__setattr__(self, "module", module)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.module, name)

    def __repr__(self) -> str:
        return f"SharedRef({type(self.module).__name__})"


class SharedAttentionRef(SharedRef):
    """SharedRef for the shared attention of one block. Under megatron's inference context the call runs with
    the block's layer_number (megatron's key for the KV buffers, megatron/core/transformer/attention.py
    _adjust_key_value_for_inference) so that each block keeps its own keys and values; without one (training,
    plain evaluation) the call is exactly SharedRef's."""

    def __init__(self, module: torch.nn.Module, layer_number: int):
        super().__init__(module)
        object.__setattr__(self, "block_layer_number", layer_number)

    def __call__(self, *args, inference_context=None, **kwargs):
        if inference_context is None:
            return self.module(*args, **kwargs)
        shared_number = self.module.layer_number
        self.module.layer_number = self.block_layer_number
        try:
            return self.module(*args, inference_context=inference_context, **kwargs)
        finally:
            self.module.layer_number = shared_number


def point_at_shared(layer: torch.nn.Module, slot: str, module: torch.nn.Module) -> None:
    layer._modules.pop(slot, None)
    ref = SharedAttentionRef(module, layer.layer_number) if slot == "self_attention" else SharedRef(module)
    layer.__dict__[slot] = ref


def widenet_block_specs(cfg: RunConfig, runtime: MoERuntime):
    """Block 1 from the MoE spec (the dense GPT spec when num_experts is 0: ALBERT's shared FFN), blocks 2..N with
    empty attention and MLP slots that share_blocks fills."""
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from wider.models.gpt import gpt_layer_spec

    m = cfg.model
    first = moe_layer_spec(m, runtime, "shared_moe", shared=True) if m.num_experts else gpt_layer_spec(m)
    rest = copy.deepcopy(first)
    rest.submodules.self_attention = IdentityOp  # filled with SharedRefs after construction
    rest.submodules.mlp = IdentityOp
    return TransformerBlockSubmodules(layer_specs=[first] + [rest] * (m.num_layers - 1),
                                      layer_norm=first.submodules.input_layernorm)


def share_blocks(block: torch.nn.Module, m) -> None:
    """WideNet's sharing on a built megatron TransformerBlock (the GPT decoder, the text encoder, the ViT: DESIGN
    5.4, 5.8): block 1's attention and MLP (MoE, or ALBERT's dense FFN) move onto the block as `shared_attention` and
    `shared_moe` / `shared_mlp`, and every block's slots point at them through SharedRefs. With m.share_norms
    (ALBERT) the LayerNorm pair is shared the same way (`shared_input_norm`, `shared_mlp_norm`); otherwise each block
    keeps its own pair (WideNet)."""
    first = block.layers[0]
    mlp_name = "shared_moe" if m.num_experts else "shared_mlp"
    block.shared_attention = first.self_attention
    setattr(block, mlp_name, first.mlp)
    if m.share_norms:
        block.shared_input_norm, block.shared_mlp_norm = first.input_layernorm, first.pre_mlp_layernorm
    for layer in block.layers:
        point_at_shared(layer, "self_attention", block.shared_attention)
        point_at_shared(layer, "mlp", getattr(block, mlp_name))
        if m.share_norms:
            point_at_shared(layer, "input_layernorm", block.shared_input_norm)
            point_at_shared(layer, "pre_mlp_layernorm", block.shared_mlp_norm)


def build_widenet(cfg: RunConfig, vocab_size: int, bf16: bool = False, moe: Optional[MoERuntime] = None):
    model = gpt_model(cfg, vocab_size, bf16, widenet_block_specs(cfg, moe or MoERuntime()))
    share_blocks(model.decoder, cfg.model)
    return model


def widenet_blocks(cfg: RunConfig, moe: Optional[MoERuntime], bf16: bool = False):
    """The encoder stack of the non-causal tasks (wider.models.encoder, wider.models.vit): the same specs, built
    bidirectionally, with the same sharing."""
    from wider.models.blocks import bidirectional_block

    block = bidirectional_block(cfg, widenet_block_specs(cfg, moe or MoERuntime()), bf16)
    share_blocks(block, cfg.model)
    return block


def count_widenet(cfg: RunConfig, vocab_size: int) -> ParamCount:
    """Unique = embeddings + one attention + one MoE + two norms per block + the final norm.
    Active counts what a token applies, per application (the shared layers once per block): the N of the
    6 * N training FLOPs."""
    m = cfg.model
    vocab = padded_vocab_size(vocab_size, m, cfg.train.tensor_parallel)
    emb = embedding_params(m, vocab)
    # num_experts 0: ALBERT's one dense FFN (wider.models.gpt.ffn_params) in the MoE's place.
    moe_total, moe_active = moe_params(m) if m.num_experts else (ffn_params(m), ffn_params(m))
    attn = attention_params(m)
    norm_sets = 1 if m.share_norms else m.num_layers
    total = emb + attn + moe_total + norm_sets * 2 * norm_params(m) + norm_params(m)
    active = emb + norm_params(m) + m.num_layers * (2 * norm_params(m) + attn + moe_active)
    return ParamCount(total=total, embedding=emb, active=active,
                      extra={"padded_vocab": vocab, "shared_attention_params": attn, "shared_moe_params": moe_total,
                             "norm_params_per_block": 2 * norm_params(m)})


def validate_widenet(cfg: RunConfig, world_size: Optional[int]) -> None:
    """num_experts 0 is ALBERT (one dense FFN shared by every block, DESIGN 5.8); >= 1 WideNet's shared MoE."""
    from wider.models.gpt import validate_gpt, validate_head_dim

    if cfg.model.num_experts == 0:
        validate_gpt(cfg, world_size)
    else:
        validate_moe_common(cfg, world_size)
    validate_head_dim(cfg.model)
    if cfg.model.moe_layer_freq != 1:
        raise ConfigError(f"model.moe_layer_freq {cfg.model.moe_layer_freq}: WideNet shares one MoE across every "
                          "block; use 1 (or arch gpt_moe for MoE in every other block)")
