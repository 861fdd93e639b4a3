"""Core attention for megatron-core's SelfAttention slot, on torch's scaled_dot_product_attention, and the
key/value cache of wider's own attention modules (incremental decoding, wider.generation).

megatron-core 0.16.1's local DotProductAttention allocates a CUDA buffer and cannot run on CPU, and its
TE alternative needs Transformer Engine. SDPA runs everywhere and picks the flash kernel on GPU when the
mask is plain causal. With end-of-document masking (data.eod_mask) the dataset provides an explicit
[b, 1, s, s] mask (megatron convention: True = masked out); it is honoured here, at the cost of the
flash kernel (SDPA falls back to the memory-efficient or math kernel for boolean masks).

Shapes follow megatron: q, k, v are [s, b, heads_per_partition, head_dim]; the output is
[s, b, heads_per_partition * head_dim].

Shape suffixes (cache and `attend`): B sequences, H heads, S new (query) positions, L = cached + new (key)
positions, C head channels, V vocabulary.

Incremental decoding: with a key/value cache the queries are only the NEW positions while the keys are every
position so far (S < L). torch SDPA's `is_causal` aligns its mask to the top-left corner (query i sees keys
0..i), which is wrong then: `attend` uses the bottom-right alignment (query i is position L - S + i and sees
keys 0..L - S + i). For S == L both are the same causal mask, and the training path runs exactly the call it
ran before (is_causal=True, the flash kernel).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def attend(q_BHSC: torch.Tensor, k_BHLC: torch.Tensor, v_BHLC: torch.Tensor, scale: float,
           hide: Optional[torch.Tensor] = None, dropout_p: float = 0.0, enable_gqa: bool = False,
           causal: bool = True) -> torch.Tensor:
    """Causal softmax attention [B, H, S, C] of S queries that are the LAST S of the L key positions.

    hide: None = causal; else megatron's boolean mask broadcastable to [B, H, S, L] (True = masked out).
    causal False (bidirectional encoders): every query sees every key that `hide` (a padding mask) leaves."""
    S, L = q_BHSC.shape[2], k_BHLC.shape[2]
    if hide is not None:  # megatron masks mark positions to hide; SDPA's boolean mask marks positions to keep
        return F.scaled_dot_product_attention(q_BHSC, k_BHLC, v_BHLC, attn_mask=~hide.to(torch.bool),
                                              dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa)
    if not causal:
        return F.scaled_dot_product_attention(q_BHSC, k_BHLC, v_BHLC, dropout_p=dropout_p, scale=scale,
                                              enable_gqa=enable_gqa)
    if S == L:
        return F.scaled_dot_product_attention(q_BHSC, k_BHLC, v_BHLC, dropout_p=dropout_p, is_causal=True,
                                              scale=scale, enable_gqa=enable_gqa)
    if S > L:
        raise ValueError(f"attention: {S} queries but only {L} keys; with a key/value cache the keys must "
                         "include every query position")
    # Bottom-right causal mask: query i (position L - S + i) sees keys 0 .. L - S + i.
    keep_SL = torch.ones(S, L, dtype=torch.bool, device=q_BHSC.device).tril(L - S)
    return F.scaled_dot_product_attention(q_BHSC, k_BHLC, v_BHLC, attn_mask=keep_SL, dropout_p=dropout_p,
                                          scale=scale, enable_gqa=enable_gqa)


class KVSlot:
    """The cache of ONE attention application (one depth): keys and values of positions 0 .. offset - 1."""

    def __init__(self, cache: "KVCache", key):
        self.cache, self.key = cache, key

    @property
    def offset(self) -> int:
        """Positions already cached: the new tokens' positions start here (RoPE continues from it)."""
        return self.cache.length

    def extend(self, k_BHSC: torch.Tensor, v_BHSC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' keys and values; return all of them so far ([B, H, L, C] each)."""
        return self.cache.extend(self.key, k_BHSC, v_BHSC)


class KVCache:
    """Keys and values of every position seen so far, for models that decode through their own attention
    (moeut, and any model whose forward takes `cache=`): one slot per attention APPLICATION, keyed by depth,
    not by module. A layer object applied several times (MoEUT's layer groups: A, B, A, B) computes
    different keys at each depth, so a cache keyed by module would mix them.

    Buffers are allocated at the first write of a slot, [B, H, max_length, C], so a step copies only the new
    positions (no concatenation of the whole past). The model's forward reads `slot(depth)` for each
    attention application; the caller (KVCacheForward) calls `advance(n)` once every layer has seen the n
    new positions."""

    def __init__(self, max_length: int):
        if max_length < 1:
            raise ValueError(f"KVCache max_length must be >= 1, got {max_length}")
        self.max_length, self.length = max_length, 0
        self._buffers: dict = {}  # slot key -> (k_BHMC, v_BHMC), M = max_length

    def slot(self, key) -> KVSlot:
        return KVSlot(self, key)

    def __len__(self) -> int:
        return len(self._buffers)

    def extend(self, key, k_BHSC: torch.Tensor, v_BHSC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        S, end = k_BHSC.shape[2], self.length + k_BHSC.shape[2]
        if end > self.max_length:
            raise ValueError(f"KVCache holds {self.max_length} positions; {self.length} cached + {S} new do not "
                             "fit: create the cache with a larger max_length (prompt + new tokens)")
        if key not in self._buffers:
            B, H, _, C = k_BHSC.shape
            self._buffers[key] = (k_BHSC.new_empty(B, H, self.max_length, C),
                                  v_BHSC.new_empty(B, H, self.max_length, v_BHSC.shape[-1]))
        k_BHMC, v_BHMC = self._buffers[key]
        k_BHMC[:, :, self.length:end] = k_BHSC
        v_BHMC[:, :, self.length:end] = v_BHSC
        return k_BHMC[:, :, :end], v_BHMC[:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n


class KVCacheForward:
    """wider.generation's IncrementalForward for a model whose forward(tokens, position_ids, attention_mask,
    labels=None, cache=None) takes a KVCache: __call__(tokens [B, N]) runs the N new tokens at positions
    length .. length + N - 1 and returns the logits of the last one [B, V]."""

    def __init__(self, model: torch.nn.Module, batch_size: int, max_length: int):
        self.model, self.batch_size, self.max_length = model, batch_size, max_length
        self.cache = KVCache(max_length)

    @property
    def length(self) -> int:
        return self.cache.length

    def __call__(self, tokens_BN: torch.Tensor) -> torch.Tensor:
        N = tokens_BN.shape[1]
        positions_BN = torch.arange(self.length, self.length + N, device=tokens_BN.device).expand_as(tokens_BN)
        logits_BNV = self.model(tokens_BN, positions_BN, None, cache=self.cache)
        self.cache.advance(N)
        return logits_BNV[:, -1]


def static_context_extend(inference_context, key, *new_SB: torch.Tensor) -> tuple:
    """For a self-attention slot of a megatron GPTModel that is not megatron's Attention (its own keys / values)
    under megatron's StaticInferenceContext: store the new positions' tensors (megatron layout [S, B, ...]) in
    the context's buffers under `key` (use the attention's layer_number, as megatron does) at
    sequence_len_offset, and return each tensor over every position so far ([offset + S, B, ...]). The buffers
    are allocated once, [max_sequence_length, max_batch_size, ...], on the tensors' device. Under the context
    GPTModel passes the RoPE table for all max_sequence_length positions: the new queries and keys take rows
    offset .. offset + S - 1 of it (store keys after RoPE, then no table is needed for the past)."""
    start = inference_context.sequence_len_offset
    S, B = new_SB[0].shape[:2]
    end = start + S
    if end > inference_context.max_sequence_length or B > inference_context.max_batch_size:
        raise ValueError(f"inference context holds {inference_context.max_sequence_length} positions x "
                         f"{inference_context.max_batch_size} sequences; {start} cached + {S} new x {B} do not fit")
    buffers = inference_context.key_value_memory_dict.get(key)
    if buffers is None:
        buffers = tuple(t.new_empty(inference_context.max_sequence_length, inference_context.max_batch_size,
                                    *t.shape[2:]) for t in new_SB)
        inference_context.key_value_memory_dict[key] = buffers
    out = []
    for buf, t in zip(buffers, new_SB):
        buf[start:end, :B] = t
        out.append(buf[:end, :B])
    return tuple(out)


def takes_kv_cache(model: torch.nn.Module) -> bool:
    """Whether the model's forward accepts a KVCache (`cache=` keyword): the own-attention protocol."""
    import inspect

    return "cache" in inspect.signature(model.forward).parameters

