"""Model registry: each architecture names a builder, a parameter counter and its own config checks.

The training loop knows a model only through this table (it never branches on the architecture).
A built model's forward(tokens, position_ids, attention_mask, labels) returns the per-token LM loss [b, s].
`validate(cfg)` is the whole check of a run config: the fields every architecture shares (wider.config) and then
the architecture's own validator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from wider.config import ConfigError, RunConfig, validate_fields

from wider.models.gpt import ParamCount, build_gpt, count_gpt, incremental_forward, validate_gpt
from wider.models.gpt_moe import build_gpt_moe, count_gpt_moe, validate_gpt_moe
from wider.models.moeut import build_moeut, count_moeut, validate_moeut
from wider.models.umoe import build_umoe, count_umoe, validate_umoe
from wider.models.widenet import build_widenet, count_widenet, validate_widenet


@dataclass(frozen=True)
class Architecture:
    name: str
    build: Callable  # (RunConfig, vocab_size, bf16, wider.moe.config.MoERuntime or None) -> torch.nn.Module
    count: Callable  # (RunConfig, vocab_size) -> ParamCount
    validate: Callable  # (RunConfig, world_size or None) -> None, raises ConfigError
    recipe: str  # the entry script that trains it
    # Incremental decoding for wider.generation (its docstring is the contract): (built model in eval mode,
    # batch_size, max_length) -> a fresh IncrementalForward with a key/value cache for one generation. The
    # default serves megatron-core GPTModels (megatron's static inference context) and models whose forward
    # takes `cache=` (a wider.models.attention.KVCache, one slot per attention application); it raises
    # NotImplementedError for any other model (generation then needs use_cache=False / --no-cache).
    incremental: Callable = incremental_forward


ARCHITECTURES: dict[str, Architecture] = {
    "gpt": Architecture("gpt", build_gpt, count_gpt, validate_gpt, "recipes/pretrain_gpt.py"),
    "gpt_moe": Architecture("gpt_moe", build_gpt_moe, count_gpt_moe, validate_gpt_moe, "recipes/pretrain_gpt_moe.py"),
    "widenet": Architecture("widenet", build_widenet, count_widenet, validate_widenet, "recipes/pretrain_widenet.py"),
    "moeut": Architecture("moeut", build_moeut, count_moeut, validate_moeut, "recipes/pretrain_moeut.py"),
    "umoe": Architecture("umoe", build_umoe, count_umoe, validate_umoe, "recipes/pretrain_umoe.py"),
}


def validate(cfg: RunConfig, world_size: Optional[int] = None) -> RunConfig:
    """Raise ConfigError naming the first invalid value: the shared fields, then the architecture's own.
    world_size: also check the parallel layout. Returns cfg (with a fine-grained expert set derived)."""
    validate_fields(cfg, world_size)
    arch = ARCHITECTURES.get(cfg.model.arch)
    if arch is None:
        raise ConfigError(f"model.arch {cfg.model.arch!r} is unknown; choose one of {sorted(ARCHITECTURES)}")
    arch.validate(cfg, world_size)
    return cfg


def training_flops_per_token(cfg, pc: ParamCount) -> float:
    """Training FLOPs per token, DESIGN section 7: 6 * N_active (embeddings and output layer included)
    plus the attention score/value products 12 * layers * (heads * d_head) * seq (heads * d_head = d_model
    unless model.head_dim sets d_head, as MoEUT does). An architecture whose attention does not have this shape
    (UMoE's pre-mixing heads mix D-wide values) gives its own term as pc.extra["attention_train_flops_per_token"]."""
    m = cfg.model
    if "attention_train_flops_per_token" in pc.extra:
        return 6.0 * pc.active + pc.extra["attention_train_flops_per_token"]
    attn_width = m.num_attention_heads * (m.head_dim or m.hidden_size // m.num_attention_heads)
    return 6.0 * pc.active + 12.0 * m.num_layers * attn_width * m.seq_length


__all__ = ["ARCHITECTURES", "Architecture", "ParamCount", "training_flops_per_token", "validate"]
