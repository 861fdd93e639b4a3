"""The training loop, in four stages: set-up, one optimizer step, evaluate-and-report, and the summary.

    run(cfg) = set_up(cfg) -> train_step(session, step) per step, with report_window() every log_interval,
               evaluate() every eval_interval and at the end, checkpoints, preemption -> summary

It knows the model only through the architecture registry (wider.models.ARCHITECTURES) and the task only through
wider.tasks (DESIGN 5.8: the task reads its data, computes its loss from the model's outputs and its metrics), and
never branches on which architecture or task it is. MoE layers describe themselves (wider.moe.layer.MoE.describe)
and report their losses and statistics through wider.moe.stats.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from wider import ds_config, parallel, preflight
from wider.checkpoint import store
from wider.checkpoint.paths import RUN_TOKENIZER, step_of
from wider.config import RunConfig
from wider.data import SentencePieceTokenizer, Splits, eval_micro_batches, micro_batch, stack_samples
from wider.files import RunDirLock, atomic_path, atomic_write_json
from wider.models import ARCHITECTURES, ParamCount, training_flops_per_token
from wider.moe import stats as moe_stats
from wider.moe.layer import model_routing, moe_layers
from wider.optim import learning_rate, make_optimizer, make_scheduler
from wider.tasks.base import EvalResult, Task, metrics_text
from wider.tasks.registry import task_of
from wider.training.metrics import Reporter, drop_records_after, fmt_count, peak_memory_gb
from wider.training.preemption import Preemption


@dataclass
class Outcome:
    step: int
    reason: str  # "finished" | "exit_at_iter" | "preempted"
    final_valid_loss: float | None
    checkpoint: str | None


@dataclass
class Session:
    """What the stages share: the config, this rank's place, the engine and data, and the reporter."""

    cfg: RunConfig
    layout: parallel.RankLayout
    engine: object  # deepspeed.DeepSpeedEngine
    splits: Splits
    reporter: Reporter
    tokenizer: Optional[SentencePieceTokenizer]  # None for a task without text (image classification)
    has_moe: bool
    gas: int  # gradient accumulation steps
    flops_per_token: float
    own_norm: bool  # DeepSpeed reports no gradient norm without ZeRO: the loop computes it
    start_step: int = 0
    final_samples: int = 0
    lock: Optional[RunDirLock] = None  # rank 0 holds the run directory's lock until the run ends
    task: Optional[Task] = None  # the task's data, loss and metrics (wider.tasks)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.global_batch_size * self.cfg.model.seq_length

    def client_state(self, step: int) -> dict:
        t = self.cfg.train
        return {"step": step, "consumed_samples": step * t.global_batch_size, "config": self.cfg.to_dict(),
                **(self.tokenizer.record() if self.tokenizer is not None else {})}

    def save(self, step: int) -> str:
        t = self.cfg.train
        return store.save(self.engine, t.run_dir, step, self.client_state(step), t.keep_checkpoints)


@dataclass
class StepResult:
    loss: torch.Tensor  # the global batch's mean task loss on this rank (float64, detached)
    aux: torch.Tensor  # the weighted MoE aux losses (0 for a dense model)
    grad_norm: Optional[float]
    moe_records: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)  # the task's training metrics, name -> float64 tensor (mean)


# --- stage 1: set-up ------------------------------------------------------------------------------------------


