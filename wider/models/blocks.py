"""Each architecture's transformer blocks as a bidirectional encoder stack: what the encoder tasks (DESIGN 5.8: the
ALBERT / BERT text encoder of wider.models.encoder, the ViT of wider.models.vit) put between their embeddings and
their heads.

The stack is megatron-core's TransformerBlock built from the SAME layer specs the architecture's language model
uses (gpt: the local GPT spec; gpt_moe: MoE in every moe_layer_freq-th block; widenet: one attention and one MoE
shared by every block, wider.models.widenet.share_blocks), with one change: the self-attention is built with
AttnMaskType.no_mask, which wider.models.core_attention.SDPAttention reads as "bidirectional" (every position sees
every other; a [b, 1, 1, s] padding mask hides padded keys). The final LayerNorm is the block's own (pre-LN, as the
ViT and megatron-core's BERT). Inputs and outputs are megatron's [s, b, h].
"""

from __future__ import annotations

from typing import Optional

from wider.config import RunConfig
from wider.models.gpt import gpt_layer_spec, transformer_config
from wider.moe.config import MoERuntime


def bidirectional_block(cfg: RunConfig, specs, bf16: bool = False):
    """A megatron TransformerBlock of the given TransformerBlockSubmodules with non-causal self-attention. The specs
    are the caller's fresh objects (the architecture builds them per call) and are changed in place: a deepcopy would
    copy the expert-parallel process group inside an MoE spec."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlock

    from wider.models.gpt_moe import quiet_unknown_mlp_type

    quiet_unknown_mlp_type()
    for spec in specs.layer_specs:
        attention = spec.submodules.self_attention
        if isinstance(attention, ModuleSpec) and "attn_mask_type" in (attention.params or {}):
            attention.params["attn_mask_type"] = AttnMaskType.no_mask
    return TransformerBlock(config=transformer_config(cfg.model, cfg.train.tensor_parallel, bf16), spec=specs,
                            pre_process=True, post_process=True)


def gpt_blocks(cfg: RunConfig, moe: Optional[MoERuntime] = None, bf16: bool = False):
    """Dense blocks (BERT, ViT): megatron's local GPT layer spec in every block."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    m = cfg.model
    layers = [gpt_layer_spec(m) for _ in range(m.num_layers)]
    return bidirectional_block(cfg, TransformerBlockSubmodules(layer_specs=layers,
                                                               layer_norm=layers[0].submodules.input_layernorm), bf16)


def gpt_moe_blocks(cfg: RunConfig, moe: Optional[MoERuntime] = None, bf16: bool = False):
    """Blocks with an MoE FFN in every moe_layer_freq-th block (ViT-MoE), the gpt_moe language model's specs."""
    from wider.models.gpt_moe import block_specs

    return bidirectional_block(cfg, block_specs(cfg.model, moe or MoERuntime()), bf16)
