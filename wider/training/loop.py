"""The training loop: DeepSpeed engine, megatron-core data, evaluation, checkpoints, preemption.

It knows the model only through the architecture registry (wider.models.ARCHITECTURES): a built model's
forward(tokens, position_ids, attention_mask, labels) returns the per-token loss, and the loop never
branches on which architecture it is.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from wider import ds_config, parallel
from wider.config import ConfigError, RunConfig, cosine_lr, parse_blend
from wider.data import (SentencePieceTokenizer, build_datasets, eval_micro_batches, final_eval_samples, micro_batch,
                         stack_samples, unigram_entropy, unpack)

from wider.models import ARCHITECTURES, training_flops_per_token
from wider.moe import stats as moe_stats
from wider.moe import dispatch as moe_dispatch
from wider.training import checkpoint
from wider.training.metrics import Reporter, fmt_count
from wider.training.preemption import Preemption


@dataclass
class Outcome:
    step: int
    reason: str  # "finished" | "exit_at_iter" | "preempted"
    final_valid_loss: float | None
    checkpoint: str | None


def apex_available() -> bool:
    try:
        import apex  # noqa: F401
        from apex.normalization import FusedLayerNorm  # noqa: F401 - the NVIDIA apex, not PyPI's "apex"

        return True
    except Exception:
        return False


def make_optimizer(model: torch.nn.Module, t) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (every 1-D parameter).

    Expert parameters (tagged allreduce=False by wider.moe) go into their own groups, marked 'moe', as
    DeepSpeed's ZeRO requires: it reduces and partitions those over the expert-data-parallel group."""
    from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer

    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"name": "decay", "params": decay, "weight_decay": t.weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    if any(is_moe_param(p) for p in decay + no_decay):
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                             foreach=False)


