"""Presets: named functions that return a RunConfig. New presets derive from old ones.

`./run.sh --help` and `python recipes/pretrain_gpt.py --help` list them with the first line of each
docstring. Command-line flags override single fields of a preset.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from wider.config import ConfigError, RunConfig

PRESETS: dict[str, Callable[[], RunConfig]] = {}


def preset(fn: Callable[[], RunConfig]) -> Callable[[], RunConfig]:
    def make() -> RunConfig:
        cfg = fn()
        cfg.preset = fn.__name__
        cfg.train.run_dir = f"runs/{fn.__name__}"
        return cfg

    make.__doc__ = fn.__doc__
    make.__name__ = fn.__name__
    PRESETS[fn.__name__] = make
    return make


def get(name: str) -> RunConfig:
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint} Available: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


def default_for(arch: str) -> str:
    """The preset a recipe trains when --preset is not given."""
    return {"gpt": "gpt_smoke", "gpt_moe": "switch_smoke"}.get(arch, f"{arch}_smoke")


def describe() -> list[tuple[str, str]]:
    return [(n, (f.__doc__ or "").strip().splitlines()[0]) for n, f in PRESETS.items()]


def replace(cfg: RunConfig, **sections) -> RunConfig:
    """Copy of cfg with fields replaced per section: replace(cfg, model=dict(num_layers=4))."""
    out = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model), data=dataclasses.replace(cfg.data),
                              train=dataclasses.replace(cfg.train))
    for sec, fields in sections.items():
        for k, v in fields.items():
            setattr(getattr(out, sec), k, v)
    return out


@preset
def gpt_smoke() -> RunConfig:
    """Dense GPT 4x128 on the embedded corpus: 400 steps x 4096 tokens on 2 CPU ranks, about 3.5 minutes."""
    cfg = RunConfig()
    return replace(
        cfg,
        model=dict(num_layers=4, hidden_size=128, num_attention_heads=4, seq_length=128, tie_embeddings=True),
        train=dict(micro_batch_size=16, global_batch_size=32, train_iters=400, lr=3e-3, min_lr=3e-4,
                   warmup_iters=30, weight_decay=0.1, eval_interval=50, eval_iters=4, log_interval=20),
    )


@preset
def gpt_125m() -> RunConfig:
    """Dense GPT 12x768 (GPT-3 Small shape), seq 2048, bf16 ZeRO-1: one GPU node."""
    cfg = gpt_smoke()
    return replace(
        cfg,
        model=dict(num_layers=12, hidden_size=768, num_attention_heads=12, seq_length=2048, tie_embeddings=False),
        train=dict(micro_batch_size=8, global_batch_size=256, train_iters=20000, lr=6e-4, min_lr=6e-5,
                   warmup_iters=500, eval_interval=1000, eval_iters=10, log_interval=10, save_interval=1000,
                   ds_config="ds_configs/zero1_bf16.json"),
    )


@preset
def gpt_350m() -> RunConfig:
    """Dense GPT 24x1024, 16 heads, seq 2048: the dense baseline of DESIGN section 7."""
    cfg = gpt_125m()
    return replace(cfg, model=dict(num_layers=24, hidden_size=1024, num_attention_heads=16),
                   train=dict(lr=3e-4, min_lr=3e-5))


@preset
def gpt_1b3() -> RunConfig:
    """Dense GPT 24x2048, 16 heads, seq 2048, bf16 ZeRO-2."""
    cfg = gpt_350m()
    return replace(cfg, model=dict(hidden_size=2048),
                   train=dict(lr=2e-4, min_lr=2e-5, ds_config="ds_configs/zero2_bf16.json"))


# --- WideNet (DESIGN 5.4): one attention + one MoE shared by every block; 4 experts, top-2, capacity 1.2,
# balance loss 0.01 at every call, router noise N(0, 1/E), no renormalisation. ---

WIDENET_MOE = ["moe.capacity_factor=1.2", "moe.aux_loss_weight=0.01", "moe.z_loss_weight=0.0"]


@preset
def widenet_smoke() -> RunConfig:
    """WideNet 4 blocks x 128 sharing one attention and one 4-expert top-2 MoE: the CPU default run (~3.5 min)."""
    cfg = gpt_smoke()
    return replace(
        cfg,
        model=dict(arch="widenet", num_experts=4, moe_top_k=2, moe_ffn_hidden_size=512, router_noise="inverse_experts",
                   router_renormalize=False),
        train=dict(ds_config="auto", ds_set=list(WIDENET_MOE), train_iters=300, eval_interval=50),
    )


@preset
def widenet_b() -> RunConfig:
    """WideNet-B as a language model: 12 blocks x 768, 12 heads, 4 experts x 4096, top-2; seq 2048, bf16."""
    cfg = gpt_125m()
    return replace(
        cfg,
        model=dict(arch="widenet", num_experts=4, moe_top_k=2, moe_ffn_hidden_size=4096,
                   router_noise="inverse_experts", router_renormalize=False),
        train=dict(ds_config="ds_configs/moe_zero1_bf16.json", ds_set=list(WIDENET_MOE)),
    )


@preset
def widenet_l() -> RunConfig:
    """WideNet-L as a language model: 24 blocks x 1024, 16 heads, 4 experts x 4096, top-2."""
    cfg = widenet_b()
    return replace(cfg, model=dict(num_layers=24, hidden_size=1024, num_attention_heads=16, moe_ffn_hidden_size=4096),
                   train=dict(lr=3e-4, min_lr=3e-5))


@preset
def widenet_h() -> RunConfig:
    """WideNet-H as a language model: 32 blocks x 1280, 16 heads, 4 experts x 5120, top-2, ZeRO-2."""
    cfg = widenet_l()
    return replace(cfg, model=dict(num_layers=32, hidden_size=1280, moe_ffn_hidden_size=5120),
                   train=dict(lr=2e-4, min_lr=2e-5, ds_config="ds_configs/moe_zero2_bf16.json"))


# --- Switch / GLaM baselines (DESIGN 5.3): MoE every other block, balance 0.01, z-loss 1e-3. ---

SWITCH_MOE = ["moe.capacity_factor=1.25", "moe.aux_loss_weight=0.01", "moe.z_loss_weight=0.001"]


@preset
def switch_smoke() -> RunConfig:
    """Switch (top-1) GPT 4x128, 8 experts in every other block: CPU smoke."""
    cfg = gpt_smoke()
    return replace(
        cfg,
        model=dict(arch="gpt_moe", num_experts=8, moe_top_k=1, moe_layer_freq=2, router_renormalize=False),
        train=dict(ds_config="auto", ds_set=list(SWITCH_MOE)),
    )


@preset
def glam_smoke() -> RunConfig:
    """GLaM (top-2, renormalised) GPT 4x128, 8 experts in every other block: CPU smoke."""
    cfg = switch_smoke()
    return replace(cfg, model=dict(moe_top_k=2, router_renormalize=True))


@preset
def switch_125m() -> RunConfig:
    """Switch GPT 12x768 (GPT-3 Small shape), 16 experts top-1 in every other block; seq 2048, bf16."""
    cfg = gpt_125m()
    return replace(
        cfg,
        model=dict(arch="gpt_moe", num_experts=16, moe_top_k=1, moe_layer_freq=2, router_renormalize=False),
        train=dict(ds_config="ds_configs/moe_zero1_bf16.json", ds_set=list(SWITCH_MOE)),
    )


@preset
def glam_125m() -> RunConfig:
    """GLaM GPT 12x768, 16 experts top-2 (renormalised) in every other block; seq 2048, bf16."""
    cfg = switch_125m()
    return replace(cfg, model=dict(moe_top_k=2, router_renormalize=True))


# --- Fine-grained MoE (DESIGN 5.5; Krajewski et al. 2024): every block MoE, stated by granularity G and
# expansion rate E; experts = G * E, top-(G * k), d_expert = d_ff / G. Move along the paper's grid with
# --granularity G --expansion-rate E. Schedule as in the paper: cosine to 10% of the peak, 1% warmup. ---

FINE_MOE = ["moe.capacity_factor=1.0", "moe.aux_loss_weight=0.01", "moe.z_loss_weight=0.0"]


@preset
def fine_smoke() -> RunConfig:
    """Fine-grained MoE GPT 4 x 128, G 4, E 4 (16 experts x 128, top-4): CPU smoke and sweep tests."""
    cfg = gpt_smoke()
    return replace(
        cfg,
        model=dict(arch="gpt_moe", granularity=4, expansion_rate=4, base_top_k=1, moe_layer_freq=1,
                   router_renormalize=False),
        train=dict(ds_config="auto", ds_set=list(FINE_MOE), train_iters=200, warmup_iters=2, min_lr=3e-4,
                   eval_interval=0),
    )


def _fine(d_model: int, blocks: int) -> Callable[[], RunConfig]:
    def make() -> RunConfig:
        cfg = gpt_125m()
        iters, lr = 10000, (2e-4 if d_model >= 512 else 4e-4)
        return replace(
            cfg,
            model=dict(arch="gpt_moe", num_layers=blocks, hidden_size=d_model, num_attention_heads=d_model // 64,
                       seq_length=1024, granularity=8, expansion_rate=64, base_top_k=1, moe_layer_freq=1,
                       router_renormalize=False),
            train=dict(global_batch_size=256, micro_batch_size=8, train_iters=iters, warmup_iters=iters // 100,
                       lr=lr, min_lr=lr / 10, ds_config="ds_configs/moe_zero1_bf16.json",
                       ds_set=list(FINE_MOE)),
        )

    make.__name__ = f"fine_{d_model}x{blocks}"
    make.__doc__ = (f"Fine-grained MoE GPT {blocks} x {d_model} ({d_model // 64} heads), G 8, E 64 (512 experts, "
                    "top-8), seq 1024: the paper's grid (--granularity / --expansion-rate move along it).")
    return make


for _d, _l in ((256, 4), (256, 8), (512, 4), (512, 8), (768, 4), (768, 12)):
    preset(_fine(_d, _l))


# --- MoEUT (DESIGN 5.6; Csordas et al. 2024): sigma-MoE FFN (experts of 128, ReLU), SwitchHead attention (top-2),
# G distinct layers repeated, peri-LayerNorm, untied embeddings. Dropless (sigma-MoE has no capacity), no balance
# loss: the sequence entropy regulariser, 0.01 on FFN routers and 0.001 on attention routers. ---

MOEUT_MOE = ["moe.capacity_factor=null", "moe.eval_capacity_factor=null", "moe.z_loss_weight=0.0",
             "moe.entropy_weight_ffn=0.01", "moe.entropy_weight_attention=0.001"]


@preset
def moeut_smoke() -> RunConfig:
    """MoEUT 4 layers (2 distinct, A B A B) x 128, 32 experts x 128 top-4, SwitchHead 4 heads x 32, 4 experts: CPU."""
    cfg = gpt_smoke()
    return replace(
        cfg,
        model=dict(arch="moeut", num_layers=4, layer_group_size=2, hidden_size=128, num_attention_heads=4,
                   head_dim=32, num_experts=32, moe_top_k=4, moe_ffn_hidden_size=128, attention_experts=4,
                   attention_top_k=2, activation="relu", add_bias_linear=False, tie_embeddings=False),
        # 120 steps (0.5M tokens): 3m17s of `time ./run.sh moeut_smoke` on 2 shared CPU cores, final validation
        # loss 1.41 nats below the unigram entropy (200 steps: 1.72 but over 5 minutes; benchmarks/RESULTS.md).
        # No periodic eval: it costs time, and the final one covers the whole validation split.
        train=dict(ds_config="auto", ds_set=list(MOEUT_MOE), weight_decay=0.01, clip_grad=0.25, train_iters=120,
                   eval_interval=0),
    )


def _moeut(d: int, layers: int, G: int, experts: int, k: int, heads: int, att_experts: int, d_head: int):
    """The paper's table (d, layers, G, FFN experts, k, heads, attention experts, d_head) and training recipe:
    AdamW 2.5e-4, wd 0.01, cosine to 0.1x, warmup 4000, clip 0.25, 64 x 1024 tokens, SentencePiece 8k.
    train_iters 100000 (6.6B tokens) is our choice, not a figure from DESIGN 5.6."""
    cfg = moeut_smoke()
    return replace(
        cfg,
        model=dict(num_layers=layers, layer_group_size=G, hidden_size=d, num_attention_heads=heads, head_dim=d_head,
                   num_experts=experts, moe_top_k=k, attention_experts=att_experts, seq_length=1024,
                   vocab_size=8000),
        train=dict(micro_batch_size=8, global_batch_size=64, train_iters=100000, lr=2.5e-4, min_lr=2.5e-5,
                   warmup_iters=4000, lr_decay_style="cosine", eval_interval=1000, eval_iters=10, log_interval=10,
                   save_interval=1000, ds_config="ds_configs/moe_zero1_bf16.json"),
    )


@preset
def moeut_44m() -> RunConfig:
    """MoEUT-44M: 16 layers (G 2) x 412, 155 experts x 128 top-12, 4 heads x 82 (RoPE on 40), 8 attention experts."""
    return _moeut(412, 16, 2, 155, 12, 4, 8, 82)


@preset
def moeut_126m() -> RunConfig:
    """MoEUT-126M: 18 layers (G 2) x 768, 254 experts x 128 top-12, 4 heads x 96, 10 attention experts."""
    return _moeut(768, 18, 2, 254, 12, 4, 10, 96)


@preset
def moeut_244m() -> RunConfig:
    """MoEUT-244M: 18 layers (G 2) x 1024, 387 experts x 128 top-16, 4 heads x 128, 10 attention experts."""
    return _moeut(1024, 18, 2, 387, 16, 4, 10, 128)


@preset
def moeut_318m() -> RunConfig:
    """MoEUT-318M: 24 layers (G 3) x 1024, 338 experts x 128 top-16, 4 heads x 128, 10 attention experts."""
    return _moeut(1024, 24, 3, 338, 16, 4, 10, 128)


@preset
def moeut_727m() -> RunConfig:
    """MoEUT-727M: 36 layers (G 4) x 1280, 467 experts x 128 top-20, 5 heads x 128, 13 attention experts."""
    return _moeut(1280, 36, 4, 467, 20, 5, 13, 128)


@preset
def moeut_1b() -> RunConfig:
    """MoEUT-1040M: 36 layers (G 4) x 1536, 565 experts x 128 top-24, 6 heads x 128, 12 attention experts."""
    return _moeut(1536, 36, 4, 565, 24, 6, 12, 128)


def _moeut_dense(d: int, layers: int, heads: int, ffn: int, like: Callable[[], RunConfig]) -> RunConfig:
    """A dense pre-LN GPT with the parameter count of the MoEUT preset `like` (within 2%; untied embeddings,
    ReLU, no biases, as MoEUT), trained with that preset's recipe (_moeut): the paper's equal-size baseline.
    The depth is MoEUT's; the FFN width takes up the parameters the experts hold."""
    moeut = like()
    dense = replace(gpt_smoke(), model=dict(
        arch="gpt", num_layers=layers, hidden_size=d, num_attention_heads=heads, ffn_hidden_size=ffn,
        activation="relu", add_bias_linear=False, tie_embeddings=False, seq_length=moeut.model.seq_length,
        vocab_size=moeut.model.vocab_size))
    # MoEUT's data and schedule; a dense ZeRO-1 bf16 config (no "moe" block: there are no experts).
    return dataclasses.replace(moeut, model=dense.model, train=dataclasses.replace(
        moeut.train, ds_config="ds_configs/zero1_bf16.json", ds_set=[]))