def set_up(cfg: RunConfig) -> Session:
    """Process groups, run directory, tokenizer, model, DeepSpeed engine, datasets, and the resume."""
    import deepspeed

    t, m = cfg.train, cfg.model
    layout = parallel.init_distributed(t.tensor_parallel)
    if cfg.data.base_dir is None:  # recorded in config.json and the checkpoints: relative paths resolve from anywhere
        cfg.data.base_dir = os.getcwd()
    # Every input checked on every rank, and the run directory locked, before anything is written.
    pre, lock = preflight.check_on_every_rank(cfg, layout)
    arch = ARCHITECTURES[m.arch]
    task = task_of(cfg)
    tokenizer = SentencePieceTokenizer(cfg.data.tokenizer_path) if task.uses_tokenizer else None
    if layout.is_main:
        _prepare_run_dir(cfg, tokenizer, pre.resume_from)
    dist.barrier()
    rep = Reporter(t.run_dir, layout.is_main, t.train_iters, cfg.to_json())
    for note in pre.notes:
        rep.info(f"[wider] {note}")

    vocab = pre.vocab_size
    ds = ds_config.build(cfg, layout.dp)
    bf16 = ds_config.uses_bf16(ds)
    runtime = _moe_runtime(ds) if m.num_experts else None  # groups before the build: each rank builds its experts
    parallel.set_seed(t.seed)
    model = arch.build(cfg, vocab, bf16, runtime)
    if t.init_from and not pre.resume_from:  # fine-tuning: pretrained weights before the optimizer sees them
        from wider.checkpoint.init import initialize

        initialize(model, cfg, rep.info)
    counts = arch.count(cfg, vocab)
    session_fpt = training_flops_per_token(cfg, counts)
    _banner(rep, cfg, layout, ds, model, counts, session_fpt)

    optimizer = make_optimizer(model, t)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=make_scheduler(optimizer, t),
                                           config=ds, mpu=parallel.MegatronMPU(), dist_init_required=False)
    cache_dir = cfg.data.index_cache or os.path.join(os.path.dirname(os.path.abspath(t.run_dir)), ".index_cache")
    splits = task.build_data(tokenizer, t.train_iters * t.global_batch_size, t.eval_iters * t.global_batch_size,
                             cache_dir)
    s = Session(cfg=cfg, layout=layout, engine=engine, splits=splits, reporter=rep, tokenizer=tokenizer,
                has_moe=runtime is not None, gas=ds["gradient_accumulation_steps"], flops_per_token=session_fpt,
                own_norm=ds_config.zero_stage(ds) == 0, final_samples=task.final_eval_samples(splits), lock=lock,
                task=task)
    if pre.resume_from:
        s.start_step = _resume(s, pre.resume_from)
    return s


def _moe_runtime(ds: dict):
    from wider.moe.config import MoERuntime

    settings = ds_config.moe_settings(ds)
    return MoERuntime(settings=settings, groups=parallel.expert_groups(settings.ep_size))


def _prepare_run_dir(cfg: RunConfig, tokenizer: Optional[SentencePieceTokenizer], resume_from: str | None) -> None:
    """Rank 0, after every check passed: the resolved config, a copy of the tokenizer (so the run directory works
    wherever it is copied: wider.checkpoint.rebuild.run_tokenizer_candidates), and metrics.jsonl without the records
    of steps after the one resumed (a run that died after its last checkpoint had logged them)."""
    run_dir = cfg.train.run_dir
    atomic_write_json(os.path.join(run_dir, "config.json"), cfg.to_dict())
    own = os.path.join(run_dir, RUN_TOKENIZER)
    if tokenizer is not None and not (os.path.isfile(own)
                                      and SentencePieceTokenizer(own).identity == tokenizer.identity):
        with atomic_path(own) as tmp:
            shutil.copyfile(tokenizer.path, tmp)
        meta = os.path.splitext(tokenizer.path)[0] + ".json"  # data_prep/train_tokenizer.py's PREFIX.json
        if os.path.isfile(meta):
            with atomic_path(os.path.join(run_dir, "tokenizer.json")) as tmp:
                shutil.copyfile(meta, tmp)
    drop_records_after(os.path.join(run_dir, "metrics.jsonl"), step_of(resume_from) if resume_from else 0)