def lm_loss(per_token: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    mask = loss_mask.float()
    return (per_token.float() * mask).sum() / mask.sum().clamp(min=1.0)


def _prepare_run_dir(cfg: RunConfig, layout) -> str | None:
    """Create the run directory; decide which checkpoint to resume from (None = fresh start)."""
    t = cfg.train
    run_dir = t.run_dir
    resume_from = None
    if t.resume == "auto":
        resume_from = checkpoint.latest_complete(run_dir)
    elif t.resume != "none":
        resume_from = t.resume
        if not os.path.isdir(resume_from):
            raise ConfigError(f"train.resume {resume_from!r} is not a checkpoint directory")
    elif checkpoint.latest_complete(run_dir):
        raise ConfigError(f"run_dir {run_dir!r} already holds checkpoints; continue it with --resume auto or "
                          "start elsewhere with --run-dir")
    if layout.is_main:
        os.makedirs(run_dir, exist_ok=True)
        tmp = os.path.join(run_dir, f"config.json.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(cfg.to_json())
        os.replace(tmp, os.path.join(run_dir, "config.json"))
    dist.barrier()
    return resume_from


def evaluate(engine, dataset, sample_ids: range, cfg: RunConfig, layout, window=None) -> tuple[float, int]:
    """Mean per-token loss over the given samples (split across data-parallel ranks) and the token count.
    window: a wider.moe.stats.Window that collects the MoE statistics of these forward passes."""
    total = torch.zeros(2, dtype=torch.float64, device=layout.device)
    engine.eval()
    with torch.no_grad():
        for ids in eval_micro_batches(sample_ids, layout.dp, layout.dp_rank, cfg.train.micro_batch_size):
            tokens, pos, mask, labels, loss_mask = unpack(stack_samples(dataset, ids, layout.device))
            moe_stats.clear(engine.module)
            per_tok = engine(tokens, pos, mask, labels=labels)
            if window is not None:
                window.add(moe_stats.take(engine.module)[1])
            lm = loss_mask.float()
            total[0] += (per_tok.float() * lm).sum().double()
            total[1] += lm.sum().double()
    engine.train()
    dist.all_reduce(total, group=_dp_group())
    return float(total[0] / total[1].clamp(min=1)), int(total[1])


def _dp_group():
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group()


def run(cfg: RunConfig) -> Outcome:
    """Train according to cfg (process groups are created here if the caller has not)."""
    import deepspeed

    t, m = cfg.train, cfg.model
    layout = parallel.init_distributed(t.tensor_parallel)
    cfg.validate(layout.world_size)
    arch = ARCHITECTURES[m.arch]
    resume_from = _prepare_run_dir(cfg, layout)
    rep = Reporter(t.run_dir, layout.is_main, t.train_iters, cfg.to_json())

    tokenizer = SentencePieceTokenizer(cfg.data.tokenizer)
    vocab = m.vocab_size or tokenizer.vocab_size
    if vocab < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size {vocab} is smaller than tokenizer {cfg.data.tokenizer}'s "
                          f"{tokenizer.vocab_size} pieces; drop --vocab-size or use the matching tokenizer")

    ds = ds_config.build(cfg, layout.dp)
    bf16 = ds_config.uses_bf16(ds)
    moe = ds_config.moe_settings(ds) if m.num_experts else None
    if moe is not None:
        from wider.moe.layer import ensure_expert_groups

        ensure_expert_groups(moe.ep_size)  # before the build: each rank initialises only its experts
    parallel.set_seed(t.seed)
    model = arch.build(cfg, vocab, bf16, moe)
    counts = arch.count(cfg, vocab)
    ep = moe.ep_size if moe else 1
    # TP shards hold the same count per rank; EP ranks hold 1/ep of the experts (tagged allreduce=False).
    built = sum(p.numel() * (ep if getattr(p, "allreduce", True) is False else layout.tp)
                for p in model.parameters())
    fpt = training_flops_per_token(cfg, counts)
    gas = ds["gradient_accumulation_steps"]
    tokens_per_step = t.global_batch_size * m.seq_length
    rep.info(f"wider | preset {cfg.preset} | arch {m.arch} | world {layout.world_size} (tp {layout.tp} x dp "
             f"{layout.dp}) | {'cuda' if layout.device.type == 'cuda' else 'cpu'} | "
             f"{'bf16' if bf16 else 'fp32'} | ZeRO {ds_config.zero_stage(ds)} | "
             f"norm kernels: {'apex' if apex_available() else 'torch'}")
    if moe is not None:
        experts = moe_stats.moe_layers(model)[0].deepspeed_moe.experts
        kernel = experts.kernel_name(layout.device, torch.bfloat16 if bf16 else torch.float32)
        if any(layer.router_kind == "sigmoid" for layer in moe_stats.moe_layers(model)):  # sigma-MoE: no balance
            losses = (f"entropy ffn {moe.entropy_weight_ffn} attention {moe.entropy_weight_attention} z "
                      f"{moe.z_loss_weight}")
        else:
            losses = f"aux {moe.aux_loss_weight} z {moe.z_loss_weight}"
        rep.info(f"moe: {m.num_experts} experts x {m.expert_ffn_size} wide, top-{m.moe_top_k} | capacity factor "
                 f"{moe.capacity_factor_for(True)} (eval {moe.capacity_factor_for(False)}, min {moe.min_capacity}) "
                 f"| {losses} | ep_size {moe.ep_size} | expert kernel "
                 f"{kernel}{'' if kernel == 'grouped_mm' else ' (reference loop: grouped GEMM unavailable here)'} | "
                 f"gathers {moe_dispatch.gather_kernel_name(layout.device)}")
    rep.info(f"params: total {fmt_count(counts.total)} | non-embedding {fmt_count(counts.non_embedding)} | "
             f"active {fmt_count(counts.active)} | built {fmt_count(built)} | tokens/step "
             f"{fmt_count(tokens_per_step)} (micro {t.micro_batch_size} x gas {gas} x dp {layout.dp} x seq "
             f"{m.seq_length}) | train FLOPs/token {fmt_count(fpt)}")

    optimizer = make_optimizer(model, t)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, t) / t.lr)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds, mpu=parallel.MegatronMPU(), dist_init_required=False)

    cache_dir = cfg.data.index_cache or os.path.join(os.path.dirname(os.path.abspath(t.run_dir)), ".index_cache")
    periodic_samples = t.eval_iters * t.global_batch_size
    splits = build_datasets(cfg, tokenizer, t.train_iters * t.global_batch_size, periodic_samples, cache_dir)
    final_samples = final_eval_samples(cfg, splits)

    step = 0
    if resume_from:
        client = checkpoint.load(engine, resume_from)
        step = int(client["step"])
        saved = client.get("config", {}).get("model")
        if saved is not None:
            # Through RunConfig so that fields added to ModelConfig since the checkpoint compare at their defaults.
            saved, now = RunConfig.from_dict({"model": saved}).to_dict()["model"], cfg.to_dict()["model"]
            differ = sorted(k for k in now if saved.get(k) != now[k])
            if differ:
                raise ConfigError(f"checkpoint {resume_from!r} was trained with a different model config (model."
                                  f"{', model.'.join(differ)}); resume with the run's own config (--config "
                                  "RUN_DIR/config.json)")
        rep.info(f"resumed from {resume_from} at step {step}"
                 + (f" ({client['resume_note']})" if client.get("resume_note") else ""))

    preempt = Preemption()
    rep.begin(step)
    reason = "finished"
    last_ckpt = None
    stop_at = t.exit_at_iter or t.train_iters
    window_tokens, window_t0 = 0, time.time()
    losses: list[torch.Tensor] = []
    auxes: list[torch.Tensor] = []
    norms: list[float | None] = []
    moe_window = moe_stats.Window()
    own_norm, own_norm_value = ds_config.zero_stage(ds) == 0, None  # DeepSpeed reports none without ZeRO
    client_state = lambda s: {"step": s, "consumed_samples": s * t.global_batch_size, "config": cfg.to_dict(),
                              "tokenizer_sha256": tokenizer.sha256}

    def save(s: int) -> str:
        return checkpoint.save(engine, t.run_dir, s, client_state(s), t.keep_checkpoints)

    try:
        while step < stop_at:
            step_loss = torch.zeros((), dtype=torch.float64, device=layout.device)
            step_aux = torch.zeros((), dtype=torch.float64, device=layout.device)
            for micro in range(gas):
                batch = micro_batch(splits.train, step, micro, t.global_batch_size, t.micro_batch_size, layout.dp,
                                    layout.dp_rank, layout.device)
                tokens, pos, mask, labels, loss_mask = unpack(batch)
                moe_stats.clear(engine.module)
                loss = lm_loss(engine(tokens, pos, mask, labels=labels), loss_mask)
                aux, records = moe_stats.take(engine.module)  # before backward (recompute re-records)
                engine.backward(loss if aux is None else loss + aux)
                if own_norm and micro == gas - 1:  # gradients are reduced now and zeroed by step()
                    own_norm_value = parallel.global_grad_norm(engine.module)
                engine.step()
                step_loss += loss.detach().double() / gas
                if aux is not None:
                    step_aux += aux.detach().double() / gas
                    moe_window.add(records)
            step += 1
            losses.append(step_loss)
            auxes.append(step_aux)
            gn = own_norm_value if own_norm else engine.get_global_grad_norm()
            norms.append(float(gn) if gn is not None else None)
            window_tokens += tokens_per_step

            if step % t.log_interval == 0 or step == stop_at:
                both = torch.stack([torch.stack(losses), torch.stack(auxes)])
                dist.all_reduce(both, group=_dp_group())
                stacked, aux_vals = (both / layout.dp).tolist()
                moe_now = moe_window.reduce(_dp_group())
                elapsed = time.time() - window_t0
                tps = window_tokens / max(elapsed, 1e-9)
                mfu = (fpt * tps / (t.peak_tflops * 1e12 * layout.world_size)
                       if layout.device.type == "cuda" else None)
                first = step - len(stacked) + 1
                for i, (lv, nv, av) in enumerate(zip(stacked, norms, aux_vals)):
                    rep.record({"kind": "train", "step": first + i, "loss": lv, "grad_norm": nv,
                                "lr": cosine_lr(first + i - 1, t), **({"aux_loss": av} if moe else {})})
                lr_now = cosine_lr(step - 1, t)  # the rate this step used
                rep.scalars(step, {"train/loss": stacked[-1], "train/ppl": math.exp(min(stacked[-1], 50)),
                                   "train/lr": lr_now, "train/grad_norm": norms[-1], "perf/tokens_per_s": tps,
                                   "perf/mfu": mfu, "perf/memory_gb": _mem()})
                extra = ""
                if moe_now:
                    rep.scalars(step, {"train/aux_loss": aux_vals[-1]})
                    rep.moe_scalars(step, "train", moe_now)
                    extra = (f" | drop {100 * moe_stats.mean_over(moe_now, 'dropped'):.1f}% | bal "
                             f"{moe_stats.mean_over(moe_now, 'balance'):.3f}")
                rep.train_line(step, stacked[-1], lr_now, norms[-1], tps, mfu, extra)
                losses, auxes, norms = [], [], []
                window_tokens, window_t0 = 0, time.time()

            if t.eval_interval and step % t.eval_interval == 0 and step < t.train_iters:
                eval_window = moe_stats.Window()
                vl, vt = evaluate(engine, splits.valid, range(periodic_samples), cfg, layout, eval_window)
                _report_eval_moe(rep, step, eval_window)
                rep.record({"kind": "eval", "step": step, "loss": vl, "tokens": vt})
                rep.scalars(step, {"valid/loss": vl, "valid/ppl": math.exp(min(vl, 50))})
                rep.eval_line(step, "valid", vl, vt)
                window_t0 = time.time()  # do not count evaluation as training time

            if preempt.agreed(layout.device):
                reason = "preempted"
                break
            if t.save_interval and step % t.save_interval == 0 and step < stop_at:
                last_ckpt = save(step)
                window_t0 = time.time()
        if step >= stop_at and stop_at < t.train_iters:
            reason = "exit_at_iter"

        last_ckpt = save(step)
        final = None
        if reason == "finished":
            eval_window = moe_stats.Window()
            final, ftok = evaluate(engine, splits.valid, range(final_samples), cfg, layout, eval_window)
            _report_eval_moe(rep, step, eval_window)
            rep.record({"kind": "final_eval", "step": step, "loss": final, "tokens": ftok})
            rep.scalars(step, {"valid/loss": final, "valid/ppl": math.exp(min(final, 50))})
            rep.eval_line(step, "final valid", final, ftok)
            if layout.is_main:
                _summary(cfg, rep, step, final, ftok, last_ckpt)
        else:
            rep.info(f"stopped at step {step} ({reason}{': ' + preempt.signal_name if preempt.signal_name else ''}); "
                     f"checkpoint {last_ckpt}; continue with --resume auto")
        return Outcome(step=step, reason=reason, final_valid_loss=final, checkpoint=last_ckpt)
    finally:
        preempt.restore()
        rep.close()