@preset
def moeut_dense_44m() -> RunConfig:
    """Dense baseline of moeut_44m: GPT 16 x 416, 4 heads x 104, FFN 2000 (44.38M; 412 would give an odd
    RoPE head width)."""
    return _moeut_dense(416, 16, 4, 2000, moeut_44m)


@preset
def moeut_dense_126m() -> RunConfig:
    """Dense baseline of moeut_126m: GPT 18 x 768, 12 heads x 64, FFN 2560 (125.59M)."""
    return _moeut_dense(768, 18, 12, 2560, moeut_126m)


@preset
def moeut_dense_244m() -> RunConfig:
    """Dense baseline of moeut_244m: GPT 18 x 1024, 16 heads x 64, FFN 4096 (242.95M)."""
    return _moeut_dense(1024, 18, 16, 4096, moeut_244m)


# --- UMoE (DESIGN 5.7; Yang et al. 2025): pre-mixing attention whose experts are the FFN's, RMSNorm, pre-norm, SiLU
# experts without biases, one shared expert per MoE sublayer, softmax routers without renormalisation, dropless, the
# sequence-level balance loss 0.001 on every router. Shapes and training recipe from the official configurations
# (github.com/ysngki/UMoE model_libs/configs, train.py): AdamW beta2 0.95, wd 0.01, lr 4e-4, cosine, 5% warmup,
# sequence 1024, 1024 sequences per step, untied embeddings, a 32000-token vocabulary (the LLaMA-2 tokenizer's size). ---

