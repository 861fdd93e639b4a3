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
    router_renormalize: bool = _f(False, "Rescale the top-k router weights to sum to 1 (GShard / "
                                         "DeepSpeed top-2, DeepSeek-V3); off for WideNet and Switch.")
    moe_router: str = _f("token_choice", "gpt_moe / widenet: how tokens meet experts. 'token_choice' (each token its "
                                         "top-k experts; balance loss or router_bias) or 'expert_choice' (Zhou et al. "
                                         "2022 as llm-random trains it, the routing the fine-grained scaling law was "
                                         "fitted under: each expert takes its highest-scoring tokens of each routing "
                                         "group, moe.ec_group, up to moe.capacity_factor x group x k / experts; a token "
                                         "may get 0 .. num_experts experts; a LayerNorm on the MoE output; no balance "
                                         "loss). Evaluation routing: moe.ec_eval_routing.")
    router_score: str = _f("softmax", "gpt_moe / widenet, token choice: 'softmax' over the experts, or 'sigmoid' per "
                                      "expert (DeepSeek-V3's affinities; pair with router_renormalize true, as "
                                      "DeepSeek-V3).")
    router_bias: bool = _f(False, "gpt_moe / widenet, token choice: auxiliary-loss-free balancing (DeepSeek-V3): a "
                                  "per-expert bias added to the scores for the top-k choice only, never to the "
                                  "combine weights, moved after every optimizer step by moe.bias_update_speed towards "
                                  "equal load; kept in checkpoints. Usually with moe.aux_loss_weight 0 or a small "
                                  "sequence-wise loss (moe.aux_loss_scope 'sequence', DeepSeek-V3: 0.0001). "
                                  "false = off.")
    ec_softmax_over: str = _f("experts", "Expert choice only: the softmax of the router scores runs over the "
                                         "'experts' of each token (llm-random's granularity runs; default) or over "
                                         "the 'tokens' of each routing group for each expert (llm-random's class "
                                         "default; such a model cannot route one token at a time, so it cannot "
                                         "generate).")
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
    shared_experts: int = _f(0, "Always-on shared experts of moe_ffn_hidden_size each beside the routed ones "
                                "(DeepSeekMoE), fused into one dense FFN of shared_experts * moe_ffn_hidden_size that "
                                "every token uses; 0 = none. gpt_moe / widenet: with granularity, they come out of the "
                                "active budget (top-(G * base_top_k - shared_experts) of G * expansion_rate - "
                                "shared_experts routed experts), so active and total parameters stay the dense "
                                "model's and the paper's. umoe: per MoE sublayer (the attention's with its own query; "
                                "the FFN's its own weights); UMoE: 1.")
    rope_dims: Optional[int] = _f(None, "moeut: RoPE channels per head, an even count (the rest attend by content "
                                        "only); None = half of head_dim rounded down to even (MoEUT rotates "
                                        "half).")
    recompute: str = _f("none", "Activation recompute: 'none' or 'full' (every block, with non-reentrant "
                                "torch.utils.checkpoint; see patches/nonreentrant_recompute.py).")
    # --- the task (DESIGN 5.8): what the model is trained to do, its heads and its inputs ---
    task: str = _f("causal_lm", "What the model learns (wider.tasks): 'causal_lm' (next-token prediction on indexed "
                                "datasets, every arch), 'masked_lm' (ALBERT-style masked-LM + sentence-order "
                                "prediction on a bidirectional encoder, recipes/pretrain_mlm.py), 'classification' "
                                "(sequence / sentence-pair classification from GLUE TSV or JSONL, recipes/finetune.py) "
                                "or 'image_classification' (a ViT on an image folder, recipes/train_vit.py). The three "
                                "encoder tasks build archs gpt, gpt_moe and widenet bidirectionally.")
    embedding_size: Optional[int] = _f(None, "masked_lm / classification: ALBERT's factorized embedding: token, "
                                             "position and type embeddings this wide, projected to hidden_size, and "
                                             "the MLM head projecting back to it (tied to the token embedding); None = "
                                             "hidden_size (no projection, as BERT).")
    share_norms: bool = _f(False, "widenet: the blocks share their LayerNorm pair too (ALBERT shares every weight of "
                                  "its layers); false = one pair per block (WideNet).")
    num_labels: int = _f(0, "classification: classes of the output head, 0 = len(data.labels); image_classification: "
                            "classes (one folder each in the image folder); 0 for the language-model tasks.")
    image_size: int = _f(224, "image_classification: images are resized (or randomly cropped) to this many pixels "
                              "square; a multiple of patch_size. seq_length is derived: (image_size / patch_size)^2 "
                              "patches + the class token.")
    patch_size: int = _f(16, "image_classification: side of the square patches the ViT embeds (ViT-B/16: 16).")
    num_channels: int = _f(3, "image_classification: 3 (RGB) or 1 (greyscale); images are converted on reading.")

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
    # --- masked_lm (megatron-core's BERT dataset over a sentence-level indexed dataset: one sequence per sentence,
    # documents kept, data_prep/preprocess_data.py --sentences lines) ---
    masking_probability: float = _f(0.15, "masked_lm: share of the tokens to predict, in (0, 1); each is replaced by "
                                          "[MASK] 80 percent, a random token 10 percent, itself 10 percent of the time (BERT, ALBERT).")
    masking_max_ngram: int = _f(3, "masked_lm: masked spans are n-grams of whole words, n <= this, P(n) ~ 1/n "
                                   "(ALBERT: 3); 1 = single words.")
    short_sequence_probability: float = _f(0.1, "masked_lm: share of samples cut shorter than seq_length, in [0, 1] "
                                                "(BERT / ALBERT: 0.1).")
    # --- classification and image_classification: a training and a held-out set ---
    train_data: Optional[str] = _f(None, "classification: the training file (.tsv in GLUE's layout, or .jsonl); "
                                         "image_classification: the training image folder (one subfolder per class, "
                                         "JPEG / PNG inside).")
    valid_data: Optional[str] = _f(None, "The held-out set evaluated during and after training (GLUE: dev.tsv; "
                                         "ImageNet: val/ in the same class-folder layout as train_data).")
    text_columns: list = _f([], "classification: the one (single sentence) or two (sentence pair) text columns: header "
                                "names of a TSV (GLUE: 'sentence', or 'sentence1 sentence2'), keys of a JSONL line, or "
                                "0-based column numbers of a TSV without header (data.tsv_header false).")
    label_column: str = _f("label", "classification: the label's column (header name, JSONL key or 0-based number).")
    labels: list = _f([], "classification: the label set, in class-index order, as written in the files (GLUE RTE: "
                          "'entailment not_entailment'); a label outside it is an error naming the line.")
    tsv_header: bool = _f(True, "classification: the TSV files start with a header line (GLUE's CoLA files have none).")
    metric: str = _f("accuracy", "classification: the metric reported first and in the summary, as GLUE reports it: "
                                 "'accuracy', 'f1' (of the second label, GLUE's MRPC / QQP) or 'mcc' (Matthews "
                                 "correlation, GLUE's CoLA); all three are always logged.")
    image_crop_scale: float = _f(0.05, "image_classification, training: random-resized crop of 'image_crop_scale' to "
                                       "all of the image area (the official WideNet code's Inception-style crop: "
                                       "0.05); 1 = no crop, only the resize.")
    image_flip: bool = _f(True, "image_classification, training: random horizontal flips.")
    randaugment_ops: int = _f(2, "image_classification, training: RandAugment operations per image (official "
                                 "WideNet: 2); 0 = off.")
    randaugment_magnitude: float = _f(15.0, "image_classification: RandAugment magnitude on kornia's 0-30 scale "
                                            "(official WideNet: 15).")
    mixup_alpha: float = _f(0.5, "image_classification, training: mixup with a Beta(alpha, alpha) weight and an "
                                 "independently drawn partner image (official WideNet: 0.5); 0 = off.")
    label_smoothing: float = _f(0.0, "classification / image_classification: label smoothing of the cross-entropy "
                                     "in training, in [0, 1) (official WideNet on ImageNet: 0.1); 0 = off.")

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
    init_from: Optional[str] = _f(None, "Start from the weights of a pretrained run directory, checkpoint or release "
                                        "(not its optimizer or step): every tensor with the same name and shape; a head "
                                        "the source lacks starts fresh (fine-tuning: masked_lm -> classification). The "
                                        "source needs the same backbone config and tokenizer. None = random "
                                        "initialisation; ignored when resuming (the checkpoint holds the weights).")


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
    S = m.shared_experts
    _req(isinstance(S, int) and not isinstance(S, bool) and 0 <= S < G * k,
         f"model.shared_experts {S!r} does not fit the active budget of granularity {G} x base_top_k {k}: the shared "
         f"experts take {S} of the {G * k} expert FFNs each token uses, and at least one must stay routed; use "
         f"--shared-experts in [0, {G * k - 1}] or a larger --granularity")
    derived = {"num_experts": G * E - S, "moe_top_k": G * k - S, "moe_ffn_hidden_size": d_expert}
    for name, value in derived.items():
        current = getattr(m, name)
        unset = current in (None, 0) or (name == "moe_top_k" and current == ModelConfig.moe_top_k)
        _req(unset or current == value,
             f"model.{name} {current!r} conflicts with granularity {G} x expansion_rate {E}"
             f"{f' with {S} shared experts' if S else ''} (which give {value}); "
             f"drop --{name.replace('_', '-')} (it is derived) or drop --granularity/--expansion-rate")
        setattr(m, name, value)