def _banner(rep: Reporter, cfg: RunConfig, layout, ds: dict, model, counts: ParamCount, fpt: float) -> None:
    """The start-up lines: the layout and kernels, each MoE layer kind's own description, the derived counts."""
    t, m = cfg.train, cfg.model
    bf16 = ds_config.uses_bf16(ds)
    rep.info(f"wider | preset {cfg.preset} | arch {m.arch} | world {layout.world_size} (tp {layout.tp} x dp "
             f"{layout.dp}) | {'cuda' if layout.device.type == 'cuda' else 'cpu'} | "
             f"{'bf16' if bf16 else 'fp32'} | ZeRO {ds_config.zero_stage(ds)} | "
             f"norm kernels: {'apex' if apex_available() else 'torch'}")
    dtype = torch.bfloat16 if bf16 else torch.float32
    for line in dict.fromkeys(layer.describe(layout.device, dtype) for layer in moe_layers(model)):
        rep.info(line)
    ep = max((layer.ep_size for layer in moe_layers(model)), default=1)
    # TP shards hold the same count per rank; EP ranks hold 1/ep of the experts (tagged allreduce=False).
    built = sum(p.numel() * (ep if getattr(p, "allreduce", True) is False else layout.tp) for p in model.parameters())
    gas = ds["gradient_accumulation_steps"]
    rep.info(f"params: total {fmt_count(counts.total)} | non-embedding {fmt_count(counts.non_embedding)} | "
             f"active {fmt_count(counts.active)} | built {fmt_count(built)} | tokens/step "
             f"{fmt_count(t.global_batch_size * m.seq_length)} (micro {t.micro_batch_size} x gas {gas} x dp "
             f"{layout.dp} x seq {m.seq_length}) | train FLOPs/token {fmt_count(fpt)}")


def _resume(s: Session, path: str) -> int:
    """Load the checkpoint into the engine (wider.preflight checked that it is intact and fits). Returns its step."""
    client = store.load(s.engine, path)
    step = int(client["step"])
    s.reporter.info(f"resumed from {path} at step {step}"
                    + (f" ({client['resume_note']})" if client.get("resume_note") else ""))
    return step


def apex_available() -> bool:
    try:
        import apex  # noqa: F401
        from apex.normalization import FusedLayerNorm  # noqa: F401 - the NVIDIA apex, not PyPI's "apex"

        return True
    except Exception:
        return False


# --- stage 2: one optimizer step ------------------------------------------------------------------------------


def train_step(s: Session, step: int) -> StepResult:
    """Global batch `step`: gas micro-batches, forward, backward (the task's loss + MoE aux losses) and the engine's
    step."""
    t, lay, engine = s.cfg.train, s.layout, s.engine
    step_loss = torch.zeros((), dtype=torch.float64, device=lay.device)
    step_aux = torch.zeros((), dtype=torch.float64, device=lay.device)
    records, norm, metrics = [], None, {}
    for micro in range(s.gas):
        batch = micro_batch(s.splits.train, step, micro, t.global_batch_size, t.micro_batch_size, lay.dp, lay.dp_rank,
                            lay.device)
        moe_stats.clear(engine.module)
        loss, micro_metrics = s.task.loss(engine, batch)
        aux, micro_records = moe_stats.take(engine.module)  # before backward (recompute re-records)
        engine.backward(loss if aux is None else loss + aux)
        if s.own_norm and micro == s.gas - 1:  # gradients are reduced now and zeroed by step()
            norm = parallel.global_grad_norm(engine.module)
        engine.step()
        step_loss += loss.detach().double() / s.gas
        for k, v in micro_metrics.items():
            metrics[k] = metrics.get(k, 0.0) + v.double() / s.gas
        if aux is not None:
            step_aux += aux.detach().double() / s.gas
            records.extend(micro_records)
    if not s.own_norm:
        gn = engine.get_global_grad_norm()
        norm = float(gn) if gn is not None else None
    moe_stats.update_selection_biases(engine.module, _dp_group())  # aux-loss-free balancing (no-op without)
    return StepResult(loss=step_loss, aux=step_aux, grad_norm=norm, moe_records=records, metrics=metrics)


class TrainWindow:
    """The steps since the last console line: their losses, norms and MoE records, and the time they took."""

    def __init__(self):
        self.results: list[StepResult] = []
        self.moe = moe_stats.Window()
        self.t0 = time.time()

    def add(self, r: StepResult) -> None:
        """The step's numbers are kept; its MoE records are summed into the statistics and let go (they hold the
        aux losses' autograd graphs)."""
        if r.moe_records:
            self.moe.add(r.moe_records)
        self.results.append(StepResult(loss=r.loss, aux=r.aux, grad_norm=r.grad_norm, metrics=r.metrics))

    def restart_clock(self) -> None:
        """Evaluation and checkpoints do not count as training time."""
        self.t0 = time.time()