UMOE_MOE = ["moe.capacity_factor=null", "moe.eval_capacity_factor=null", "moe.aux_loss_weight=0.001",
            "moe.aux_loss_scope=sequence", "moe.z_loss_weight=0.0"]


@preset
def umoe_smoke() -> RunConfig:
    """UMoE 4 layers x 128: 16 experts x 64 shared by pre-mixing attention (top-2, d_qk 32) and FFN (top-4): CPU."""
    cfg = gpt_smoke()
    return replace(
        cfg,
        model=dict(arch="umoe", umoe_mode="shared", num_layers=4, hidden_size=128, num_attention_heads=4, head_dim=32,
                   num_experts=16, moe_ffn_hidden_size=64, moe_top_k=4, attention_top_k=2, query_rank=8,
                   shared_experts=1, normalization="RMSNorm", activation="silu", add_bias_linear=False,
                   tie_embeddings=False, router_noise="none", router_renormalize=False),
        train=dict(ds_config="auto", ds_set=list(UMOE_MOE), weight_decay=0.01, train_iters=120, warmup_iters=6,
                   eval_interval=0),
    )


def _umoe(d: int, layers: int, experts: int, width: int, att_k: int, ffn_k: int, rank: int, d_qk: int,
          dense_ffn: int, mode: str, steps: int = 50000) -> RunConfig:
    """The official configurations' shapes and training recipe. 4 heads for the ordinary attention of the 'ffn'
    baseline (d / 4 = d_qk, as the official GPT / FFN-MoE configs have it). train_iters 50000 x 1M tokens is the
    official README's run."""
    cfg = umoe_smoke()
    return replace(
        cfg,
        model=dict(umoe_mode=mode, num_layers=layers, hidden_size=d, num_attention_heads=4,
                   head_dim=d_qk if mode != "ffn" else None, num_experts=experts, moe_ffn_hidden_size=width,
                   moe_top_k=ffn_k, attention_top_k=att_k, query_rank=rank, ffn_hidden_size=dense_ffn,
                   seq_length=1024, vocab_size=32000),
        train=dict(micro_batch_size=8, global_batch_size=1024, train_iters=steps, lr=4e-4, min_lr=0.0,
                   warmup_iters=steps // 20, lr_decay_style="cosine", adam_beta2=0.95, weight_decay=0.01,
                   clip_grad=1.0, eval_interval=1000, eval_iters=10, log_interval=10, save_interval=1000,
                   ds_config="ds_configs/moe_zero1_bf16.json"),
    )


