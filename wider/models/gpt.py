"""Dense GPT: megatron-core's GPTModel from its local layer spec, with only the core-attention slot swapped.

The spec is megatron-core's `get_gpt_layer_local_spec` (fused QKV ColumnParallelLinear, RowParallelLinear
out, pre-LN, megatron's norm slot: apex when installed, torch otherwise); the core attention is
`SDPAttention` so that the model runs on CPU and uses flash kernels on GPU. Everything else is upstream.

The dense model is the baseline every MoE result in this repository is measured against.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

from wider.config import ModelConfig, RunConfig
from wider.models.attention import SDPAttention


def padded_vocab_size(vocab: int, m: ModelConfig, tp: int) -> int:
    """Vocabulary rounded up to a multiple of make_vocab_size_divisible_by * tp (megatron's rule)."""
    mult = m.make_vocab_size_divisible_by * tp
    return ((vocab + mult - 1) // mult) * mult


def transformer_config(m: ModelConfig, tp: int = 1, bf16: bool = False):
    """megatron-core TransformerConfig for a ModelConfig. Fusions that need CUDA or apex are off; the
    weights are initialised on CPU so that tensor-parallel shards are slices of one seeded master weight
    (TP=2 starts from exactly the weights of TP=1)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    act = {"gelu": F.gelu, "relu": F.relu, "swiglu": F.silu}[m.activation]
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        ffn_hidden_size=m.ffn_size,
        kv_channels=m.hidden_size // m.num_attention_heads,
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


def _norm(m: ModelConfig) -> int:
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
    block = 2 * _norm(m) + attention_params(m) + ffn_params(m)
    emb = embedding_params(m, vocab)
    total = emb + m.num_layers * block + _norm(m)
    return ParamCount(total=total, embedding=emb, active=total, extra={"padded_vocab": vocab})


def validate_gpt(cfg: RunConfig, world_size: Optional[int]) -> None:
    """The dense model has no experts."""
    from wider.config import ConfigError

    if cfg.model.num_experts:
        raise ConfigError(f"model.num_experts {cfg.model.num_experts} with arch 'gpt' (dense); use --arch gpt_moe "
                          "or --arch widenet for a model with experts, or --num-experts 0")