def _report_eval_moe(rep: Reporter, step: int, window) -> None:
    """Expert load on the validation tokens: scalars and the blocks x experts heatmap."""
    summaries = window.reduce(_dp_group())
    if summaries:
        rep.moe_scalars(step, "valid", summaries)
        rep.moe_heatmap(step, summaries)


def _mem() -> float:
    from wider.training.metrics import peak_memory_gb

    return peak_memory_gb()


def _summary(cfg: RunConfig, rep: Reporter, step: int, final: float, tokens: int, ckpt: str) -> None:
    prefixes, _ = parse_blend(cfg.data.data_path)
    h1, corpus_tokens = unigram_entropy(prefixes)
    run_dir = os.path.abspath(cfg.train.run_dir)
    summary = {"preset": cfg.preset, "steps": step, "final_valid_loss": final, "valid_tokens": tokens,
               "unigram_entropy": h1, "nats_below_unigram": h1 - final, "corpus_tokens": corpus_tokens,
               "seconds": time.time() - rep.t_start, "run_dir": run_dir, "checkpoint": os.path.abspath(ckpt),
               "tensorboard": os.path.abspath(rep.tb_dir), "metrics": os.path.join(run_dir, "metrics.jsonl"),
               "config": os.path.join(run_dir, "config.json")}
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    rep.info("\n".join([
        "",
        "=" * 72,
        f"done: {cfg.preset}, {step} steps in {summary['seconds']:.0f} s",
        f"final validation loss {final:.4f} (ppl {math.exp(final):.2f}) on {tokens:,} held-out tokens",
        f"unigram entropy of the corpus {h1:.4f} nats ({corpus_tokens:,} tokens): the model is "
        f"{h1 - final:.3f} nats below it",
        f"run directory  {run_dir}",
        f"checkpoint     {summary['checkpoint']}",
        f"tensorboard    {summary['tensorboard']}   (./run.sh tensorboard)",
        f"metrics        {summary['metrics']}",
        f"summary        {os.path.join(run_dir, 'summary.json')}",
        "=" * 72,
    ]))
    sys.stdout.flush()