@preset
def umoe_small() -> RunConfig:
    """UMoE small: 12 layers x 768, 128 experts x 192 shared by attention (top-3, d_qk 192, rank 16) and FFN (top-15)."""
    return _umoe(768, 12, 128, 192, 3, 15, 16, 192, 3072, "shared")


@preset
def umoe_small_separate() -> RunConfig:
    """umoe_small with sharing switched off: attention and FFN each have their own 128 experts (one more bank)."""
    return replace(umoe_small(), model=dict(umoe_mode="separate"))


@preset
def umoe_small_att() -> RunConfig:
    """UMoE-Att baseline (small): pre-mixing attention MoE (116 experts, top-3) and a dense FFN of 3072."""
    return replace(umoe_small(), model=dict(umoe_mode="attention", num_experts=116))


@preset
def umoe_small_ffn() -> RunConfig:
    """FFN-MoE baseline (small): ordinary attention (4 heads x 192) and an FFN MoE of 128 experts x 192, top-15."""
    return replace(umoe_small(), model=dict(umoe_mode="ffn", head_dim=None))


@preset
def umoe_1b() -> RunConfig:
    """UMoE 1B (active): 24 layers x 2048, 64 experts x 512 shared by attention (top-3, d_qk 512, rank 36) and FFN (top-10)."""
    return _umoe(2048, 24, 64, 512, 3, 10, 36, 512, 5632, "shared")


