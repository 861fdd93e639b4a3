"""megatron-core's core-attention slot filled with torch's scaled_dot_product_attention (wider.models.attention
explains the masks). A module of its own because it subclasses megatron's MegatronModule: importing megatron-core
costs seconds, and the model registry (what `wider.models.validate` and the pre-flight check need) must not pay that
before a model is built."""

from __future__ import annotations

import math
from typing import Optional

from megatron.core.transformer.module import MegatronModule

from wider.models.attention import attend


class SDPAttention(MegatronModule):
    """Drop-in for megatron-core's core_attention slot (same constructor and forward signature).

    Under megatron's static inference context (wider.models.gpt.MegatronIncremental) the keys and values
    arrive from megatron's KV buffers: fewer queries than keys, handled by `attend`. megatron then passes
    attn_mask_type no_mask, which is only right for one new token; the bottom-right causal mask is right for
    any number, so the mask type is read only to tell a causal model from a bidirectional one: a layer spec whose
    attention is built with AttnMaskType `padding` or `no_mask` (the encoders of DESIGN 5.8: BERT / ALBERT, ViT)
    attends to every position, masking only the keys a [b, 1, 1, s] padding mask hides; every other spec (megatron's
    GPT specs say `causal`) keeps the causal path unchanged."""

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type=None,
                 cp_comm_type=None, softmax_scale: Optional[float] = None, pg_collection=None, **_unused):
        super().__init__(config=config)
        if getattr(config, "context_parallel_size", 1) != 1:
            raise ValueError("SDPAttention does not support context parallelism; set context_parallel_size=1")
        self.layer_number = layer_number
        self.causal = getattr(attn_mask_type, "name", "causal") not in ("padding", "no_mask")
        self.dropout_p = float(config.attention_dropout)
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor attention bias")
        s, b, h, d = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        gqa = k.shape[1] != h
        p = self.dropout_p if self.training else 0.0
        out = attend(q, k, v, self.softmax_scale, attention_mask, p, gqa, causal=self.causal)
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)
