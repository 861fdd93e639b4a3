"""Model registry: each architecture names a builder, a parameter counter and its own config checks.

The training loop knows a model only through this table (it never branches on the architecture).
For the causal-LM task a built model's forward(tokens, position_ids, attention_mask, labels) returns the per-token
LM loss [b, s]. For the encoder tasks (DESIGN 5.8: model.task masked_lm, classification, image_classification) an
architecture gives its blocks, built bidirectionally (`Architecture.blocks`), and the registry's build and count put
the task's embeddings and heads around them (wider.models.encoder, wider.models.vit): `build` and `count` of every
entry serve every task, so their callers (the loop, checkpoints, info, the memory plan) need no change per task.
`validate(cfg)` is the whole check of a run config: the fields every architecture shares (wider.config) and then
the architecture's own validator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from wider.config import ConfigError, RunConfig, validate_fields

from wider.models.blocks import gpt_blocks, gpt_moe_blocks
from wider.models.encoder import build_text_encoder, count_text_encoder
from wider.models.gpt import ParamCount, build_gpt, count_gpt, incremental_forward, validate_gpt
from wider.models.gpt_moe import build_gpt_moe, count_gpt_moe, validate_gpt_moe
from wider.models.moeut import build_moeut, count_moeut, validate_moeut
from wider.models.umoe import build_umoe, count_umoe, validate_umoe
from wider.models.vit import build_vit, count_vit
from wider.models.widenet import build_widenet, count_widenet, validate_widenet, widenet_blocks

# The heads of each encoder task around an architecture's blocks: (build(cfg, vocab, bf16, blocks), count(cfg, vocab,
# the architecture's language-model count)).
TASK_MODELS = {"masked_lm": (build_text_encoder, count_text_encoder),
               "classification": (build_text_encoder, count_text_encoder),
               "image_classification": (build_vit, count_vit)}


def for_every_task(build_lm: Callable, count_lm: Callable, blocks: Optional[Callable]) -> tuple[Callable, Callable]:
    """An architecture's (build, count) for every task: the language model itself for causal_lm, else the task's
    embeddings and heads (TASK_MODELS) around the architecture's bidirectional blocks."""
    def build(cfg: RunConfig, vocab_size: int, bf16: bool = False, moe=None):
        if cfg.model.task == "causal_lm":
            return build_lm(cfg, vocab_size, bf16, moe)
        heads, _ = TASK_MODELS[cfg.model.task]
        return heads(cfg, vocab_size, bf16, blocks(cfg, moe, bf16))

    def count(cfg: RunConfig, vocab_size: int) -> ParamCount:
        if cfg.model.task == "causal_lm":
            return count_lm(cfg, vocab_size)
        _, heads = TASK_MODELS[cfg.model.task]
        return heads(cfg, vocab_size, count_lm(cfg, vocab_size))

    build.__name__, count.__name__ = build_lm.__name__, count_lm.__name__
    return build, count


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
    # The encoder tasks' stack (DESIGN 5.8): (RunConfig, MoERuntime or None, bf16) -> a megatron TransformerBlock of
    # the architecture's blocks with bidirectional attention and the architecture's sharing (wider.models.blocks).
    # None: the architecture trains the causal-LM task only.
    blocks: Optional[Callable] = None


def _entry(name: str, build_lm: Callable, count_lm: Callable, check: Callable, recipe: str,
           blocks: Optional[Callable] = None) -> Architecture:
    build, count = for_every_task(build_lm, count_lm, blocks) if blocks is not None else (build_lm, count_lm)
    return Architecture(name, build, count, check, recipe, blocks=blocks)


ARCHITECTURES: dict[str, Architecture] = {
    "gpt": _entry("gpt", build_gpt, count_gpt, validate_gpt, "recipes/pretrain_gpt.py", gpt_blocks),
    "gpt_moe": _entry("gpt_moe", build_gpt_moe, count_gpt_moe, validate_gpt_moe, "recipes/pretrain_gpt_moe.py",
                      gpt_moe_blocks),
    "widenet": _entry("widenet", build_widenet, count_widenet, validate_widenet, "recipes/pretrain_widenet.py",
                      widenet_blocks),
    # MoEUT's SwitchHead and UMoE's pre-mixing attention are causal language-model designs (their own attention
    # modules and key/value caches); they train the causal-LM task only.
    "moeut": _entry("moeut", build_moeut, count_moeut, validate_moeut, "recipes/pretrain_moeut.py"),
    "umoe": _entry("umoe", build_umoe, count_umoe, validate_umoe, "recipes/pretrain_umoe.py"),
}


def validate(cfg: RunConfig, world_size: Optional[int] = None) -> RunConfig:
    """Raise ConfigError naming the first invalid value: the shared fields, then the architecture's own.
    world_size: also check the parallel layout. Returns cfg (with a fine-grained expert set derived)."""
    validate_fields(cfg, world_size)
    m = cfg.model
    arch = ARCHITECTURES.get(m.arch)
    if arch is None:
        raise ConfigError(f"model.arch {m.arch!r} is unknown; choose one of {sorted(ARCHITECTURES)}")
    if m.task != "causal_lm" and arch.blocks is None:
        able = sorted(n for n, a in ARCHITECTURES.items() if a.blocks is not None)
        raise ConfigError(f"model.arch {m.arch!r} trains the causal_lm task only; task {m.task!r} builds one of {able}")
    if m.share_norms and m.arch != "widenet":
        raise ConfigError(f"model.share_norms: only arch widenet shares its blocks (and then their norms); got arch "
                          f"{m.arch!r}: drop --share-norms")
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