@preset
def umoe_1b_att() -> RunConfig:
    """UMoE-Att baseline (1B): pre-mixing attention MoE (57 experts x 512, top-3) and a dense FFN of 5632."""
    return replace(umoe_1b(), model=dict(umoe_mode="attention", num_experts=57))


@preset
def umoe_1b_ffn() -> RunConfig:
    """FFN-MoE baseline (1B): ordinary attention (4 heads x 512) and an FFN MoE of 64 experts x 512, top-10."""
    return replace(umoe_1b(), model=dict(umoe_mode="ffn", head_dim=None))


def _umoe_dense(like: Callable[[], RunConfig]) -> RunConfig:
    """The official GPT baseline: the UMoE preset's shape with ordinary attention (4 heads) and a dense SiLU FFN of
    ffn_hidden_size, trained with the same recipe (a dense ZeRO-1 bf16 config: no experts)."""
    moe = like()
    m = moe.model
    dense = replace(gpt_smoke(), model=dict(
        arch="gpt", num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=4,
        ffn_hidden_size=m.ffn_hidden_size, activation="silu", normalization="RMSNorm", add_bias_linear=False,
        tie_embeddings=False, seq_length=m.seq_length, vocab_size=m.vocab_size))
    return dataclasses.replace(moe, model=dense.model, train=dataclasses.replace(
        moe.train, ds_config="ds_configs/zero1_bf16.json", ds_set=[]))