# The tasks (DESIGN 5.8; wider.tasks holds their data, losses and metrics, wider.models their heads).
TASKS = ("causal_lm", "masked_lm", "classification", "image_classification")
TEXT_ENCODER_TASKS = ("masked_lm", "classification")
CLASSIFICATION_METRICS = ("accuracy", "f1", "mcc")


def tokenized(m: ModelConfig) -> bool:
    """Whether the task reads text through the run's SentencePiece tokenizer (the image task reads none)."""
    return m.task != "image_classification"


def validate_task_fields(cfg: RunConfig) -> None:
    """The task's own fields (DESIGN 5.8), and what they derive: classification's num_labels from data.labels, the
    ViT's seq_length from its image and patch sizes. A field of another task left at its default is not read."""
    m, d, t = cfg.model, cfg.data, cfg.train
    _req(m.task in TASKS, f"model.task {m.task!r} is unknown; use one of {', '.join(TASKS)}")
    if m.task == "causal_lm":
        _req(m.embedding_size is None, f"model.embedding_size {m.embedding_size}: the factorized embedding belongs to "
                                       "the text encoders (task masked_lm / classification); drop --embedding-size")
        _req(m.num_labels == 0, f"model.num_labels {m.num_labels}: a language model has no label head; drop "
                                "--num-labels or choose --task classification / image_classification")
        return
    _req(t.tensor_parallel == 1, f"train.tensor_parallel {t.tensor_parallel}: task {m.task!r} runs at tensor-parallel "
                                 "size 1 (its heads and losses are not split); scale it with data and expert "
                                 "parallelism and ZeRO")
    _req(m.position_embedding == "learned_absolute",
         f"model.position_embedding {m.position_embedding!r}: the encoders of task {m.task!r} (BERT / ALBERT / ViT) "
         "use learned absolute positions; set --position-embedding learned_absolute")
    for name in ("train_data", "valid_data"):
        if m.task in ("classification", "image_classification"):
            _req(bool(getattr(d, name)), f"data.{name} is not set: task {m.task!r} trains on data.train_data and "
                                         "evaluates on data.valid_data (a file or an image folder each)")
    if m.task in TEXT_ENCODER_TASKS:
        _req(m.embedding_size is None or (isinstance(m.embedding_size, int) and m.embedding_size > 0),
             f"model.embedding_size must be a positive integer or None, got {m.embedding_size!r}")
    else:
        _req(m.embedding_size is None, f"model.embedding_size {m.embedding_size}: the factorized embedding belongs to "
                                       "the text encoders; a ViT embeds patches at hidden_size: drop --embedding-size")
    if m.task == "masked_lm":
        _req(m.num_labels == 0, f"model.num_labels {m.num_labels}: masked_lm's heads are the vocabulary and the two "
                                "sentence orders; drop --num-labels")
        _req(0.0 < d.masking_probability < 1.0,
             f"data.masking_probability must be in (0, 1), got {d.masking_probability!r}")
        _req(isinstance(d.masking_max_ngram, int) and d.masking_max_ngram >= 1,
             f"data.masking_max_ngram must be a positive integer, got {d.masking_max_ngram!r}")
        _req(0.0 <= d.short_sequence_probability <= 1.0,
             f"data.short_sequence_probability must be in [0, 1], got {d.short_sequence_probability!r}")
        _req(m.seq_length >= 8, f"model.seq_length {m.seq_length}: a masked_lm sample holds [CLS], two segments and "
                                "two [SEP]; use at least 8")
    if m.task == "classification":
        labels = [str(x) for x in d.labels]
        _req(len(labels) >= 2 and len(set(labels)) == len(labels),
             f"data.labels {d.labels!r}: give the label set, at least two distinct labels in class-index order, as "
             "the files write them (e.g. --labels 0 1, or --labels entailment not_entailment)")
        _req(m.num_labels in (0, len(labels)), f"model.num_labels {m.num_labels} differs from the {len(labels)} labels "
                                               f"of data.labels {labels}; drop --num-labels (it is derived)")
        m.num_labels, d.labels = len(labels), labels
        _req(isinstance(d.text_columns, list) and len(d.text_columns) in (1, 2),
             f"data.text_columns {d.text_columns!r}: name one text column (single sentences) or two (sentence pairs), "
             "e.g. --text-columns sentence1 sentence2")
        d.text_columns = [str(c) for c in d.text_columns]
        _req(bool(str(d.label_column)),
             "data.label_column is empty; name the label's column (e.g. --label-column label)")
        _req(d.metric in CLASSIFICATION_METRICS,
             f"data.metric {d.metric!r} is invalid; use one of {', '.join(CLASSIFICATION_METRICS)}")
        _req(d.metric != "f1" or len(labels) == 2, f"data.metric f1 is GLUE's binary F1 (of the second label); with "
                                                   f"{len(labels)} labels use accuracy or mcc")
    if m.task in ("classification", "image_classification"):
        _req(0.0 <= d.label_smoothing < 1.0, f"data.label_smoothing must be in [0, 1), got {d.label_smoothing!r}")
    if m.task == "image_classification":
        for name in ("image_size", "patch_size"):
            v = getattr(m, name)
            _req(isinstance(v, int) and v > 0, f"model.{name} must be a positive integer, got {v!r}")
        _req(m.image_size % m.patch_size == 0, f"model.image_size {m.image_size} is not a multiple of patch_size "
                                               f"{m.patch_size}; choose sizes whose patches tile the image")
        _req(m.num_channels in (1, 3), f"model.num_channels must be 1 (greyscale) or 3 (RGB), got {m.num_channels!r}")
        _req(isinstance(m.num_labels, int) and m.num_labels >= 2,
             f"model.num_labels {m.num_labels!r}: give the number of classes (class folders), e.g. --num-labels 1000")
        _req(0.0 < d.image_crop_scale <= 1.0, f"data.image_crop_scale must be in (0, 1], got {d.image_crop_scale!r}")
        _req(isinstance(d.randaugment_ops, int) and d.randaugment_ops >= 0,
             f"data.randaugment_ops must be a non-negative integer, got {d.randaugment_ops!r}")
        _req(0.0 <= d.randaugment_magnitude <= 30.0,
             f"data.randaugment_magnitude must be in [0, 30] (kornia's scale), got {d.randaugment_magnitude!r}")
        _req(d.mixup_alpha >= 0.0, f"data.mixup_alpha must be >= 0 (0 = off), got {d.mixup_alpha!r}")
        m.seq_length = (m.image_size // m.patch_size) ** 2 + 1  # the patches and the class token


def validate_fields(cfg: RunConfig, world_size: Optional[int] = None) -> None:
    """Raise ConfigError naming the first invalid value among the fields every architecture shares (and derive the
    fine-grained expert set). world_size: also check the parallel layout. The architecture's own fields are its
    validator's (wider.models.validate runs both: this module knows no model)."""
    m, d, t = cfg.model, cfg.data, cfg.train
    resolve_granularity(m)
    validate_task_fields(cfg)
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
