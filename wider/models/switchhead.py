"""SwitchHead attention (Csordas et al. 2023, as used by MoEUT, Csordas et al. 2024; DESIGN 5.6).

Shape suffixes: S sequence, B batch (sequences), T = S * B tokens (megatron's [s, b] order), D model width,
H heads, C head channels (d_head), E experts per head, N = H * E expert projections, K choices per head,
A assignments (T * H * K rows grouped by expert).

Per head h, with z = ln1(x) the normed input (peri-LayerNorm: the caller passes it; None = x itself):
  q_h = z W_Q^h,  k_h = z W_K^h                                   (dense)
  v_h[t] = sum_{e in topK(sigmoid(z[t] S_V^h))} sigmoid(.)_e * x[t] W_V^{h,e}     (choice from the SOURCE token t;
                                                                                   V reads the raw x)
  a_h = causal softmax attention of q_h, k_h, v_h           (torch SDPA; RoPE on `rope_dims` channels of q, k)
  out[t] = sum_h sum_{e in topK(sigmoid(z[t] S_O^h))} sigmoid(.)_e * a_h[t] W_O^{h,e}   (choice from the
                                                                                   DESTINATION token t)
Gates are the raw sigmoid values (no renormalisation), routers in fp32. With one expert per head and K = 1 this
is ordinary attention whose values are scaled by a sigmoid gate of the source token and whose heads' outputs
are scaled by a sigmoid gate of the destination token.

The V and O projections reuse the MoE family: one dispatch.plan over N = H * E experts in which each token
makes H * K choices (head h's experts are global ids h * E ...; one grouped GEMM serves every head), then the
dispatch's gathers, grouped GEMMs and combines (capacity None: SwitchHead drops nothing). Nothing is copied per
head: V's rows are gathered from x itself (a token's H * K assignments all read its x) and combined per (token,
head) through dispatch.split_choices; O's rows are gathered per (token, head) through the same view and combined
over all H * K assignments of a token, which is the sum over heads. Neither keeps a D-wide per-assignment tensor
for the backward: V's gather and GEMM are one autograd node that keeps x (dispatch.gather_mm), O's GEMM and
combine one that keeps the C-wide rows (dispatch.mm_combine). (The first version laid the (token, head) pairs
out as T * H rows, copied x once per head, T x H x D, and kept T * H * K x D rows on each side; the same math,
checked by tests/test_moeut.py's loop reference.)

RoPE on part of each head's channels: MoEUT rotates half of them. 44M's d_head 82 would give 41, an odd count
that rotary pairs cannot cover (the official module fails on that config, DESIGN 5.6): the default here is
the largest even count <= d_head / 2 (40 for 82; 48 for 96; 64 for 128), and an odd rope_dims is refused.

Incremental decoding (wider.generation): forward(..., cache=KVSlot) takes the cache slot of this application
(wider.models.attention.KVCache, one slot per depth): only the new positions are projected and routed, their
keys (after RoPE, at positions cache.offset ...) and values (after the V experts, which depend on the source
token only) are appended, and the new queries attend over every cached position. The O experts route on the
destination token, i.e. the new positions only. So the cached result equals the full recomputation.

Regulariser: per router (V, O), minus the entropy of the mean softmax(s) of each sequence and head, averaged
over sequences and heads, pooled over every call of a shared layer (wider.moe.stats.take), weight
moe.entropy_weight_attention. No balance loss.

megatron-core pieces: Q and K are one ColumnParallelLinear, RoPE is megatron-core's RotaryEmbedding and
apply_rotary_pos_emb (on the first rope_dims channels of each head), the attention is torch SDPA
(wider.models.attention.attend, as in megatron's core-attention slot). The expert projections are stacked
parameters run as grouped GEMMs through the MoE family's dispatch (megatron-core has no grouped linear without
Transformer Engine).

Expert parallelism: attention experts stay data-parallel at every moe.ep_size: replicated on each rank, their
gradients all-reduced with the dense ones (only FFN experts are expert-parallel). Why: they are about a tenth of a
layer (2 H E C D: moeut_44m 2.2M of 18.9M per distinct layer, moeut_244m 10.5M of 113M), their H * E projections
often do not divide by the usual ep sizes (moeut_727m: 5 heads x 13 = 65), and splitting them would put each
head's V experts on other ranks than its O experts, two more all-to-alls per layer. DeepSpeed finds expert
parameters (their own gradient group, one checkpoint file per expert) only inside a deepspeed.moe.layer.MoE
module, under deepspeed_moe.experts.deepspeed_experts.<i>; as plain parameters of this module they are ordinary
dense parameters, all-reduced and saved from rank 0, which is correct for replicated weights.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from wider.models.attention import KVSlot, attend
from wider.moe import dispatch
from wider.moe.config import Kernels
from wider.moe.records import CallRecord
from wider.moe.router import router_entropy, row_normalised_normal_, sigmoid_topk


def default_rope_dims(head_dim: int) -> int:
    """Half of the head's channels, rounded down to an even count (rotary pairs)."""
    return (head_dim // 2) // 2 * 2


def normal_init(std: float):
    """A megatron-core init_method drawing N(0, std)."""
    return functools.partial(torch.nn.init.normal_, mean=0.0, std=std)


class SwitchHeadAttention(nn.Module):
    """forward(x [S, B, D], z [S, B, D] or None, attention_mask=None, cache=None) -> [S, B, D] (megatron's layout).

    attention_mask: None = causal; else megatron's [B or 1, 1, S, S] boolean mask (True = masked out).
    cache: None, or this application's KVSlot (incremental decoding): x holds only the new positions.
    config: the model's megatron-core TransformerConfig (for the Q / K ColumnParallelLinear and RoPE); megatron's
    parallel state must exist (wider.parallel.init_distributed), as for every megatron-core layer."""

    records_routing = True  # wider.moe.stats collects self.records

    def __init__(self, config, hidden_size: int, num_heads: int, head_dim: int, num_experts: int, top_k: int = 2,
                 rope_dims: Optional[int] = None, rotary_base: float = 10000.0, init_std: float = 0.02,
                 output_std: Optional[float] = None, entropy_weight: float = 0.001, label: str = "attention",
                 shared: bool = False, kernels: Kernels = Kernels()):
        super().__init__()
        from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
        from megatron.core.tensor_parallel import ColumnParallelLinear

        for name, v in (("hidden_size", hidden_size), ("num_heads", num_heads), ("head_dim", head_dim),
                        ("num_experts", num_experts), ("top_k", top_k)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"SwitchHead {name} must be a positive integer, got {v!r}")
        if top_k > num_experts:
            raise ValueError(f"SwitchHead top_k {top_k} exceeds the {num_experts} experts per head; use "
                             f"top_k <= {num_experts}")
        rope_dims = default_rope_dims(head_dim) if rope_dims is None else rope_dims
        if rope_dims % 2 or not 0 <= rope_dims <= head_dim:
            raise ValueError(f"SwitchHead rope_dims {rope_dims} must be an even count in [0, head_dim={head_dim}] "
                             f"(rotary channels come in pairs); e.g. {default_rope_dims(head_dim)}")
        D, H, C, E = hidden_size, num_heads, head_dim, num_experts
        self.hidden_size, self.num_heads, self.head_dim, self.num_experts, self.top_k = D, H, C, E, top_k
        self.rope_dims, self.rotary_base, self.entropy_weight = rope_dims, float(rotary_base), float(entropy_weight)
        self.label, self.shared, self.kernels = label, shared, kernels
        self.records: list[CallRecord] = []
        out_std = output_std if output_std is not None else init_std
        self.config = config
        # [W_Q | W_K] as one megatron-core ColumnParallelLinear (MoEUT's init N(0, init_std) for both).
        self.linear_qk = ColumnParallelLinear(D, 2 * H * C, config=config, init_method=normal_init(init_std),
                                              bias=False, gather_output=True, skip_bias_add=True)
        # megatron-core's RoPE laid out for the rotated channels only (kv_channels = rope_dims, so inv_freq is
        # base^(-2i / rope_dims)); apply_rotary_pos_emb rotates the first rope_dims channels of each head and passes
        # the others unchanged (rotate-half pairing: channel i with i + rope_dims / 2).
        self.rotary_pos_emb = (RotaryEmbedding(kv_channels=rope_dims, rotary_percent=1.0, rotary_base=rotary_base,
                                               use_cpu_initialization=config.use_cpu_initialization)
                               if rope_dims else None)
        self.v_NDC = nn.Parameter(torch.empty(H * E, D, C).normal_(0.0, init_std))
        self.o_NCD = nn.Parameter(torch.empty(H * E, C, D).normal_(0.0, out_std))
        self.sel_v_ND = nn.Parameter(row_normalised_normal_(torch.empty(H * E, D), init_std))
        self.sel_o_ND = nn.Parameter(row_normalised_normal_(torch.empty(H * E, D), init_std))

    def _route(self, z_TD: torch.Tensor, sel_ND: torch.Tensor, name: str, S: int, B: int) -> dispatch.Plan:
        """Sigmoid top-k per head in fp32 -> a plan over the (token, head) pairs; records the call."""
        T, H, E, K = z_TD.shape[0], self.num_heads, self.num_experts, self.top_k
        # One routing row per (token, head): each head chooses among its own E experts.
        r = sigmoid_topk(F.linear(z_TD.float(), sel_ND.float()).view(T * H, E), K)
        # Head h's experts are global ids h * E ... h * E + E - 1, and a token's H * K choices are one plan row:
        # one plan and one grouped GEMM for all heads.
        ids_TX = (r.expert_ids_TK.view(T, H, K) + (torch.arange(H, device=z_TD.device) * E).view(1, H, 1))
        p = dispatch.plan(ids_TX.reshape(T, H * K), r.weights_TK.view(T, H * K), H * E, None, self.kernels.gather)
        probs_THE = r.probs_TE.view(T, H, E)
        record = CallRecord(aux=r.probs_TE.new_zeros(()), balance=r.aux["balance"], z=r.aux["z"].detach(),
                            entropy=router_entropy(r.probs_TE), routed_E=p.routed_E.detach(),
                            kept_E=p.counts_E.detach(), router=name)
        if self.entropy_weight > 0:
            # Per-sequence, per-head sums [B * H, E]: tokens are in [s, b] order, so sum over s.
            record.prob_sums_BE = probs_THE.view(S, B, H, E).sum(0).reshape(B * H, E)
            record.tokens_per_seq, record.entropy_weight = S, self.entropy_weight
        self.records.append(record)
        return p

    def forward(self, x_SBD: torch.Tensor, z_SBD: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, cache: Optional[KVSlot] = None) -> torch.Tensor:
        S, B, D = x_SBD.shape
        H, C = self.num_heads, self.head_dim
        T = S * B
        z_SBD = x_SBD if z_SBD is None else z_SBD
        x_TD, z_TD = x_SBD.reshape(T, D), z_SBD.reshape(T, D)

        def heads(t_TX: torch.Tensor) -> torch.Tensor:  # [T, H * C] -> [B, H, S, C]
            return t_TX.view(S, B, H, C).permute(1, 2, 0, 3)

        from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

        start = 0 if cache is None else cache.offset  # new positions continue from the cached ones
        q_SBHC, k_SBHC = self.linear_qk(z_SBD)[0].view(S, B, 2, H, C).unbind(2)
        if self.rotary_pos_emb is not None:
            freqs = self.rotary_pos_emb(S, offset=start)  # [S, 1, 1, rope_dims]
            q_SBHC = apply_rotary_pos_emb(q_SBHC, freqs, config=self.config)
            k_SBHC = apply_rotary_pos_emb(k_SBHC, freqs, config=self.config)
        q, k = q_SBHC.permute(1, 2, 0, 3), k_SBHC.permute(1, 2, 0, 3)

        # V: the source token's choice, applied to the raw x: all H * K assignments of token t read x[t]; the
        # outputs sum per (token, head) -> [T * H, C].
        p_v = self._route(z_TD, self.sel_v_ND, "v", S, B)
        # gather_mm keeps x_TD, not its T * H * K gathered rows, for the backward; the combine keeps the C-wide outputs.
        v_YC = dispatch.combine(dispatch.gather_mm(x_TD, p_v, self.v_NDC, self.kernels.expert),
                                dispatch.split_choices(p_v, H))
        v = heads(v_YC.to(x_TD.dtype).reshape(T, H * C))

        if cache is not None:
            k, v = cache.extend(k, v)  # [B, H, L, C]: every position so far
        a_BHSC = attend(q, k, v, 1.0 / math.sqrt(C), attention_mask)

        # O: the destination token's choice; the K assignments of (token t, head h) read a_h[t], and a token's
        # H * K outputs sum into one row: the heads' sum.
        p_o = self._route(z_TD, self.sel_o_ND, "o", S, B)
        a_YC = a_BHSC.permute(2, 0, 1, 3).reshape(T * H, C)  # row t * H + h
        # mm_combine keeps the C-wide gathered rows, not the D-wide expert outputs, for the backward.
        out_TD = dispatch.mm_combine(dispatch.gather_tokens(a_YC, dispatch.split_choices(p_o, H)), self.o_NCD, p_o,
                                     self.kernels.expert)
        return out_TD.to(x_SBD.dtype).view(S, B, D)


def switchhead_params(hidden_size: int, num_heads: int, head_dim: int, num_experts: int,
                      top_k: int) -> tuple[int, int]:
    """(all parameters, those one token applies) of one SwitchHead, norms excluded: dense Q and K (2 D H C), V
    and O experts (2 H E C D; a token applies K per head), two routers (2 D H E)."""
    D, H, C, E = hidden_size, num_heads, head_dim, num_experts
    dense = 2 * D * H * C + 2 * D * H * E
    return dense + 2 * H * E * C * D, dense + 2 * H * top_k * C * D