@preset
def umoe_small_dense() -> RunConfig:
    """Dense GPT baseline of umoe_small: 12 x 768, 4 heads x 192, SiLU FFN 3072, RMSNorm, UMoE's recipe."""
    return _umoe_dense(umoe_small)


@preset
def umoe_1b_dense() -> RunConfig:
    """Dense GPT baseline of umoe_1b: 24 x 2048, 4 heads x 512, SiLU FFN 5632, RMSNorm, UMoE's recipe."""
    return _umoe_dense(umoe_1b)


# --- Tasks (DESIGN 5.8): WideNet on its paper's own tasks, and the baselines it is measured against. Every architecture
# with encoder blocks (gpt, gpt_moe, widenet) trains every task; recipes/pretrain_mlm.py, recipes/finetune.py and
# recipes/train_vit.py train them. The paper's shapes (Xue et al. 2022, its NLP and ImageNet tables; the official code
# XueFuzhao/WideNet_Code, widenet/configs.py and submit_tpu.sh): 4 experts, top-2, capacity 1.2, balance 0.01.

EMBEDDED_MLM = "cache/embedded_mlm"  # data_prep/prepare_embedded.py --task masked_lm / classification
EMBEDDED_DIGITS = "cache/embedded_digits"  # data_prep/prepare_embedded.py --task image_classification
VERSE_LABELS = ["law_and_history", "poetry_and_prophets", "gospels_and_acts", "letters_and_revelation"]


@preset
def widenet_mlm_smoke() -> RunConfig:
    """WideNet masked-LM + sentence order, 4 blocks x 128 sharing a 4-expert MoE, embedding 64: CPU (embedded clauses).
    Sequences of 32 and 30% of the tokens predicted (BERT's 15% gives a model this small too few targets to leave the
    unigram guess within minutes; 800 steps of 64 at 15% and seq 64 reached 0.12 masked-token accuracy and chance
    sentence order, this preset 0.14 and 0.55: benchmarks/RESULTS.md)."""
    cfg = widenet_smoke()
    return replace(
        cfg,
        model=dict(task="masked_lm", embedding_size=64, seq_length=32, position_embedding="learned_absolute",
                   tie_embeddings=False),
        data=dict(data_path=[f"{EMBEDDED_MLM}/kjv_sentence_document"], tokenizer=f"{EMBEDDED_MLM}/tokenizer.model",
                  split="95,5,0", masking_probability=0.3),
        train=dict(micro_batch_size=32, global_batch_size=64, train_iters=800, lr=1.5e-3, min_lr=2e-4, warmup_iters=40,
                   weight_decay=0.01, eval_interval=0, eval_iters=4, log_interval=50),
    )


