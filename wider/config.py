"""The one typed source of truth for a run: model, data and training settings.

Every field is declared once, here, with its units, valid values and what "off" means. Presets
(`wider/presets.py`) are named functions that return a `RunConfig`; the command line overrides single
fields (`--hidden-size 256`); the resolved config is written into the run directory as JSON.

What DeepSpeed owns (ZeRO stage, precision, communication) lives in the ds_config JSON instead; the keys
that DeepSpeed needs but that follow from this config (batch sizes, clipping) are derived by
`wider.ds_config` and checked for agreement, so that no setting lives in two places.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field and says how to fix it."""


def _f(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - `help` mirrors argparse
    """A dataclass field whose documentation is also the command-line help."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    """Transformer shape and numerics. Defaults describe a tiny dense GPT."""

    arch: str = _f("gpt", "Model builder, one of wider.models.ARCHITECTURES: 'gpt' (dense), 'gpt_moe' "
                          "(Switch / GLaM: MoE in every or every other layer), 'widenet' (one attention and "
                          "one MoE shared by every block, per-block LayerNorms), 'moeut' (MoEUT: sigma-MoE FFN, "
                          "SwitchHead attention, layer groups, peri-LayerNorm), 'umoe' (UMoE: pre-mixing attention whose "
                          "experts are shared with the FFN; umoe_mode picks the paper's ablations).")
    num_layers: int = _f(2, "Number of transformer blocks.")
    hidden_size: int = _f(128, "Model width d_model.")
    num_attention_heads: int = _f(4, "Attention heads; must divide hidden_size and be divisible by the "
                                     "tensor-parallel size.")
    ffn_hidden_size: Optional[int] = _f(None, "FFN inner width; None = 4 * hidden_size.")
    seq_length: int = _f(128, "Training sequence length in tokens.")
    vocab_size: Optional[int] = _f(None, "Vocabulary size; None = the tokenizer's. It is padded up to a "
                                         "multiple of make_vocab_size_divisible_by * tensor_parallel.")
    make_vocab_size_divisible_by: int = _f(64, "Pad the vocabulary to a multiple of this (times TP) "
                                               "for efficient GEMMs; 1 = no padding.")
    normalization: str = _f("LayerNorm", "'LayerNorm' or 'RMSNorm' (apex fused kernels when apex is "
                                         "installed, torch otherwise).")
    position_embedding: str = _f("rope", "'rope' (rotary, applied to every head channel) or "
                                         "'learned_absolute'.")
    rotary_base: int = _f(10000, "RoPE base frequency.")
    tie_embeddings: bool = _f(False, "Share the input embedding and the output layer weights.")
    add_bias_linear: bool = _f(True, "Biases in the attention and FFN linear layers.")
    activation: str = _f("gelu", "FFN activation: 'gelu', 'relu', 'silu' (not gated; UMoE's experts) or 'swiglu' "
                                 "(gated: 1.5x FFN weights at the same ffn_hidden_size).")
    hidden_dropout: float = _f(0.0, "Dropout on the residual branches, in [0, 1); 0 = off.")
    attention_dropout: float = _f(0.0, "Dropout on attention probabilities, in [0, 1); 0 = off.")
    init_method_std: float = _f(0.02, "Std of the normal weight initialisation (output projections are "
                                      "scaled by 1/sqrt(2 * num_layers), as in megatron-core).")
    num_experts: int = _f(0, "Experts per MoE layer; 0 = no MoE (arch 'gpt'). Capacity, aux-loss weights and "
                             "ep_size are in the ds_config \"moe\" block (DESIGN section 4).")
    moe_top_k: int = _f(2, "Experts each token is routed to (1 = Switch, 2 = GLaM / WideNet).")
    moe_ffn_hidden_size: Optional[int] = _f(None, "Width of each expert FFN; None = the dense FFN width.")
    moe_layer_freq: int = _f(1, "gpt_moe: every N-th block has an MoE FFN, the others a dense FFN (1 = every "
                                "block; 2 = blocks 2, 4, ... as in Switch / GLaM). widenet: must be 1.")
    granularity: Optional[int] = _f(None, "Fine-grained MoE (Krajewski et al. 2024): G = d_ff / d_expert. When set, "
                                          "num_experts = G * expansion_rate, moe_top_k = G * base_top_k and "
                                          "moe_ffn_hidden_size = d_ff / G are derived (active parameters stay "
                                          "the dense model's); None = state those three directly.")
    expansion_rate: Optional[int] = _f(None, "Fine-grained MoE: E = N_MoE / N_ff, all experts' parameters over the "
                                             "dense FFN's (the paper's 'E64' is 64); needed with granularity.")
    base_top_k: int = _f(1, "Fine-grained MoE: experts per token at G = 1 (the paper uses 1).")
    router_noise: str = _f("none", "Router logit noise in training: 'none', or 'inverse_experts' (Gaussian, "
                                   "std 1/num_experts, as WideNet's official code).")
    router_renormalize: bool = _f(False, "Rescale the top-k router probabilities to sum to 1 (GShard / "
                                         "DeepSpeed top-2); off for WideNet and Switch.")
    layer_group_size: int = _f(1, "moeut: G distinct layers applied A, B, A, B, ... for num_layers / G repeats "
                                  "(num_layers must be a multiple of G); 1 = every layer shares one set of "
                                  "weights (a Universal Transformer).")
    attention_experts: int = _f(0, "moeut: SwitchHead V and O experts per head; 1 = dense attention with sigmoid "
                                   "value and output gates.")
    attention_top_k: int = _f(2, "moeut: SwitchHead experts each token uses per head, for V and for O. umoe: experts "
                                 "each token's pre-mixing attention uses (one mixed token, i.e. one attention head, "
                                 "per expert; UMoE: 3).")
    head_dim: Optional[int] = _f(None, "moeut: channels per attention head (MoEUT's d_head, not tied to "
                                       "hidden_size / heads). umoe: the query / key width d_qk of pre-mixing "
                                       "attention. None = hidden_size / num_attention_heads. Other archs: must be None "
                                       "or hidden_size / num_attention_heads.")
    umoe_mode: str = _f("shared", "umoe: 'shared' (pre-mixing attention MoE and FFN MoE call ONE expert bank per "
                                  "layer, each with its own router: UMoE), 'separate' (the same two MoE sublayers with "
                                  "a bank each: sharing switched off), 'attention' (pre-mixing attention MoE and a "
                                  "dense FFN of ffn_hidden_size: UMoE-Att) or 'ffn' (ordinary attention and an FFN MoE: "
                                  "the FFN-MoE baseline).")
    query_rank: int = _f(16, "umoe: rank R of each expert's own query q_i = z W_res + B_i RMSNorm(A_i z) (UMoE: 16 for "
                             "the small model, 36 for 1B).")
    shared_experts: int = _f(0, "umoe: always-on shared experts of moe_ffn_hidden_size each, per MoE sublayer (the "
                                "attention's with its own query; the FFN's its own weights), fused into one FFN of "
                                "shared_experts * moe_ffn_hidden_size; 0 = none. UMoE: 1.")
    rope_dims: Optional[int] = _f(None, "moeut: RoPE channels per head, an even count (the rest attend by content "
                                        "only); None = half of head_dim rounded down to even (MoEUT rotates "
                                        "half).")
    recompute: str = _f("none", "Activation recompute: 'none' or 'full' (every block, with non-reentrant "
                                "torch.utils.checkpoint; see patches/nonreentrant_recompute.py).")

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def expert_ffn_size(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_size


@dataclass
class DataConfig:
    """Where the tokens come from and how samples are cut."""

    data_path: list = _f(["cache/embedded/kjv_text_document"],
                         "Indexed-dataset prefixes (PREFIX.bin/.idx), optionally weighted as in "
                         "megatron: 'W1 P1 W2 P2 ...'. Built by data_prep/preprocess_data.py.")
    tokenizer: str = _f("cache/embedded/tokenizer.model",
                        "SentencePiece model the data was tokenized with (data_prep/train_tokenizer.py).")
    split: str = _f("90,10,0", "Train/valid/test split of the documents as comma-separated weights.")
    eod_mask: bool = _f(False, "Attention does not cross end-of-document tokens (megatron's "
                               "reset_attention_mask; SDPA then takes an explicit mask instead of the "
                               "flash causal kernel).")
    reset_position_ids: bool = _f(False, "Restart position ids after each end-of-document token.")
    eod_mask_loss: bool = _f(False, "Do not train on predicting the token after an end-of-document.")
    index_cache: Optional[str] = _f(None, "Directory for megatron's cached sample indices; None = "
                                          "<run_dir>/../.index_cache.")
    base_dir: Optional[str] = _f(None, "Directory that relative data_path / tokenizer paths are resolved against when "
                                       "they do not exist from the working directory; None = the working directory. A "
                                       "run records where it was launched here (RUN_DIR/config.json), so evaluation, "
                                       "export and resume work from any directory.")

    def locate(self, path: str) -> str:
        """A data path of this config: as given when it exists from here (absolute, or relative to the working
        directory), else relative to base_dir when it exists there, else as given (the caller reports it missing)."""
        if os.path.exists(path) or os.path.exists(path + ".bin") or os.path.isabs(path) or not self.base_dir:
            return path
        there = os.path.join(self.base_dir, path)
        return there if os.path.exists(there) or os.path.exists(there + ".bin") else path

    @property
    def tokenizer_path(self) -> str:
        return self.locate(self.tokenizer)

    def prefixes(self) -> tuple[list, Optional[list]]:
        """(located dataset prefixes, blend weights or None) of data_path."""
        prefixes, weights = parse_blend(self.data_path)
        return [self.locate(p) for p in prefixes], weights


@dataclass
class TrainConfig:
    """Optimisation, schedule, evaluation, checkpoints and logging."""

    micro_batch_size: int = _f(8, "Sequences per rank per forward pass.")
    global_batch_size: int = _f(8, "Sequences per optimizer step = micro_batch_size * data_parallel * "
                                   "gradient accumulation steps (the last is derived).")
    train_iters: int = _f(100, "Optimizer steps of the whole run (the schedule is laid out over these).")
    lr: float = _f(1e-3, "Peak learning rate (AdamW).")
    min_lr: float = _f(1e-4, "Learning rate at the end of the decay.")
    warmup_iters: int = _f(10, "Linear warmup steps from 0 to lr.")
    lr_decay_style: str = _f("cosine", "'cosine', 'linear' or 'constant' decay from lr to min_lr after "
                                       "warmup.")
    weight_decay: float = _f(0.1, "AdamW decoupled weight decay (not applied to biases and norms).")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.95, "AdamW beta2.")
    adam_eps: float = _f(1e-8, "AdamW epsilon.")
    clip_grad: float = _f(1.0, "Global gradient-norm clipping threshold; 0 = off.")
    seed: int = _f(1234, "Seed for initialisation, data order and dropout.")
    tensor_parallel: int = _f(1, "Tensor-parallel size (megatron-core); must divide the world size.")
    ds_config: str = _f("auto", "DeepSpeed JSON (ZeRO stage, precision, communication, the \"moe\" block); "
                                "'auto' = ds_configs/cpu_smoke.json on CPU, ds_configs/zero1_bf16.json on "
                                "GPU (moe_cpu.json / moe_zero1_bf16.json for models with experts).")
    ds_set: list = _f([], "Overrides of single ds_config keys, KEY=VALUE with a dotted key and a JSON value, "
                          "e.g. moe.ep_size=2 moe.capacity_factor=null zero_optimization.stage=2; applied "
                          "after reading the file (presets use it for their papers' MoE settings; on the "
                          "command line --ds-set adds to the preset's list, later entries win).")
    eval_interval: int = _f(50, "Evaluate on the validation split every N steps; 0 = only at the end.")
    eval_iters: int = _f(8, "Global batches per periodic evaluation (the same batches every time).")
    final_eval_iters: Optional[int] = _f(None, "Global batches for the final evaluation; None = the "
                                               "whole validation split.")
    log_interval: int = _f(10, "Console line and TensorBoard scalars every N steps.")
    save_interval: int = _f(0, "Checkpoint every N steps; 0 = only at the end (and on preemption).")
    keep_checkpoints: int = _f(2, "Complete checkpoints to keep; older ones are deleted. 0 = keep all.")
    run_dir: str = _f("runs/default", "Run directory: config, checkpoints/, tensorboard/, summary.")
    resume: str = _f("none", "'none' (start fresh; refuses a run_dir that holds checkpoints), 'auto' "
                             "(latest complete checkpoint in run_dir, else fresh) or a checkpoint dir.")
    exit_at_iter: Optional[int] = _f(None, "Stop (saving a checkpoint) after this step although the "
                                           "schedule runs to train_iters; None = run to the end.")
    peak_tflops: float = _f(989.0, "Accelerator dense bf16 peak used for MFU (H100 SXM: 989).")


@dataclass
class RunConfig:
    """A whole run: what `recipes/pretrain_*.py` trains."""

    preset: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def sections(self) -> dict:
        return {"model": self.model, "data": self.data, "train": self.train}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        unknown = set(d) - {"preset", "model", "data", "train"}
        if unknown:
            raise ConfigError(f"unknown config section(s) {sorted(unknown)}; expected model, data, train")
        out = cls(preset=d.get("preset", "custom"))
        for name, sec in out.sections().items():
            valid = {f.name for f in dataclasses.fields(sec)}
            for k, v in d.get(name, {}).items():
                if k not in valid:
                    raise ConfigError(f"unknown field {name}.{k}; valid fields: {sorted(valid)}")
                setattr(sec, k, v)
        return out

def _req(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


FINE_GRAINED_DERIVED = ("num_experts", "moe_top_k", "moe_ffn_hidden_size")


def resolve_granularity(m: ModelConfig) -> None:
    """Fill num_experts, moe_top_k and moe_ffn_hidden_size from (granularity, expansion_rate, base_top_k).

    Scaling Laws for Fine-Grained MoE (Krajewski et al. 2024), section 3: d_expert = d_ff / G, G * E experts,
    top-(G * k); every expert set that G and E imply has the dense FFN's active parameters."""
    if m.granularity is None and m.expansion_rate is None:
        return
    G, E, k = m.granularity, m.expansion_rate, m.base_top_k
    _req(G is not None and E is not None,
         f"model.granularity {G!r} and model.expansion_rate {E!r}: a fine-grained MoE needs both "
         "(e.g. --granularity 8 --expansion-rate 64)")
    for name, v in (("granularity", G), ("expansion_rate", E), ("base_top_k", k)):
        _req(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
             f"model.{name} must be a positive integer, got {v!r}")
    d_ff = m.ffn_size
    _req(d_ff % G == 0, f"model FFN width d_ff {d_ff} is not divisible by granularity {G}; choose G among "
                        f"{[g for g in (1, 2, 4, 8, 16, 32, 64) if d_ff % g == 0]} or another --ffn-hidden-size")
    d_expert = d_ff // G
    # Grouped GEMMs need K and N multiples of 8 (16-byte rows in bf16); narrower or unaligned experts would fall
    # back to a per-expert loop that costs far more than the paper's FLOP model assumes.
    _req(d_expert % 8 == 0, f"expert width d_ff / G = {d_ff} / {G} = {d_expert} is not a multiple of 8, which "
                            "grouped GEMMs need; choose a smaller granularity or a d_ff with more factors of 2")
    _req(G * k <= G * E, f"model.base_top_k {k} exceeds expansion_rate {E}: top-(G*k) would exceed G*E experts")
    derived = {"num_experts": G * E, "moe_top_k": G * k, "moe_ffn_hidden_size": d_expert}
    for name, value in derived.items():
        current = getattr(m, name)
        unset = current in (None, 0) or (name == "moe_top_k" and current == ModelConfig.moe_top_k)
        _req(unset or current == value,
             f"model.{name} {current!r} conflicts with granularity {G} x expansion_rate {E} (which give {value}); "
             f"drop --{name.replace('_', '-')} (it is derived) or drop --granularity/--expansion-rate")
        setattr(m, name, value)


def validate_fields(cfg: RunConfig, world_size: Optional[int] = None) -> None:
    """Raise ConfigError naming the first invalid value among the fields every architecture shares (and derive the
    fine-grained expert set). world_size: also check the parallel layout. The architecture's own fields are its
    validator's (wider.models.validate runs both: this module knows no model)."""
    m, d, t = cfg.model, cfg.data, cfg.train
    resolve_granularity(m)
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "make_vocab_size_divisible_by"):
        v = getattr(m, name)
        _req(isinstance(v, int) and v > 0, f"model.{name} must be a positive integer, got {v!r}")
    _req(m.hidden_size % m.num_attention_heads == 0,
         f"model.hidden_size {m.hidden_size} is not divisible by num_attention_heads {m.num_attention_heads}; "
         "choose a head count that divides it")
    _req(m.ffn_hidden_size is None or m.ffn_hidden_size > 0,
         f"model.ffn_hidden_size must be positive or None, got {m.ffn_hidden_size!r}")
    _req(m.vocab_size is None or m.vocab_size > 0, f"model.vocab_size must be positive or None, got {m.vocab_size!r}")
    _req(m.normalization in ("LayerNorm", "RMSNorm"),
         f"model.normalization {m.normalization!r} is invalid; use 'LayerNorm' or 'RMSNorm'")
    _req(m.position_embedding in ("rope", "learned_absolute"),
         f"model.position_embedding {m.position_embedding!r} is invalid; use 'rope' or 'learned_absolute'")
    _req(m.activation in ("gelu", "relu", "silu", "swiglu"),
         f"model.activation {m.activation!r} is invalid; use 'gelu', 'relu', 'silu' or 'swiglu'")
    _req(m.recompute in ("none", "full"), f"model.recompute {m.recompute!r} is invalid; use 'none' or 'full'")
    for name in ("hidden_dropout", "attention_dropout"):
        v = getattr(m, name)
        _req(0.0 <= v < 1.0, f"model.{name} must be in [0, 1), got {v!r}")
    _req(m.init_method_std > 0, f"model.init_method_std must be positive, got {m.init_method_std!r}")

    _req(isinstance(d.data_path, list) and len(d.data_path) > 0,
         "data.data_path is empty; give at least one indexed-dataset prefix")
    parse_blend(d.data_path)
    parse_split(d.split)

    for name in ("micro_batch_size", "global_batch_size", "train_iters", "eval_iters", "tensor_parallel"):
        v = getattr(t, name)
        _req(isinstance(v, int) and v > 0, f"train.{name} must be a positive integer, got {v!r}")
    for name in ("warmup_iters", "eval_interval", "log_interval", "save_interval", "keep_checkpoints"):
        v = getattr(t, name)
        _req(isinstance(v, int) and v >= 0, f"train.{name} must be a non-negative integer, got {v!r}")
    _req(t.log_interval > 0, f"train.log_interval must be positive, got {t.log_interval}")
    _req(t.lr > 0, f"train.lr must be positive, got {t.lr!r}")
    _req(0 <= t.min_lr <= t.lr, f"train.min_lr {t.min_lr!r} must be in [0, lr={t.lr!r}]")
    _req(t.warmup_iters <= t.train_iters,
         f"train.warmup_iters {t.warmup_iters} exceeds train_iters {t.train_iters}")
    _req(t.lr_decay_style in ("cosine", "linear", "constant"),
         f"train.lr_decay_style {t.lr_decay_style!r} is invalid; use 'cosine', 'linear' or 'constant'")
    _req(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay!r}")
    _req(0 <= t.adam_beta1 < 1 and 0 <= t.adam_beta2 < 1,
         f"train.adam_beta1/adam_beta2 must be in [0, 1), got {t.adam_beta1!r}, {t.adam_beta2!r}")
    _req(t.adam_eps > 0, f"train.adam_eps must be positive, got {t.adam_eps!r}")
    _req(t.clip_grad >= 0, f"train.clip_grad must be >= 0 (0 = off), got {t.clip_grad!r}")
    _req(t.final_eval_iters is None or t.final_eval_iters > 0,
         f"train.final_eval_iters must be positive or None, got {t.final_eval_iters!r}")
    _req(t.exit_at_iter is None or 0 < t.exit_at_iter <= t.train_iters,
         f"train.exit_at_iter {t.exit_at_iter!r} must be in [1, train_iters={t.train_iters}]")
    _req(t.peak_tflops > 0, f"train.peak_tflops must be positive, got {t.peak_tflops!r}")
    _req(t.resume in ("none", "auto") or bool(t.resume),
         f"train.resume {t.resume!r} is invalid; use 'none', 'auto' or a checkpoint directory")
    _req(m.num_attention_heads % t.tensor_parallel == 0,
         f"model.num_attention_heads {m.num_attention_heads} is not divisible by train.tensor_parallel "
         f"{t.tensor_parallel}")
    _req(m.ffn_size % t.tensor_parallel == 0,
         f"model FFN width {m.ffn_size} is not divisible by train.tensor_parallel {t.tensor_parallel}")
    _req(t.global_batch_size % t.micro_batch_size == 0,
         f"train.global_batch_size {t.global_batch_size} is not divisible by micro_batch_size "
         f"{t.micro_batch_size}")
    if world_size is not None:
        _req(world_size % t.tensor_parallel == 0,
             f"train.tensor_parallel {t.tensor_parallel} does not divide the world size {world_size}; "
             "launch a multiple of it")
        dp = world_size // t.tensor_parallel
        _req(t.global_batch_size % (t.micro_batch_size * dp) == 0,
             f"train.global_batch_size {t.global_batch_size} is not divisible by micro_batch_size "
             f"{t.micro_batch_size} x data-parallel size {dp}; set --global-batch-size to a multiple of "
             f"{t.micro_batch_size * dp}")


