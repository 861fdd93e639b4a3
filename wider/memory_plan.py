"""Per-rank memory plan: model states by ZeRO stage, activations with and without recompute, logits, all-to-all.

    python -m wider.info --preset widenet_b --plan --world-size 8 --ds-set moe.ep_size=4
    python -m wider.info --preset gpt_350m --plan --world-size 8 --tensor-parallel 2 --json

The first prints the layout and assumptions, then one table: a row per item, a column per ZeRO stage (the
run's own marked *) in human units, and the run's exact bytes; then the formulas. Abridged:

    memory plan per rank | preset widenet_b | arch widenet | world 8 = tp 1 x dp 8 | ep 4 (expert-data-parallel 2)
    assumptions: bf16 weights and activations (cuda), bf16 gradients, ZeRO stage 1 (from ...), ...
                                               ZeRO-0      ZeRO-1*       ZeRO-2     bytes (ZeRO-1)
    parameters (bf16)                       40.02 MiB    40.02 MiB    40.02 MiB         41,966,592
    gradients (bf16)                        40.02 MiB    40.02 MiB     9.50 MiB         41,966,592
    fp32 master weights                     80.04 MiB    19.01 MiB    19.01 MiB         19,928,832
    Adam m + v (fp32)                      160.09 MiB    38.01 MiB    38.01 MiB         39,857,664
    model states                           320.18 MiB   137.06 MiB   106.54 MiB        143,719,680
    activations, recompute none*            10.58 GiB    10.58 GiB    10.58 GiB     11,356,880,896
    activations, recompute full              1.21 GiB     1.21 GiB     1.21 GiB      1,294,909,440
    logits + loss (fp32)                   500.00 MiB   500.00 MiB   500.00 MiB        524,288,000
    all-to-all buffers (EP)                192.00 MiB   192.00 MiB   192.00 MiB        201,326,592
    gradients during backward (bucket)      40.02 MiB   953.67 MiB   953.67 MiB      1,000,000,000
    optimizer step: grads + temporaries    179.74 MiB    36.00 MiB    36.00 MiB         37,748,736
    peak at backward start                  11.57 GiB    12.28 GiB    12.28 GiB     13,184,248,576
    peak at optimizer step                 459.90 MiB   133.04 MiB   133.04 MiB        139,501,824
    total (recompute none)                  11.57 GiB    12.28 GiB    12.28 GiB     13,184,248,576

`--json` puts the same numbers under "plan" (`build` returns that dict). Nothing is allocated and no process
group is created; the layout is checked by the code a run uses (`wider.models.validate(cfg, world_size)`: tp divides
the world, the batch splits; `wider.ds_config.build`: ZeRO 0-2, the "moe" block, ep dividing the experts and
the data-parallel size), so an impossible layout fails with the run's own message.

What is counted (bytes per rank):
- parameters: the dense part replicated over data parallelism and split by tensor parallelism (norms,
  row-parallel biases and learned positions whole); experts split by expert parallelism (E / ep local experts
  per MoE layer); WideNet's shared attention and MoE counted once (one set of weights, called by every block).
- ZeRO (Rajbhandari et al. 2020) as DeepSpeed 0.19.8 implements it: stage 1 partitions the fp32 optimizer
  states (Adam m and v, the fp32 master copy) over the data-parallel group, stage 2 the gradients as well;
  dense tensors over the dp ranks, expert tensors over the expert-data-parallel group (the dp / ep ranks that
  hold the same experts). A master copy exists with bf16 at every stage and, in fp32, with ZeRO >= 1:
  DeepSpeed's ZeRO optimizer steps a flat fp32 clone of the rank's partition even when the model is fp32
  (stage_1_and_2.py; one extra weight copy appears at engine set-up).
- activations: what the forward keeps for the backward of one micro-batch (T = micro_batch x seq tokens),
  counted tensor by tensor on the built models (`block_activations`; tests/test_plan.py checks the formula
  against autograd's saved tensors). The reference is Korthikanti et al. 2022, sbh(34 + 5as/h) bytes per layer
  in 16-bit; here the attention core is SDPA (flash kernels keep no s x s scores) and dropout is off (no
  masks), so the s^2 term is absent and a dense block keeps a T (3h + 7h/tp + 2f/tp) bytes, a = 2 (bf16) or
  4 (fp32). MoE blocks: router logits and probabilities (fp32), the dispatched rows (R = T k on one rank, at
  most E x capacity with ep > 1) and the expert hidden layer (2 R f_expert).
- logits: megatron's vocab-parallel cross entropy turns the fp32 logits into the softmax in place and writes
  the gradient into the same tensor, so one fp32 [T, V / tp] tensor, not two.
- all-to-all: with ep > 1 the rows sent and received and the outputs on their way back, one MoE call at a time.
- gradients during the backward: ZeRO >= 1 writes them into DeepSpeed's reduce bucket (reduce_bucket_size
  elements, 5e8 by default, two with overlap_comm), which CUDA allocates whole (`backward_gradient_bytes`).
- the optimizer step: gradients being flattened to fp32 plus AdamW's temporaries, group by group
  (`optimizer_step_bytes`).
- total = max(start of the backward: parameters + master + Adam + gradients during the backward + activations
  + logits + all-to-all; optimizer step: parameters + master + Adam + the step's gradients and temporaries).
  Counting all gradient memory at the backward start is close for WideNet (the shared layer's gradients appear
  at the first backward call) and an upper bound by at most one gradient copy otherwise.
bf16 is taken to mean a CUDA run and fp32 a CPU run (the repository's ds_config 'auto'): on CUDA a buffer counts
whole, on CPU only its pages that are written. Not counted: the framework's own footprint (CUDA context, or
Python + torch + DeepSpeed + megatron on CPU, about 0.45 GiB), allocator caching and fragmentation.
Checked against real runs: on CPU (fp32, ZeRO 0/1/2, recompute on and off; tests/test_plan.py runs two) within
6% of the resident-memory peak; on one H100 (bf16: WideNet ZeRO-0/1 with and without recompute, gpt_moe ZeRO-2
with capacity 1.25, dense swiglu GPT ZeRO-1; 8k-16k tokens per micro-batch, 3-18 GiB) within 4% of
torch.cuda.max_memory_allocated over the memory held before the model was built.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

from wider.config import RunConfig

STAGES = (0, 1, 2)
MOE_GROUP_MAX = 178956971  # deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer's default


@dataclass(frozen=True)
class PlanLayout:
    """The parallel layout and numerics a run with this config and world size would have."""

    world_size: int
    tp: int
    dp: int
    ep: int
    zero_stage: int
    bf16: bool
    grad_bytes: int  # DeepSpeed accumulates gradients in the model dtype unless data_types.grad_accum_dtype says
    ds_path: str
    bucket_elements: int = 0  # ZeRO >= 1 gradient bucket: reduce_bucket_size x (2 with overlap_comm), 0 = none

    @property
    def device(self) -> str:
        """The repository's convention (ds_config 'auto'): bf16 on CUDA, fp32 on CPU. It decides whether
        buffers count whole (the CUDA allocator hands out whole blocks) or by the pages written (CPU)."""
        return "cuda" if self.bf16 else "cpu"

    @property
    def edp(self) -> int:
        """Expert-data-parallel size: ranks holding the same experts, over which their ZeRO state is split."""
        return self.dp // self.ep

    @property
    def act_bytes(self) -> int:
        return 2 if self.bf16 else 4

    @property
    def dtype(self) -> str:
        return "bf16" if self.bf16 else "fp32"


def resolve_layout(cfg: RunConfig, world_size: int):
    """(PlanLayout, MoESettings or None) for cfg on world_size ranks; raises ConfigError for impossible layouts.

    The checks are the run's own: wider.models.validate(cfg, world_size) (tp divides the world, batch sizes) and
    ds_config.build (ZeRO stage, the "moe" block, ep dividing num_experts and the data-parallel size)."""
    from wider import ds_config
    from wider.config import ConfigError
    from wider.models import validate

    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"--world-size must be a positive integer, got {world_size!r}")
    validate(cfg, world_size)
    tp = cfg.train.tensor_parallel
    dp = world_size // tp
    path = ds_config.resolve_path(cfg.train.ds_config, moe=cfg.model.num_experts > 0)
    ds = ds_config.build(cfg, dp, path)
    moe = ds_config.moe_settings(ds, path) if cfg.model.num_experts else None
    bf16 = ds_config.uses_bf16(ds)
    accum = str(ds.get("data_types", {}).get("grad_accum_dtype") or ("bf16" if bf16 else "fp32")).lower()
    grad_bytes = 4 if accum in ("fp32", "float32", "float") else 2
    stage = ds_config.zero_stage(ds)
    zero = ds.get("zero_optimization", {})
    # DeepSpeed 0.19.8's ZeroConfig defaults: contiguous_gradients true, reduce_bucket_size 5e8 elements,
    # overlap_comm only at stage 3 (a second bucket when on: stage_1_and_2.py setup_buckets).
    bucket = 0
    if zero.get("contiguous_gradients", True):
        bucket = int(float(zero.get("reduce_bucket_size", 5e8))) * (2 if zero.get("overlap_comm", False) else 1)
    return (PlanLayout(world_size=world_size, tp=tp, dp=dp, ep=moe.ep_size if moe else 1, zero_stage=stage, bf16=bf16,
                   grad_bytes=grad_bytes, ds_path=path, bucket_elements=bucket), moe)


# --- parameters on one rank -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalParams:
    """Parameters one rank holds: dense (after TP) and experts (after EP), and the unique totals."""

    dense: int
    experts: int
    total_unique: int  # the whole model, every shared weight once
    expert_layers: int  # MoE layers with their own experts (WideNet: 1, the shared one)
    local_experts: int
    dense_vectors: int  # 1-D dense parameters (norms, biases): the optimizer's no-weight-decay group
    largest: int  # elements of the largest single tensor on the rank (stacked experts are one tensor)
    expert_tensors: tuple = ()  # elements of each expert tensor on the rank, in parameter order

    @property
    def total(self) -> int:
        return self.dense + self.experts

    def optimizer_groups(self) -> list[tuple[int, bool]]:
        """(elements, is_expert) per optimizer parameter group, in the order DeepSpeed steps them:
        wider.optim.make_optimizer's decay and no-decay groups, then the expert groups that
        DeepSpeed's split_params_into_different_moe_groups_for_optimizer appends, which packs expert tensors
        greedily into groups of at most MOE_GROUP_MAX elements (the tensors of several layers, or one)."""
        groups = [(self.dense - self.dense_vectors, False), (self.dense_vectors, False)]
        current = 0
        for n in self.expert_tensors:
            if current and current + n > MOE_GROUP_MAX:
                groups.append((current, True))
                current = 0
            current += n
        groups.append((current, True))
        return [g for g in groups if g[0] > 0]


def local_params(cfg: RunConfig, vocab: int, tp: int, ep: int) -> LocalParams:
    from wider.models import ARCHITECTURES
    from wider.models.gpt import norm_params
    from wider.models.gpt_moe import expert_params, is_moe_block

    m = cfg.model
    pc = ARCHITECTURES[m.arch].count(cfg, vocab)
    total, padded = pc.total, pc.extra.get("padded_vocab", vocab)
    h, E = m.hidden_size, m.num_experts
    fc1 = 2 * m.ffn_size if m.activation == "swiglu" else m.ffn_size
    if E:
        # WideNet's blocks all call one MoE: its experts exist once (DESIGN 5.4).
        moe_blocks = sum(is_moe_block(m, i) for i in range(m.num_layers))
        layers = 1 if m.arch == "widenet" else moe_blocks
        experts_all = layers * E * expert_params(m)
    else:
        moe_blocks, layers, experts_all = 0, 0, 0
    dense_all = total - experts_all
    attentions = 1 if m.arch == "widenet" else m.num_layers
    dense_ffns = m.num_layers - moe_blocks
    norms = (2 * m.num_layers + 1) * norm_params(m)
    biases = (attentions * 4 * h + dense_ffns * (fc1 + h)) if m.add_bias_linear else 0
    # Under TP every weight matrix (embedding and output layer included: vocab-parallel) is split; norms,
    # row-parallel biases (added after the reduction) and learned positions are whole on every rank. Only
    # the dense GPT can have tp > 1 (the MoE architectures refuse it: validate_moe_common).
    replicated = norms + (m.num_layers * 2 * h if m.add_bias_linear and m.arch == "gpt" else 0)
    if m.position_embedding == "learned_absolute":
        replicated += m.seq_length * h
    replicated = min(replicated, dense_all)
    dense = replicated + -(-(dense_all - replicated) // tp)
    local = E // ep if E else 0
    fc1_e = 2 * m.expert_ffn_size if m.activation == "swiglu" else m.expert_ffn_size
    largest = max(padded * h // tp, 3 * h * h // tp, h * fc1 // tp if dense_ffns else 0,
                  local * h * max(fc1_e, m.expert_ffn_size) if E else 0)
    experts = (local * h * fc1_e, local * m.expert_ffn_size * h) * layers if E else ()  # w1_LDF, w2_LFD per layer
    return LocalParams(dense=dense, experts=sum(experts), total_unique=total, expert_layers=layers,
                       local_experts=local, dense_vectors=norms + biases, largest=largest, expert_tensors=experts)


def model_states(p: LocalParams, lay: PlanLayout, stage: int) -> dict:
    """Bytes of parameters, gradients, fp32 master copy and Adam m + v on one rank under ZeRO `stage`.

    Dense tensors are partitioned over dp ranks, expert tensors over dp / ep ranks (DeepSpeed's
    expert-data-parallel group); stage 1 partitions master and Adam states, stage 2 also gradients."""
    w = lay.act_bytes  # the model's parameter dtype is the activation dtype (bf16 engine or fp32)

    def part(on: bool) -> float:  # elements on this rank after partitioning (or not)
        return p.dense / lay.dp + p.experts / lay.edp if on else p.total

    has_master = lay.bf16 or stage >= 1
    return {
        "parameters": int(w * p.total),
        "gradients": int(round(lay.grad_bytes * part(stage >= 2))),
        "master_weights": int(round(4 * part(stage >= 1))) if has_master else 0,
        "adam_states": int(round(8 * part(stage >= 1))),
    }


def backward_gradient_bytes(grads: int, lay: PlanLayout, stage: int) -> int:
    """Gradient memory while the backward runs. ZeRO-0: param.grad (the gradients row). ZeRO >= 1 with
    contiguous gradients: DeepSpeed copies each gradient into its reduce bucket (reduce_bucket_size elements,
    two with overlap_comm) and points param.grad there; on CUDA the bucket is allocated whole whatever fills it,
    on CPU only the pages gradients are written to become resident, so there the gradients row stands.
    Counted as the larger of the two: the stage-2 partition (or stage-1 flat copy) is filled when the bucket
    is reduced, at the end of the backward for models smaller than the bucket."""
    if stage >= 1 and lay.device == "cuda" and lay.bucket_elements:
        return max(grads, lay.bucket_elements * lay.grad_bytes)
    return grads


def optimizer_step_bytes(p: LocalParams, lay: PlanLayout, stage: int) -> int:
    """Gradients and temporaries alive during the optimizer step (beyond parameters, master and Adam states).

    ZeRO 1 / 2 and bf16 (DeepSpeed's flat fp32 optimizer, stage_1_and_2.py step()): group by group, the
    rank's gradient partition of the group is flattened and cast to fp32 (4 G), its own gradients are freed,
    and torch's AdamW computes sqrt(v) / bias_correction into two fp32 temporaries (8 G): 12 G for the group
    being stepped plus the gradients of the groups not stepped yet. At stage 1 the gradients held after the
    backward are already the partition (DeepSpeed keeps only the averaged partition, not param.grad).
    ZeRO 0: every gradient stays, and before the step wider's loop computes the global gradient norm itself
    (parallel.global_grad_norm: an fp64 copy of each gradient and its square, 16 bytes per element of the
    largest tensor); torch's AdamW then needs two temporaries of the largest tensor (8 bytes per element)."""
    groups = [(n / lay.edp if expert else n / lay.dp) if stage >= 1 else n for n, expert in p.optimizer_groups()]
    g = lay.grad_bytes
    flat = 0.0
    if stage >= 1 or lay.bf16:
        for i, n in enumerate(groups):
            flat = max(flat, g * sum(groups[i + 1:]) + 12 * n)
    if stage == 0:
        flat = max(flat, g * p.total + 16 * p.largest)
    return int(round(flat))


# --- activations -----------------------------------------------------------------------------------------


def moe_rows(cfg: RunConfig, lay: PlanLayout, moe, tokens: int) -> int:
    """Rows an MoE call feeds this rank's experts. One rank: all T * k assignments are gathered (fixed
    shapes, dropped rows sorted last, wider.moe.layer). With ep > 1 only the kept rows travel: at most
    E * capacity (capacity = ceil(k * cf * T / E), at least min_capacity); dropless: T * k, which assumes
    a balanced router (a rank can receive up to ep times as many in the worst case)."""
    from wider.moe.dispatch import capacity

    m = cfg.model
    assignments = tokens * m.moe_top_k
    if lay.ep == 1 or moe is None:
        return assignments
    cap = capacity(tokens, m.moe_top_k, m.num_experts, moe.capacity_factor_for(True), moe.min_capacity)
    return assignments if cap is None else min(assignments, m.num_experts * cap)


def hidden_factor(m, expert: bool) -> int:
    """FFN hidden tensors kept per row, in units of the FFN width f (counted on the built models): gelu /
    relu keep fc1's output and the activation (2f). swiglu in wider's experts keeps fc1's [value | gate]
    output (2f), silu(gate) and the product (4f); megatron's unfused gated MLP keeps one f-wide tensor more
    (5f)."""
    if m.activation != "swiglu":
        return 2
    return 4 if expert else 5


def block_activations(cfg: RunConfig, lay: PlanLayout, moe_block: bool, rows: int) -> dict:
    """Bytes a block keeps for its backward, one micro-batch on one rank (a = activation bytes, T tokens).

    Counted on the built models (torch saved-tensor hooks) and written out here:
    - attention: LayerNorm output and the residual input (a T h each, replicated under TP); the fused QKV
      output (3 a T h / tp: V stays a view of it), the rotated Q and K and the SDPA output (3 a T h / tp),
      the output projection's input (a T h / tp); fp32 LayerNorm statistics (8 T) and the flash kernel's
      log-sum-exp (4 T heads / tp).
    - dense FFN: second LayerNorm output (a T h), fc1 output and activation (2 a T f / tp; 5 with swiglu).
    - MoE FFN (tp = 1): second LayerNorm output (a T h); the expert hidden layer and its activation
      (2 a R f_expert; 4 with swiglu); with ep > 1 also the gathered expert rows (a R h) and the expert
      outputs on their way back (a T k h): at ep 1 the gather and the combine are fused into the grouped
      GEMMs' autograd nodes, which keep neither (wider.moe.dispatch.gather_mm / mm_combine); router
      logits and probabilities in fp32 (8 T E), an fp32 copy of the router input under bf16 (4 T h), and the
      dispatch plan's indices and weights (37 T k: int64 ids, rows, sources and tokens, fp32 weights, bool).
    Sum for a dense block: a T (3h + 7h/tp + 2f/tp)."""
    m = cfg.model
    T, h, t, a = cfg.train.micro_batch_size * m.seq_length, m.hidden_size, lay.tp, lay.act_bytes
    out = {"attention": a * T * (2 * h + 7 * h // t) + 8 * T + 4 * T * (m.num_attention_heads // t)}
    if moe_block:
        k, E, f = m.moe_top_k, m.num_experts, m.expert_ffn_size
        out["ffn"] = a * T * h + hidden_factor(m, True) * a * rows * f
        if lay.ep > 1:
            out["ffn"] += a * rows * h + a * T * k * h
        out["router"] = 8 * T * E + (4 * T * h if a != 4 else 0) + 37 * T * k
    else:
        out["ffn"] = a * T * h + hidden_factor(m, False) * a * T * m.ffn_size // t
    out["total"] = sum(out.values())
    return out


@contextlib.contextmanager
def kept_for_backward(exclude=()):
    """Count what autograd keeps for the backward inside the block: yields {storage address: bytes} of the distinct
    storages saved, leaving out those of the tensors in `exclude` (parameters, inputs: memory that exists anyway).
    sum(d.values()) is the activation memory the formulas above estimate (tests/test_plan.py checks them with it;
    benchmarks/saved_activations.py reports it)."""
    import torch

    skip = {t.untyped_storage().data_ptr() for t in exclude}
    kept: dict = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            kept.setdefault(st.data_ptr(), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield kept


def activations(cfg: RunConfig, lay: PlanLayout, moe, recompute: str) -> dict:
    """Activation bytes of one micro-batch (logits excluded: see logits_bytes).

    recompute 'none': every block's saved tensors. 'full' (megatron uniform, one block per checkpoint,
    non-reentrant): only each block's input (a T h) is kept, plus one block's working set while that block
    is recomputed in the backward."""
    from wider.models.gpt_moe import is_moe_block

    m = cfg.model
    T, h, a = cfg.train.micro_batch_size * m.seq_length, m.hidden_size, lay.act_bytes
    rows = moe_rows(cfg, lay, moe, T) if m.num_experts else 0
    kinds = [bool(m.num_experts) and (m.arch == "widenet" or is_moe_block(m, i)) for i in range(m.num_layers)]
    per = {kind: block_activations(cfg, lay, kind, rows) for kind in set(kinds)}
    # Outside the blocks: the final LayerNorm's input and output, its statistics, token ids / labels / mask.
    outside = 2 * a * T * h + 8 * T + 17 * T
    if cfg.data.eod_mask:
        outside += cfg.train.micro_batch_size * m.seq_length ** 2  # the explicit [b, 1, s, s] bool mask
    n_moe = sum(kinds)
    if recompute == "none":
        blocks = sum(per[kind]["total"] for kind in kinds)
        detail = {"blocks": blocks, "moe_blocks": n_moe, "dense_blocks": len(kinds) - n_moe}
    else:
        kept = m.num_layers * a * T * h
        working = max(v["total"] for v in per.values())
        blocks = kept + working
        detail = {"block_inputs": kept, "one_block_recomputed": working}
    return {**detail, "outside_blocks": outside, "total": blocks + outside,
            "per_block": {("moe" if kind else "dense"): v for kind, v in per.items()}}


def logits_bytes(cfg: RunConfig, lay: PlanLayout, padded_vocab: int) -> int:
    """megatron's vocab-parallel cross entropy: the fp32 softmax over this rank's vocabulary slice, kept for
    the backward, which writes the gradient into it in place (so one copy, not two). Under bf16 the bf16
    logits exist beside it only inside the forward, before any activation is freed by the backward."""
    T = cfg.train.micro_batch_size * cfg.model.seq_length
    return 4 * T * (padded_vocab // lay.tp)


def all_to_all_bytes(cfg: RunConfig, lay: PlanLayout, moe) -> int:
    """Expert parallelism: per MoE call the gathered rows to send and the rows received, then the expert
    outputs on their way back (send and receive again): 4 a R h, transient, one MoE call at a time."""
    if lay.ep == 1 or not cfg.model.num_experts:
        return 0
    T = cfg.train.micro_batch_size * cfg.model.seq_length
    return 4 * lay.act_bytes * moe_rows(cfg, lay, moe, T) * cfg.model.hidden_size


# --- the plan --------------------------------------------------------------------------------------------


def build(cfg: RunConfig, world_size: int = 1, vocab: Optional[int] = None) -> dict:
    """The memory plan as a JSON-ready dict (bytes per rank). Raises ConfigError for impossible layouts."""
    from wider.models import ARCHITECTURES

    if vocab is None:
        from wider.data import planning_vocab_size

        vocab, _ = planning_vocab_size(cfg)
    lay, moe = resolve_layout(cfg, world_size)
    m, t = cfg.model, cfg.train
    pc = ARCHITECTURES[m.arch].count(cfg, vocab)
    padded = pc.extra.get("padded_vocab", vocab)
    params = local_params(cfg, vocab, lay.tp, lay.ep)
    states = {}
    for s in STAGES:
        rows = model_states(params, lay, s)
        states[f"zero{s}"] = {**rows, "total": sum(rows.values())}
    acts = {r: activations(cfg, lay, moe, r) for r in ("none", "full")}
    logits = logits_bytes(cfg, lay, padded)
    a2a = all_to_all_bytes(cfg, lay, moe)
    step = {f"zero{s}": optimizer_step_bytes(params, lay, s) for s in STAGES}
    # Two candidate peaks: the start of the backward pass (every activation kept, counted with all gradient
    # memory: close for WideNet, whose shared weights get their gradients at the first backward call, an upper
    # bound otherwise) and the optimizer step (no activations; gradients being flattened, AdamW's temporaries).
    bucket = {f"zero{s}": backward_gradient_bytes(states[f"zero{s}"]["gradients"], lay, s) for s in STAGES}
    backward = {f"zero{s}": {f"recompute_{r}": states[f"zero{s}"]["total"] - states[f"zero{s}"]["gradients"]
                             + bucket[f"zero{s}"] + acts[r]["total"] + logits + a2a for r in acts} for s in STAGES}
    at_step = {f"zero{s}": states[f"zero{s}"]["total"] - states[f"zero{s}"]["gradients"] + step[f"zero{s}"]
               for s in STAGES}
    totals = {z: {r: max(v, at_step[z]) for r, v in by_rc.items()} for z, by_rc in backward.items()}
    T = t.micro_batch_size * m.seq_length
    return {
        "world_size": lay.world_size, "tensor_parallel": lay.tp, "data_parallel": lay.dp, "expert_parallel": lay.ep,
        "expert_data_parallel": lay.edp, "zero_stage": lay.zero_stage, "dtype": lay.dtype,
        "grad_dtype": "fp32" if lay.grad_bytes == 4 else "bf16", "ds_config": lay.ds_path,
        "micro_batch_size": t.micro_batch_size, "seq_length": m.seq_length, "tokens_per_micro_batch": T,
        "recompute": m.recompute, "padded_vocab_size": padded,
        "capacity_factor": moe.capacity_factor_for(True) if moe else None,
        "moe_rows_per_call": moe_rows(cfg, lay, moe, T) if moe else 0,
        "params_unique": params.total_unique, "params_local": params.total, "params_local_dense": params.dense,
        "params_local_experts": params.experts, "local_experts": params.local_experts,
        "model_states": states,
        "activations": {f"recompute_{r}": v for r, v in acts.items()},
        "logits_loss": logits, "all_to_all": a2a, "optimizer_step": step, "backward_gradients": bucket,
        "device": lay.device, "reduce_bucket_bytes": lay.bucket_elements * lay.grad_bytes,
        "peak_backward": backward, "peak_optimizer_step": at_step, "totals": totals,
        "total": totals[f"zero{lay.zero_stage}"][f"recompute_{m.recompute}"],
    }


def fmt_bytes(n: float) -> str:
    for unit, div in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def format_plan(p: dict, cfg: RunConfig) -> str:
    """The human-readable plan: layout, assumptions, the table, the formulas."""
    m = cfg.model
    stage, rc = p["zero_stage"], p["recompute"]
    moe = m.num_experts > 0
    lines = [
        f"memory plan per rank | preset {cfg.preset} | arch {m.arch} | world {p['world_size']} = tp "
        f"{p['tensor_parallel']} x dp {p['data_parallel']}" + (f" | ep {p['expert_parallel']} (expert-data-parallel "
                                                                f"{p['expert_data_parallel']})" if moe else ""),
        f"assumptions: {p['dtype']} weights and activations ({p['device']}), {p['grad_dtype']} gradients, ZeRO "
        f"stage {stage} (from {p['ds_config']}), AdamW with fp32 m and v; micro-batch {p['micro_batch_size']} x seq "
        f"{p['seq_length']} = {p['tokens_per_micro_batch']:,} tokens; recompute {rc}; padded vocabulary "
        f"{p['padded_vocab_size']:,}",
        f"parameters on this rank: {p['params_local']:,} of {p['params_unique']:,} unique "
        f"(dense {p['params_local_dense']:,}" + (f", experts {p['params_local_experts']:,}: {p['local_experts']} of "
                                                 f"{m.num_experts} per MoE layer" if moe else "") + ")"
        + (" | WideNet: shared attention and MoE counted once" if m.arch == "widenet" else ""),
    ]
    if moe:
        cf = p["capacity_factor"]
        lines.append(f"MoE: top-{m.moe_top_k}, capacity factor {cf if cf is not None else 'none (dropless)'}, "
                     f"{p['moe_rows_per_call']:,} expert rows per MoE call on this rank")
    head = f"{'':<36}" + "".join(f"{'ZeRO-' + str(s) + ('*' if s == stage else ''):>13}" for s in STAGES) + \
        f"{'bytes (ZeRO-' + str(stage) + ')':>19}"
    rule = "-" * len(head)

    def row(label: str, vals: list) -> str:
        return f"{label:<36}" + "".join(f"{fmt_bytes(v):>13}" for v in vals) + f"{vals[stage]:>19,}"

    states = p["model_states"]
    lines += ["", head, rule]
    names = {"parameters": f"parameters ({p['dtype']})", "gradients": f"gradients ({p['grad_dtype']})",
             "master_weights": "fp32 master weights", "adam_states": "Adam m + v (fp32)", "total": "model states"}
    for key, label in names.items():
        lines.append(row(label, [states[f"zero{s}"][key] for s in STAGES]))
    for label, v in (("activations, recompute none" + ("*" if rc == "none" else ""),
                      p["activations"]["recompute_none"]["total"]),
                     ("activations, recompute full" + ("*" if rc == "full" else ""),
                      p["activations"]["recompute_full"]["total"]),
                     ("logits + loss (fp32)", p["logits_loss"]),
                     ("all-to-all buffers (EP)", p["all_to_all"])):
        lines.append(row(label, [v] * 3))
    lines.append(row("gradients during backward" + (" (bucket)" if p["device"] == "cuda" else ""),
                     [p["backward_gradients"][f"zero{s}"] for s in STAGES]))
    lines.append(row("optimizer step: grads + temporaries", [p["optimizer_step"][f"zero{s}"] for s in STAGES]))
    lines.append(rule)
    lines.append(row("peak at backward start", [p["peak_backward"][f"zero{s}"][f"recompute_{rc}"] for s in STAGES]))
    lines.append(row("peak at optimizer step", [p["peak_optimizer_step"][f"zero{s}"] for s in STAGES]))
    lines.append(row(f"total (recompute {rc})", [p["totals"][f"zero{s}"][f"recompute_{rc}"] for s in STAGES]))
    a = 2 if p["dtype"] == "bf16" else 4
    lines += [
        "",
        f"formulas (T tokens per micro-batch, a = {a} activation bytes, R expert rows per MoE call, P params):",
        "  ZeRO-0: params a*P, grads g*P, Adam 8*P (+ fp32 master 4*P with bf16); ZeRO-1: master + Adam split over "
        "dp (dense) and dp/ep (experts); ZeRO-2: gradients too",
        "  dense block a*T*(3h + 7h/tp + 2f/tp); MoE block a*T*(10h + k*h) + a*R*(h + 2*f_e) + 8*T*E (fp32 router) "
        "+ 37*T*k (plan); swiglu: 5f dense, 4f_e experts",
        "  recompute full: a*T*h per block (its input) + one block's working set; logits 4*T*V/tp (in-place softmax)",
        "  all-to-all (ep > 1): 4*a*R*h, one MoE call at a time; optimizer step: 12 bytes per element of the "
        "group being stepped (fp32 flat grad + AdamW temporaries) + the grads of groups not yet stepped",
        f"  gradients during backward: ZeRO >= 1 on CUDA at least DeepSpeed's reduce bucket "
        f"({fmt_bytes(p['reduce_bucket_bytes'])}, allocated whole)",
        "  total = max(backward start: params + master + Adam + gradients during backward + activations + logits + "
        "all-to-all, optimizer step: params + master + Adam + step)",
        "  not counted: framework / CUDA context, allocator caching and fragmentation",
    ]
    return "\n".join(lines)


__all__ = ["PlanLayout", "LocalParams", "resolve_layout", "local_params", "model_states", "block_activations",
           "activations", "logits_bytes", "all_to_all_bytes", "optimizer_step_bytes", "build", "format_plan",
           "fmt_bytes"]