def _albert(arch: str, experts: int = 0) -> RunConfig:
    """ALBERT-base's shape and recipe (Lan et al. 2020): 12 x 768, 12 heads, FFN 3072, embedding 128, a 30000-piece
    SentencePiece vocabulary, sequences of 512, 4096 per step for 125k steps, lr 0.00176 with 3125 warmup steps, no
    dropout. AdamW here where ALBERT uses LAMB (wider.optim has AdamW only). WideNet (experts > 0): the shared MoE of the
    paper's NLP models, experts of ALBERT's FFN width, the WideNet routing and losses."""
    cfg = widenet_mlm_smoke()
    moe = dict(num_experts=experts, moe_top_k=2, moe_ffn_hidden_size=3072, router_noise="inverse_experts",
               router_renormalize=False) if experts else dict(num_experts=0, moe_ffn_hidden_size=None)
    return replace(
        cfg,
        model=dict(arch=arch, num_layers=12, hidden_size=768, num_attention_heads=12, ffn_hidden_size=3072,
                   embedding_size=128, seq_length=512, vocab_size=30000, hidden_dropout=0.0, attention_dropout=0.0,
                   share_norms=arch == "widenet" and not experts, **moe),
        data=dict(masking_probability=0.15),  # BERT's and ALBERT's (the smoke preset predicts more)
        train=dict(micro_batch_size=32, global_batch_size=4096, train_iters=125000, lr=1.76e-3, min_lr=0.0,
                   warmup_iters=3125, lr_decay_style="linear", weight_decay=0.01, clip_grad=1.0, eval_interval=5000,
                   eval_iters=10, log_interval=10, save_interval=5000,
                   ds_config="ds_configs/moe_zero1_bf16.json" if experts else "ds_configs/zero1_bf16.json",
                   ds_set=list(WIDENET_MOE) if experts else []),
    )


@preset
def albert_base() -> RunConfig:
    """ALBERT-base: 12 x 768, every layer shared (attention, FFN 3072, norms), embedding 128; masked-LM + order."""
    return _albert("widenet")


@preset
def bert_base() -> RunConfig:
    """BERT-base with ALBERT's factorized embedding (128): 12 unshared blocks x 768, FFN 3072; the paper's baseline."""
    return replace(_albert("gpt"), model=dict(share_norms=False, hidden_dropout=0.1, attention_dropout=0.1))


@preset
def widenet_mlm_4e() -> RunConfig:
    """WideNet (NLP), 4 experts: albert_base's shape, one shared MoE of 4 x 3072 top-2, a LayerNorm pair per block."""
    return _albert("widenet", 4)


@preset
def widenet_mlm_8e() -> RunConfig:
    """WideNet (NLP), 8 experts: albert_base's shape, one shared MoE of 8 x 3072 top-2, a LayerNorm pair per block."""
    return _albert("widenet", 8)


@preset
def widenet_mlm_16e() -> RunConfig:
    """WideNet (NLP), 16 experts: albert_base's shape, one shared MoE of 16 x 3072 top-2, per-block LayerNorms."""
    return _albert("widenet", 16)


@preset
def widenet_finetune_smoke() -> RunConfig:
    """Fine-tune widenet_mlm_smoke's shape on the embedded task: which of 4 parts of the Bible a verse comes from."""
    cfg = widenet_mlm_smoke()
    return replace(
        cfg,
        model=dict(task="classification"),  # num_labels is derived from data.labels
        data=dict(train_data=f"{EMBEDDED_MLM}/verse_source/train.tsv", valid_data=f"{EMBEDDED_MLM}/verse_source/dev.tsv",
                  text_columns=["sentence"], label_column="label", labels=list(VERSE_LABELS), metric="accuracy"),
        train=dict(micro_batch_size=32, global_batch_size=64, train_iters=150, lr=1e-3, min_lr=1e-4, warmup_iters=15,
                   weight_decay=0.01, eval_interval=0, log_interval=10),
    )


@preset
def widenet_vit_smoke() -> RunConfig:
    """WideNet ViT, 4 blocks x 64 sharing a 4-expert MoE, on scikit-learn's 8 x 8 digits (patches of 2): CPU."""
    cfg = widenet_smoke()
    return replace(
        cfg,
        model=dict(task="image_classification", num_layers=4, hidden_size=64, num_attention_heads=4,
                   moe_ffn_hidden_size=256, image_size=8, patch_size=2, num_channels=1, num_labels=10,
                   position_embedding="learned_absolute", tie_embeddings=False),
        data=dict(train_data=f"{EMBEDDED_DIGITS}/train", valid_data=f"{EMBEDDED_DIGITS}/val", image_crop_scale=0.9,
                  image_flip=False, randaugment_ops=0, mixup_alpha=0.0, label_smoothing=0.0),
        # 1500 steps (67 epochs of the 1,442 training digits): 1000 steps with crops down to 0.7 of the area reached
        # 0.87 held-out, this 0.94 (benchmarks/RESULTS.md).
        train=dict(micro_batch_size=32, global_batch_size=64, train_iters=1500, lr=2e-3, min_lr=1e-4, warmup_iters=10,
                   weight_decay=0.05, eval_interval=0, log_interval=100),
    )


