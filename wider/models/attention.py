"""Core attention for megatron-core's SelfAttention slot, on torch's scaled_dot_product_attention.

megatron-core 0.16.1's local DotProductAttention allocates a CUDA buffer and cannot run on CPU, and its
TE alternative needs Transformer Engine. SDPA runs everywhere and picks the flash kernel on GPU when the
mask is plain causal. With end-of-document masking (data.eod_mask) the dataset provides an explicit
[b, 1, s, s] mask (megatron convention: True = masked out); it is honoured here, at the cost of the
flash kernel (SDPA falls back to the memory-efficient or math kernel for boolean masks).

Shapes follow megatron: q, k, v are [s, b, heads_per_partition, head_dim]; the output is
[s, b, heads_per_partition * head_dim].
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule


class SDPAttention(MegatronModule):
    """Drop-in for megatron-core's core_attention slot (same constructor and forward signature)."""

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type=None,
                 cp_comm_type=None, softmax_scale: Optional[float] = None, pg_collection=None, **_unused):
        super().__init__(config=config)
        if getattr(config, "context_parallel_size", 1) != 1:
            raise ValueError("SDPAttention does not support context parallelism; set context_parallel_size=1")
        self.layer_number = layer_number
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
        if attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True,
                                                 scale=self.softmax_scale, enable_gqa=gqa)
        else:
            # megatron masks mark positions to hide; SDPA's boolean mask marks positions to keep.
            keep = ~attention_mask.to(torch.bool)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p,
                                                 scale=self.softmax_scale, enable_gqa=gqa)
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)