def report_window(s: Session, step: int, w: TrainWindow) -> None:
    """Collective: the window's losses averaged over data-parallel ranks -> metrics.jsonl, TensorBoard, console."""
    t, lay, rep = s.cfg.train, s.layout, s.reporter
    names = list(w.results[0].metrics)  # the task's training metrics (none for the causal LM)
    both = torch.stack([torch.stack([r.loss for r in w.results]), torch.stack([r.aux for r in w.results]),
                        *(torch.stack([r.metrics[k] for r in w.results]) for k in names)])
    dist.all_reduce(both, group=_dp_group())
    losses, auxes, *task_rows = (both / lay.dp).tolist()
    norms = [r.grad_norm for r in w.results]
    moe_now = w.moe.reduce(_dp_group())
    tps = s.tokens_per_step * len(w.results) / max(time.time() - w.t0, 1e-9)
    mfu = s.flops_per_token * tps / (t.peak_tflops * 1e12 * lay.world_size) if lay.device.type == "cuda" else None
    first = step - len(losses) + 1
    for i, (lv, nv, av) in enumerate(zip(losses, norms, auxes)):
        rep.record({"kind": "train", "step": first + i, "loss": lv, "grad_norm": nv,
                    "lr": learning_rate(first + i - 1, t), **({"aux_loss": av} if s.has_moe else {}),
                    **{k: row[i] for k, row in zip(names, task_rows)}})
    lr_now = learning_rate(step - 1, t)  # the rate this step used
    now = {k: row[-1] for k, row in zip(names, task_rows)}
    rep.scalars(step, {**s.task.scalars("train", losses[-1], now), "train/lr": lr_now,
                       "train/grad_norm": norms[-1], "perf/tokens_per_s": tps, "perf/mfu": mfu,
                       "perf/memory_gb": peak_memory_gb()})
    extra = metrics_text(now)
    if moe_now:
        rep.scalars(step, {"train/aux_loss": auxes[-1]})
        rep.moe_scalars(step, "train", moe_now)
        rep.selection_biases(step, moe_stats.selection_biases(s.engine.module))
        extra += (f" | drop {100 * moe_stats.mean_over(moe_now, 'dropped'):.1f}% | bal "
                  f"{moe_stats.mean_over(moe_now, 'balance'):.3f}")
    rep.train_line(step, losses[-1], lr_now, norms[-1], tps, mfu, extra, ppl=s.task.reports_ppl)


# --- stage 3: evaluate and report -----------------------------------------------------------------------------


def evaluate(engine, dataset, sample_ids: range, cfg: RunConfig, layout, window=None,
             task: Optional[Task] = None) -> EvalResult:
    """The task's loss and metrics over the given samples (split across data-parallel ranks; for the causal LM the
    mean per-token loss and the token count). window: a wider.moe.stats.Window that collects the MoE statistics of
    these forward passes."""
    task = task or task_of(cfg)
    total = torch.zeros(task.eval_width, dtype=torch.float64, device=layout.device)
    engine.eval()
    with torch.no_grad():
        for ids in eval_micro_batches(sample_ids, layout.dp, layout.dp_rank, cfg.train.micro_batch_size):
            batch = stack_samples(dataset, ids, layout.device)
            moe_stats.clear(engine.module)
            sums = task.eval_sums(engine, batch)
            if window is not None:
                window.add(moe_stats.take(engine.module)[1])
            total += sums
    engine.train()
    dist.all_reduce(total, group=_dp_group())
    return task.eval_result(total)


def evaluate_and_report(s: Session, step: int, samples: int, kind: str) -> EvalResult:
    """Collective: the task's loss and metrics on the first `samples` validation samples -> metrics.jsonl ("eval" /
    "final_eval"), TensorBoard (valid/loss, valid/ppl or the task's metrics, the MoE load of the validation tokens)
    and the console."""
    window = moe_stats.Window()
    result = evaluate(s.engine, s.splits.valid, range(samples), s.cfg, s.layout, window, s.task)
    loss, tokens = result.loss, result.count
    rep = s.reporter
    summaries = window.reduce(_dp_group())
    if summaries:
        rep.moe_scalars(step, "valid", summaries)
        rep.moe_heatmap(step, summaries)
    routing = model_routing(s.engine.module)  # which routing produced this loss ('' for a dense model)
    rep.record({"kind": kind, "step": step, "loss": loss, s.task.count_name: tokens, **result.metrics,
                **({"routing": routing} if routing else {})})
    rep.scalars(step, s.task.scalars("valid", loss, result.metrics))
    rep.eval_line(step, "final valid" if kind == "final_eval" else "valid", loss, tokens, ppl=s.task.reports_ppl,
                  unit=s.task.count_name, extra=metrics_text(result.metrics))
    return result