def _vit(arch: str, layers: int, width: int, heads: int, expert_ffn: int, moe_every: int = 1) -> RunConfig:
    """The official WideNet ImageNet recipe (widenet/train.py, submit_tpu.sh): 224 pixels, patches of 16, 1000
    classes, dropout 0.1, 300 epochs of 4096 images (93,900 steps; 9,390 warmup = 30 epochs), weight decay 0.1, beta2
    0.999, gradient clip 1, linear decay to 1e-5, label smoothing 0.1, mixup 0.5, RandAugment 2 / 15, the Inception
    crop. AdamW at 3e-3 where the official run uses LAMB at 0.01 (wider.optim has AdamW only)."""
    cfg = widenet_vit_smoke()
    moe = (dict(num_experts=4, moe_top_k=2, moe_ffn_hidden_size=expert_ffn, moe_layer_freq=moe_every,
                router_noise="inverse_experts", router_renormalize=False) if arch != "gpt" else
           dict(num_experts=0, moe_ffn_hidden_size=None))
    return replace(
        cfg,
        model=dict(arch=arch, num_layers=layers, hidden_size=width, num_attention_heads=heads, ffn_hidden_size=4 * width,
                   image_size=224, patch_size=16, num_channels=3, num_labels=1000, hidden_dropout=0.1, **moe),
        data=dict(train_data="data/imagenet/train", valid_data="data/imagenet/val", image_crop_scale=0.05,
                  image_flip=True, randaugment_ops=2, randaugment_magnitude=15.0, mixup_alpha=0.5, label_smoothing=0.1),
        train=dict(micro_batch_size=64, global_batch_size=4096, train_iters=93900, lr=3e-3, min_lr=1e-5,
                   warmup_iters=9390, lr_decay_style="linear", weight_decay=0.1, adam_beta2=0.999, clip_grad=1.0,
                   eval_interval=3130, eval_iters=10, log_interval=10, save_interval=3130,
                   ds_config="ds_configs/moe_zero1_bf16.json" if arch != "gpt" else "ds_configs/zero1_bf16.json",
                   ds_set=list(WIDENET_MOE) if arch != "gpt" else []),
    )


@preset
def vit_b16() -> RunConfig:
    """ViT-B/16: 12 unshared blocks x 768, 12 heads, FFN 3072, at 224 pixels, 1000 classes; the official recipe."""
    return _vit("gpt", 12, 768, 12, 0)


@preset
def vit_moe_b16() -> RunConfig:
    """ViT-MoE-B/16: ViT-B/16 with an MoE of 4 x 4096 top-2 in blocks 6 and 12 (the paper's 128M; see DESIGN 5.8)."""
    # Placement: the paper's 128M (ViT-MoE-B) and 406M (ViT-MoE-L) are ViT-B / ViT-L plus 2 / 4 MoE layers of 4 x 4096
    # experts, i.e. one MoE layer per six blocks (the official modeling.py's "switch_deepth" places them in the last
    # blocks; the count is the same). V-MoE's every-other-block layout (--moe-layer-freq 2) holds 207M.
    return _vit("gpt_moe", 12, 768, 12, 4096, moe_every=6)


@preset
def widenet_vit_b16() -> RunConfig:
    """WideNet-B/16: 12 blocks x 768 sharing one attention and one MoE of 4 x 4096 top-2, a LayerNorm pair per block."""
    return _vit("widenet", 12, 768, 12, 4096)


@preset
def widenet_vit_l16() -> RunConfig:
    """WideNet-L/16: 24 blocks x 1024, 16 heads, sharing one attention and one MoE of 4 x 4096 top-2."""
    return _vit("widenet", 24, 1024, 16, 4096)


@preset
def widenet_vit_h16() -> RunConfig:
    """WideNet-H/16: 32 blocks x 1280, 16 heads, sharing one attention and one MoE of 4 x 5120 top-2, ZeRO-2."""
    return replace(_vit("widenet", 32, 1280, 16, 5120), train=dict(ds_config="ds_configs/moe_zero2_bf16.json"))