def parse_blend(items: list) -> tuple[list[str], Optional[list[float]]]:
    """megatron's blend syntax: ['P'] or ['W1', 'P1', 'W2', 'P2', ...] -> (prefixes, weights or None)."""
    items = [str(x) for x in items]
    if len(items) == 1:
        return items, None

    def isnum(s: str) -> bool:
        try:
            float(s)
            return True
        except ValueError:
            return False

    if not isnum(items[0]):
        _req(not any(isnum(x) for x in items),
             f"data.data_path {items} mixes prefixes and weights; use 'W1 P1 W2 P2 ...' or only prefixes")
        return items, None  # several prefixes, equal weights
    _req(len(items) % 2 == 0 and all(isnum(w) for w in items[0::2]),
         f"data.data_path {items} is not 'W1 P1 W2 P2 ...' (a weight before every prefix)")
    weights = [float(w) for w in items[0::2]]
    _req(all(w > 0 for w in weights), f"data.data_path weights {weights} must all be positive")
    return items[1::2], weights


def parse_split(split: str) -> list[float]:
    parts = re.split(r"[,/]", str(split))
    try:
        w = [float(x) for x in parts]
    except ValueError:
        raise ConfigError(f"data.split {split!r} is not comma-separated numbers such as '90,10,0'") from None
    _req(len(w) == 3 and all(x >= 0 for x in w) and w[0] > 0 and w[1] > 0,
         f"data.split {split!r} needs three non-negative weights (train, valid, test) with train and valid > 0")
    return w