def _dp_group():
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group()


# --- the run, and stage 4: the summary ------------------------------------------------------------------------


def run(cfg: RunConfig) -> Outcome:
    """Train according to cfg (process groups are created here if the caller has not)."""
    s = set_up(cfg)
    preempt = Preemption()
    try:
        return _train(s, preempt)
    finally:
        preempt.restore()
        s.reporter.close()
        if s.lock is not None:
            s.lock.release()


def _train(s: Session, preempt: Preemption) -> Outcome:
    t = s.cfg.train
    stop_at = t.exit_at_iter or t.train_iters
    step, reason, last_ckpt = s.start_step, "finished", None
    s.reporter.begin(step)
    window = TrainWindow()
    while step < stop_at:
        window.add(train_step(s, step))
        step += 1
        if step % t.log_interval == 0 or step == stop_at:
            report_window(s, step, window)
            window = TrainWindow()
        if t.eval_interval and step % t.eval_interval == 0 and step < t.train_iters:
            evaluate_and_report(s, step, t.eval_iters * t.global_batch_size, "eval")
            window.restart_clock()
        if preempt.agreed(s.layout.device):
            reason = "preempted"
            break
        if t.save_interval and step % t.save_interval == 0 and step < stop_at:
            last_ckpt = s.save(step)
            window.restart_clock()
    if step >= stop_at and stop_at < t.train_iters:
        reason = "exit_at_iter"
    last_ckpt = s.save(step)
    final = None
    if reason == "finished":
        result = evaluate_and_report(s, step, s.final_samples, "final_eval")
        final = result.loss
        if s.layout.is_main:
            summarize(s, step, result, last_ckpt)
    else:
        s.reporter.info(f"stopped at step {step} ({reason}"
                        f"{': ' + preempt.signal_name if preempt.signal_name else ''}); checkpoint {last_ckpt}; "
                        "continue with --resume auto")
    return Outcome(step=step, reason=reason, final_valid_loss=final, checkpoint=last_ckpt)


def summarize(s: Session, step: int, result: EvalResult, ckpt: str) -> None:
    """RUN_DIR/summary.json and the closing lines: the final loss against the task's baseline (for the causal LM the
    corpus's unigram entropy, wider.tasks), and where everything went."""
    cfg, rep = s.cfg, s.reporter
    final, tokens, unit = result.loss, result.count, s.task.count_name
    task_fields, task_lines = s.task.summary(result)
    run_dir = os.path.abspath(cfg.train.run_dir)
    summary = {"preset": cfg.preset, "steps": step, "final_valid_loss": final, f"valid_{unit}": tokens,
               **task_fields, "seconds": time.time() - rep.t_start, "run_dir": run_dir,
               "checkpoint": os.path.abspath(ckpt),
               "tensorboard": os.path.abspath(rep.tb_dir), "metrics": os.path.join(run_dir, "metrics.jsonl"),
               "config": os.path.join(run_dir, "config.json")}
    atomic_write_json(os.path.join(run_dir, "summary.json"), summary)
    rep.info("\n".join([
        "",
        "=" * 72,
        f"done: {cfg.preset}, {step} steps in {summary['seconds']:.0f} s",
        f"final validation loss {final:.4f}" + (f" (ppl {math.exp(final):.2f})" if s.task.reports_ppl else "")
        + f" on {tokens:,} held-out {unit}",
        *task_lines,
        f"run directory  {run_dir}",
        f"checkpoint     {summary['checkpoint']}",
        f"tensorboard    {summary['tensorboard']}   (./run.sh tensorboard)",
        f"metrics        {summary['metrics']}",
        f"summary        {os.path.join(run_dir, 'summary.json')}",
        "=" * 72,
    ]))
    sys.stdout.flush()
