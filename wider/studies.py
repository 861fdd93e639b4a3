"""Equal-budget quality studies: does each recipe deliver its paper's central claim (DESIGN 11)?

A study is a list of arms (a preset plus overrides) trained on the same token budget with the same learning-rate
schedule shape, several seeds each, against a reference arm; `python -m wider.study` trains them through the
recipes and writes the table and plots (wider/study/). Each study exists at two scales:

- `cpu`: two CPU cores (the development machines). The embedded corpus is re-tokenized with a 2048-piece
  vocabulary (cache/embedded_2048, prepared once): with the presets' 8000 pieces, the output layer of a 128-wide
  model takes about half of every step, and the arms differ in the other half. Shapes are the *_smoke presets'
  (4 blocks x 128, seq 128, 32 x 128 tokens per step). The token budget, its arithmetic and the measured step
  times are in DESIGN 11.
- `gpu`: one GPU node (8 GPUs through `--launcher "deepspeed --num_gpus 8"`), the presets at the papers' shapes and
  a corpus of your own (`-- --data-path ... --tokenizer ...`; the embedded corpus has only 1M tokens).
  `python -m wider.study plan STUDY --scale gpu` states the expected wall time from wider.info's FLOPs.

Overrides are `section.field=value` for the run config (`model.num_experts=8`, as the recipes' `--num-experts 8`)
or `moe.key=value` for the ds_config "moe" block (`--ds-set moe.key=value`). An arm that needs a config field this
version of wider lacks (`requires`) is listed as skipped, never silently dropped.

A matching rule (`Match`) says which quantity the arms share: computed from wider.info's counters for every arm
(`tests/test_study.py` checks each rule at both scales) and printed above the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class Arm:
    name: str
    preset: str
    overrides: tuple = ()  # "model.num_experts=8", "moe.capacity_factor=1.0"
    label: str = ""  # what the arm is, for the table
    family: str = ""  # learning-rate family (arms of a family share a tuned rate); "" = the model's arch
    requires: tuple = ()  # config fields the arm needs ("model.moe_router"); absent in this version -> skipped


@dataclass(frozen=True)
class Match:
    """Arms `arms` (all when empty) have equal `quantity` within `rel_tol` (0 = exactly). Quantities: the keys of
    wider.info.describe (params_total, params_active, params_non_embedding, total_tokens, ...), model fields
    (num_layers, hidden_size), and those of wider.study.runner.QUANTITIES (active_less_routing,
    expansion_rate)."""

    quantity: str
    what: str
    arms: tuple = ()
    rel_tol: float = 0.0


@dataclass(frozen=True)
class Scale:
    arms: tuple
    tokens: float  # training tokens of every arm (rounded to whole steps)
    seeds: int
    flags: tuple = ()  # recipe flags of every arm (shape of a step, evaluation)
    vocab: Optional[int] = None  # the embedded corpus re-tokenized at this vocabulary; None = the presets' data
    needs_data: bool = False  # the user's corpus must be given after -- (--data-path, --tokenizer)
    warmup: float = 0.05  # warmup steps / steps
    min_lr_ratio: float = 0.1  # min_lr / lr at the end of the cosine
    evals: int = 10  # periodic evaluations (the curve's points)
    saves: int = 4  # checkpoints per run (an interrupted arm loses at most 1 / saves of its steps)
    note: str = ""


@dataclass(frozen=True)
class Study:
    name: str
    claim: str  # the paper's claim the study tests
    reference: str  # the arm every other is compared with
    matched: str  # one sentence: what the arms share, as the paper matched them
    matches: tuple
    scales: dict = field(default_factory=dict)


# --- the two scales' common settings ---------------------------------------------------------------------------

CPU_VOCAB = 2048
CPU_FLAGS = ("--seq-length", "128", "--global-batch-size", "32", "--micro-batch-size", "16", "--eval-iters", "4",
             "--log-interval", "10")
# GPU: the presets' batches and sequence lengths; a bounded final evaluation (a large corpus's whole validation split
# would take long) and the presets' periodic evaluation size.
GPU_FLAGS = ("--final-eval-iters", "40", "--log-interval", "10")
CPU_TOKENS = 0.5e6  # DESIGN 11: about 0.45 epochs of the 2048-piece corpus's training split, 122 steps
CPU_SEEDS = 3
GPU_SEEDS = 3


def _cpu(arms, **kw) -> Scale:
    return Scale(arms=tuple(arms), tokens=kw.pop("tokens", CPU_TOKENS), seeds=CPU_SEEDS, flags=CPU_FLAGS,
                 vocab=CPU_VOCAB, **kw)


def _gpu(arms, tokens: float, **kw) -> Scale:
    return Scale(arms=tuple(arms), tokens=tokens, seeds=GPU_SEEDS, flags=GPU_FLAGS, needs_data=True, saves=10, **kw)


# --- 1. WideNet (Xue et al. 2022; DESIGN 5.4) -------------------------------------------------------------------

def _widenet_arms(dense: str, widenet: str) -> list:
    return [
        Arm("dense", dense, label="dense GPT: every block its own attention and FFN"),
        # ALBERT-style: arch widenet with num_experts 0 is one attention and one dense FFN (the dense model's width)
        # shared by every block, each block keeping its LayerNorm pair (model.share_norms false): WideNet without
        # experts.
        Arm("albert", widenet, ("model.num_experts=0",), requires=("model.share_norms",),
            label="ALBERT-style: every block shared, dense FFN, per-block LayerNorms"),
        Arm("widenet_e4", widenet, ("model.num_experts=4",), label="WideNet: shared attention and MoE, 4 experts"),
        Arm("widenet_e8", widenet, ("model.num_experts=8",), label="WideNet: 8 experts top-2"),
    ]


WIDENET = Study(
    name="widenet",
    claim="WideNet beats the dense model and ALBERT-style sharing with fewer unique parameters than the dense model "
          "(Xue et al. 2022: WideNet-L 79.5 vs ViT-L 77.5 ImageNet top-1 at 40M vs 305M parameters; with 8 experts "
          "85.2 vs BERT 85.0 and ALBERT 84.0 on GLUE/SQuAD)",
    reference="dense",
    matched="the same depth, width, attention, sequence and tokens (WideNet-B against ViT-B); the unique parameters "
            "differ, which is the point",
    matches=(Match("num_layers", "depth"), Match("hidden_size", "width"), Match("total_tokens", "training tokens")),
    scales={
        "cpu": _cpu(_widenet_arms("gpt_smoke", "widenet_smoke")),
        # WideNet-B's experts are 4096 wide (the official configs); the dense model and ALBERT keep ViT-B's 3072.
        "gpu": _gpu(_widenet_arms("gpt_125m", "widenet_b"), tokens=2e9),
    },
)


# --- 2. Granularity (Krajewski et al. 2024; DESIGN 5.5) --------------------------------------------------------

NO_BIAS = "model.add_bias_linear=false"


def _granularity_arms(dense: Arm, fine: str, E: int, Gs=(1, 2, 4, 8)) -> list:
    # Biases off in every arm (the experts have none), so that every arm's active parameters equal the dense model's
    # up to the routing parameters (routers, expert choice's output LayerNorm), which the paper does not count.
    arms = [dense]
    for G in Gs:
        arms.append(Arm(f"G{G}", fine, (NO_BIAS, f"model.granularity={G}", f"model.expansion_rate={E}"),
                        label=f"fine-grained MoE G {G}, E {E}: {G * E} experts of d_ff / {G}, token choice top-{G}",
                        family="fine_token_choice"))
    for G in Gs:
        arms.append(Arm(f"G{G}_ec", fine, (NO_BIAS, f"model.granularity={G}", f"model.expansion_rate={E}",
                                           "model.moe_router=expert_choice"), requires=("model.moe_router",),
                        label=f"fine-grained MoE G {G}, E {E}, expert choice", family="fine_expert_choice"))
    return arms


_FINE_ARMS = tuple(f"G{G}{r}" for G in (1, 2, 4, 8) for r in ("", "_ec"))
GRANULARITY = Study(
    name="granularity",
    claim="at a fixed expansion rate and fixed active parameters the loss falls as the granularity G grows (Krajewski "
          "et al. 2024, eq. 9: the g / G^gamma term), and every MoE arm beats the dense model",
    reference="dense",
    matched="active parameters per token (the dense FFN = G x k experts of width d_ff / G, routers aside, which the "
            "paper does not count), the expansion rate E, depth, width and tokens; biases off in every arm",
    matches=(Match("active_less_routing", "active parameters less the routing parameters"),
             Match("expansion_rate", "expansion rate E", arms=_FINE_ARMS),
             Match("total_tokens", "training tokens")),
    scales={
        "cpu": _cpu(_granularity_arms(Arm("dense", "gpt_smoke", (NO_BIAS,), label="dense GPT 4 x 128, FFN 512"),
                                      "fine_smoke", E=4)),
        # The paper's grid point 512 x 8 (DESIGN 5.5) at its expansion rate 64; the dense arm is that shape as a dense
        # GPT (gpt_125m's recipe at fine_512x8's shape, batch and learning rate).
        "gpu": _gpu(_granularity_arms(
            Arm("dense", "gpt_125m", (NO_BIAS, "model.num_layers=8", "model.hidden_size=512",
                                      "model.num_attention_heads=8", "model.seq_length=1024",
                                      "train.global_batch_size=256", "train.lr=2e-4"),
                label="dense GPT 8 x 512, FFN 2048"), "fine_512x8", E=64), tokens=4e9),
    },
)


# --- 3. MoEUT (Csordas et al. 2024; DESIGN 5.6) ----------------------------------------------------------------

# The *_dense presets' rule (wider/presets.py _moeut_dense): MoEUT's depth and width, ReLU, no biases, untied
# embeddings, MoEUT's recipe, and the FFN width that brings the total parameter count to MoEUT's. At the CPU shape
# (moeut_smoke) that width is 2128: 2,967,808 against 2,966,784 parameters (+0.03%, any vocabulary: both embed it
# untied).
MOEUT = Study(
    name="moeut",
    claim="MoEUT matches or beats a dense transformer of the same parameter count (Csordas et al. 2024)",
    reference="dense",
    matched="total parameters (the *_dense presets: within 0.2%), depth, width and tokens; MoEUT applies fewer "
            "parameters per token",
    matches=(Match("params_total", "total parameters", rel_tol=0.005), Match("num_layers", "depth"),
             Match("total_tokens", "training tokens")),
    scales={
        "cpu": _cpu([
            Arm("dense", "gpt_smoke", ("model.ffn_hidden_size=2128", "model.activation=relu", NO_BIAS,
                                       "model.tie_embeddings=false", "train.weight_decay=0.01", "train.clip_grad=0.25"),
                label="dense GPT 4 x 128, ReLU FFN 2128, untied, MoEUT's recipe"),
            Arm("moeut", "moeut_smoke", label="MoEUT 4 layers (A B A B) x 128, sigma-MoE 32 x 128 top-4, SwitchHead"),
        ]),
        "gpu": _gpu([Arm("dense", "moeut_dense_126m", label="dense GPT 18 x 768, FFN 2560 (125.59M)"),
                     Arm("moeut", "moeut_126m", label="MoEUT-126M")], tokens=2e9),
    },
)


# --- 4. UMoE (Yang et al. 2025; DESIGN 5.7) --------------------------------------------------------------------

def _umoe_arms(umoe: str, att_experts: int, dense_ffn: int, dense: Arm) -> list:
    return [
        dense,
        Arm("ffn_moe", umoe, ("model.umoe_mode=ffn", "model.head_dim=None"),
            label="FFN-MoE: ordinary attention, the same experts in the FFN only"),
        Arm("umoe_att", umoe, ("model.umoe_mode=attention", f"model.num_experts={att_experts}",
                               f"model.ffn_hidden_size={dense_ffn}"),
            label=f"UMoE-Att: pre-mixing attention MoE ({att_experts} experts), dense FFN {dense_ffn}"),
        Arm("umoe", umoe, label="UMoE: attention and FFN share one expert bank per layer"),
    ]


# The paper's matching (the official configurations, DESIGN 5.7): UMoE, UMoE-Att and FFN-MoE at about equal total
# parameters (UMoE-Att has fewer experts beside its dense FFN: 116 against 128), the dense GPT at the same shape
# with the FFN width the MoE FFN activates, (top-k + shared) x expert width (3072 = 16 x 192). At umoe_smoke's
# shape: (4 + 1) x 64 = 320, and 12 experts bring UMoE-Att closest to UMoE's total (-1.7%; 13: +2.2%).
UMOE = Study(
    name="umoe",
    claim="UMoE beats FFN-only MoE, attention-only MoE (UMoE-Att) and the dense model at equal parameters (Yang et al. "
          "2025)",
    reference="ffn_moe",
    matched="total parameters of the three MoE models (within 5%; the official configurations within 1.3%), the dense "
            "model at UMoE's shape and active parameters (within 5%), depth, width and tokens",
    matches=(Match("params_total", "total parameters of the MoE models", arms=("umoe", "ffn_moe", "umoe_att"),
                   rel_tol=0.05),
             Match("params_active", "active parameters of UMoE and the dense model", arms=("umoe", "dense"),
                   rel_tol=0.05),
             Match("num_layers", "depth"), Match("total_tokens", "training tokens")),
    scales={
        "cpu": _cpu(_umoe_arms("umoe_smoke", 12, 320, Arm(
            "dense", "gpt_smoke", ("model.ffn_hidden_size=320", "model.activation=silu", "model.normalization=RMSNorm",
                                   NO_BIAS, "model.tie_embeddings=false", "train.weight_decay=0.01"),
            label="dense GPT 4 x 128, SiLU FFN 320, RMSNorm, UMoE's recipe")), min_lr_ratio=0.0),
        "gpu": _gpu([Arm("dense", "umoe_small_dense", label="small-GPT: 12 x 768, SiLU FFN 3072"),
                     Arm("ffn_moe", "umoe_small_ffn", label="small FFN-MoE: 128 experts x 192 top-15 + 1 shared"),
                     Arm("umoe_att", "umoe_small_att", label="small UMoE-Att: 116 experts, dense FFN 3072"),
                     Arm("umoe", "umoe_small", label="small UMoE: 128 experts x 192 shared by attention and FFN")],
                    tokens=5e9, min_lr_ratio=0.0),
    },
)


# --- the smoke study: one small arm, for the tests and the README (under a minute) -----------------------------

SMOKE = Study(
    name="smoke",
    claim="(none: a test of the runner, the table and the plots)",
    reference="dense",
    matched="(one arm)",
    matches=(Match("total_tokens", "training tokens"),),
    scales={"cpu": Scale(
        arms=(Arm("dense", "gpt_smoke", ("model.num_layers=2", "model.hidden_size=64"), label="dense GPT 2 x 64"),),
        tokens=20 * 8 * 64, seeds=2, vocab=CPU_VOCAB, evals=4, saves=2,
        flags=("--seq-length", "64", "--global-batch-size", "8", "--micro-batch-size", "8", "--eval-iters", "1",
               "--final-eval-iters", "2", "--log-interval", "5"))},
)

STUDIES = {s.name: s for s in (WIDENET, GRANULARITY, MOEUT, UMOE, SMOKE)}


def get(name: str) -> Study:
    if name not in STUDIES:
        import difflib

        close = difflib.get_close_matches(name, STUDIES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown study {name!r}{hint} Available: {', '.join(STUDIES)}")
    return STUDIES[name]
