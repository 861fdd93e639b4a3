"""Dense GPT: megatron-core's GPTModel from its local layer spec, with only the core-attention slot swapped.

The spec is megatron-core's `get_gpt_layer_local_spec` (fused QKV ColumnParallelLinear, RowParallelLinear
out, pre-LN, megatron's norm slot: apex when installed, torch otherwise); the core attention is
`SDPAttention` so that the model runs on CPU and uses flash kernels on GPU. Everything else is upstream.

The dense model is the baseline every MoE result in this repository is measured against.

Incremental decoding (wider.generation): `incremental_forward(model, batch_size, max_length)` gives a
step function with a key/value cache. For megatron-core GPTModels (gpt, gpt_moe, widenet) it is megatron's
own static inference path (`MegatronIncremental`: StaticInferenceContext, KV buffers inside each
Attention, RoPE for the new positions taken from the cache offset); on CPU it needs the patch
`patches/kv_cache_cpu.py` (megatron allocates those buffers on torch.cuda.current_device()). Shape suffixes
there: B sequences, N new positions, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from wider.config import ModelConfig, RunConfig
from wider.models.attention import KVCacheForward, takes_kv_cache


def padded_vocab_size(vocab: int, m: ModelConfig, tp: int) -> int:
    """Vocabulary rounded up to a multiple of make_vocab_size_divisible_by * tp (megatron's rule)."""
    mult = m.make_vocab_size_divisible_by * tp
    return ((vocab + mult - 1) // mult) * mult


def transformer_config(m: ModelConfig, tp: int = 1, bf16: bool = False):
    """megatron-core TransformerConfig for a ModelConfig. Fusions that need CUDA or apex are off; the
    weights are initialised on CPU so that tensor-parallel shards are slices of one seeded master weight
    (TP=2 starts from exactly the weights of TP=1)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from wider.moe.experts import activation_fn

    act = activation_fn(m.activation)
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        ffn_hidden_size=m.ffn_size,
        # UMoE's pre-mixing attention sets its query/key width here (RoPE is laid out for kv_channels channels).
        kv_channels=m.head_dim or m.hidden_size // m.num_attention_heads,
        tensor_model_parallel_size=tp,
        normalization=m.normalization,
        add_bias_linear=m.add_bias_linear,
        gated_linear_unit=m.activation == "swiglu",
        activation_func=act,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std,
        use_cpu_initialization=True,
        perform_initialization=True,
        bf16=bf16,
        params_dtype=torch.float32,
        # CUDA / apex fusions: off (they are a speed choice, not a numerics one).
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        recompute_granularity="full" if m.recompute == "full" else None,
        recompute_method="uniform" if m.recompute == "full" else None,
        recompute_num_layers=1 if m.recompute == "full" else None,
    )


def gpt_layer_spec(m: ModelConfig):
    """megatron-core's local GPT layer spec with the SDPA core attention."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from wider.models.core_attention import SDPAttention

    spec = get_gpt_layer_local_spec(normalization=m.normalization)
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def build_gpt(cfg: RunConfig, vocab_size: int, bf16: bool = False, moe=None):
    """Build the dense GPT (megatron parallel_state must be initialised). Returns a module whose
    forward(tokens, position_ids, attention_mask, labels) gives the per-token loss [b, s]."""
    from megatron.core.models.gpt import GPTModel

    m, tp = cfg.model, cfg.train.tensor_parallel
    return GPTModel(
        config=transformer_config(m, tp, bf16),
        transformer_layer_spec=gpt_layer_spec(m),
        vocab_size=padded_vocab_size(vocab_size, m, tp),
        max_sequence_length=m.seq_length,
        share_embeddings_and_output_weights=m.tie_embeddings,
        position_embedding_type=m.position_embedding,
        rotary_base=m.rotary_base,
        parallel_output=True,
    )


class MegatronIncremental:
    """wider.generation's IncrementalForward on megatron-core 0.16.1's static inference machinery.

    A StaticInferenceContext holds one key and one value buffer [max_length, B, groups, C] per attention,
    keyed by the attention's layer_number (WideNet's shared attention takes each block's number during the
    call, wider.models.widenet.SharedAttentionRef). Each call writes the new positions at
    sequence_len_offset, attends over the buffers (megatron re-applies RoPE to the cached keys with the
    positions 0 .. offset + N - 1, so the new tokens' positions continue from the cache length) and returns
    only the last token's logits (materialize_only_last_token_logits). The core attention (SDPAttention)
    masks bottom-right causally when there are fewer queries than keys."""

    def __init__(self, model: torch.nn.Module, batch_size: int, max_length: int):
        from megatron.core.inference.contexts import StaticInferenceContext

        if model.training:
            raise ValueError("incremental decoding needs model.eval(): megatron's inference path is off in "
                             "training mode (and dropout would differ between steps)")
        unsupported = sorted({type(a).__name__ for a in _attention_slots(model) if not _handles_inference(a)})
        if unsupported:
            raise NotImplementedError(
                f"{', '.join(unsupported)} in the self-attention slot does not keep a key/value cache under "
                "megatron's inference context: implement it in its forward(..., inference_context=...) (e.g. with "
                "wider.models.attention.static_context_extend) and set the class attribute "
                "`handles_inference_context = True`, or set Architecture.incremental; until then generate with "
                "--no-cache")
        self.model, self.batch_size, self.max_length = model, batch_size, max_length
        self.context = StaticInferenceContext(batch_size, max_length)

    @property
    def length(self) -> int:
        return self.context.sequence_len_offset

    def __call__(self, tokens_BN: torch.Tensor) -> torch.Tensor:
        N = tokens_BN.shape[1]
        if self.length + N > self.max_length:
            raise ValueError(f"{self.length} cached + {N} new positions exceed the cache's max_length "
                             f"{self.max_length}; start a new generation with a larger max_length")
        if self.length > 0:
            self.context.enable_decode_mode()  # read only by megatron's flash-decode / CUDA-graph paths
        positions_BN = torch.arange(self.length, self.length + N, device=tokens_BN.device).expand_as(tokens_BN)
        # runtime_gather_output: megatron asserts it in inference mode (gathers tensor-parallel logits).
        logits_B1V = self.model(tokens_BN, positions_BN, None, inference_context=self.context,
                                runtime_gather_output=True)
        self.context.increment_sequence_len_offset(N)
        return logits_B1V[:, -1]


def _attention_slots(model: torch.nn.Module) -> list:
    """The module in each decoder layer's self-attention slot (through WideNet's SharedRefs)."""
    slots = []
    for layer in model.decoder.layers:
        a = getattr(layer, "self_attention", None)
        slots.append(getattr(a, "module", a) if not isinstance(a, torch.nn.Module) else a)
    return slots


def _handles_inference(attention) -> bool:
    """megatron's Attention keeps its KV buffers in the static inference context; an IdentityOp slot has no
    attention; another module must say that it handles the context itself."""
    from megatron.core.transformer.attention import Attention
    from megatron.core.transformer.identity_op import IdentityOp

    return isinstance(attention, (Attention, IdentityOp)) or getattr(attention, "handles_inference_context", False)


def incremental_forward(model: torch.nn.Module, batch_size: int, max_length: int):
    """The default Architecture.incremental: a fresh IncrementalForward (wider.generation) for one generation
    of batch_size sequences of at most max_length positions. megatron-core GPTModels use megatron's static
    inference context; models whose forward takes `cache=` (wider.models.attention.KVCache) use their own
    attention's cache. Anything else raises NotImplementedError saying what to implement."""
    from megatron.core.models.gpt import GPTModel

    if isinstance(model, GPTModel):
        return MegatronIncremental(model, batch_size, max_length)
    if takes_kv_cache(model):
        return KVCacheForward(model, batch_size, max_length)
    raise NotImplementedError(
        f"{type(model).__name__} has no key/value cache: give its forward a `cache=None` argument that takes a "
        "wider.models.attention.KVCache (each attention application reads cache.slot(depth), positions start at "
        "cache.length) or set Architecture.incremental; until then generate with --no-cache")


@dataclasses.dataclass
class ParamCount:
    """Parameter counts of a model, computed from its config (no weights allocated).

    total: every unique parameter; embedding: input embedding (+ positions) and, when untied, the output
    layer; non_embedding = total - embedding; active: parameters one token touches (= total for dense)."""

    total: int
    embedding: int
    active: int
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def norm_params(m: ModelConfig) -> int:
    """Parameters of one norm: weight and bias for LayerNorm, weight only for RMSNorm."""
    return m.hidden_size * (2 if m.normalization == "LayerNorm" else 1)


def attention_params(m: ModelConfig) -> int:
    d, b = m.hidden_size, m.add_bias_linear
    return d * 3 * d + (3 * d if b else 0) + d * d + (d if b else 0)


def ffn_params(m: ModelConfig, width: Optional[int] = None) -> int:
    d, f, b = m.hidden_size, width or m.ffn_size, m.add_bias_linear
    fc1 = f * (2 if m.activation == "swiglu" else 1)
    return d * fc1 + (fc1 if b else 0) + f * d + (d if b else 0)


def embedding_params(m: ModelConfig, vocab: int) -> int:
    n = vocab * m.hidden_size
    if m.position_embedding == "learned_absolute":
        n += m.seq_length * m.hidden_size
    if not m.tie_embeddings:
        n += vocab * m.hidden_size
    return n


def count_gpt(cfg: RunConfig, vocab_size: int) -> ParamCount:
    m = cfg.model
    vocab = padded_vocab_size(vocab_size, m, cfg.train.tensor_parallel)
    block = 2 * norm_params(m) + attention_params(m) + ffn_params(m)
    emb = embedding_params(m, vocab)
    total = emb + m.num_layers * block + norm_params(m)
    return ParamCount(total=total, embedding=emb, active=total, extra={"padded_vocab": vocab})


def validate_head_dim(m: ModelConfig) -> None:
    """megatron's attention (and our closed-form counts of it) use hidden_size / heads channels per head."""
    from wider.config import ConfigError

    if m.head_dim is not None and m.head_dim != m.hidden_size // m.num_attention_heads:
        raise ConfigError(f"model.head_dim {m.head_dim} with arch {m.arch!r}: its attention has hidden_size / heads = "
                          f"{m.hidden_size // m.num_attention_heads} channels per head; drop --head-dim (it sets MoEUT's "
                          "d_head and UMoE's d_qk)")
    check_rope_head(m)


def check_rope_head(m: ModelConfig) -> None:
    """RoPE rotates channel pairs over the whole head: the head (head_dim, else hidden_size / heads) must be even.
    (MoEUT rotates only rope_dims channels and checks those itself.)"""
    from wider.config import ConfigError

    head = m.head_dim or m.hidden_size // m.num_attention_heads
    if m.position_embedding == "rope" and head % 2:
        raise ConfigError(f"model: RoPE needs an even head dimension, got {head} (head_dim, or hidden_size/heads); "
                          "choose another --num-attention-heads or --head-dim, or --position-embedding learned_absolute")


def validate_gpt(cfg: RunConfig, world_size: Optional[int]) -> None:
    """The dense model has no experts."""
    from wider.config import ConfigError

    validate_head_dim(cfg.model)
    if cfg.model.num_experts:
        raise ConfigError(f"model.num_experts {cfg.model.num_experts} with arch 'gpt' (dense); use --arch gpt_moe "
                          "or --arch widenet for a model with experts, or --num-experts 0")
