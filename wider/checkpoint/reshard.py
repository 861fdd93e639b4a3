"""Resume a run at another parallel layout: data-parallel size, moe.ep_size, ZeRO stage (0, 1, 2), precision.

DeepSpeed's own load needs the saving layout for expert shards and ZeRO partitions, and its universal checkpoint
does not cover its native MoE. Here every rank consolidates the checkpoint into full tensors by parameter name
(wider.checkpoint.native: fp32 master weights, Adam exp_avg / exp_avg_sq and step, LR-scheduler state) and
writes its own share into the freshly built engine:

- experts: the rows [ep_rank * L, (ep_rank + 1) * L) of the stacked [E, ...] tensors (the module's own ep_rank);
- ZeRO 1/2 (DeepSpeed's tensor-fragment API, deepspeed/utils/tensor_fragment.py): safe_set_full_fp32_param and
  safe_set_full_optimizer_state copy the fragment of a full tensor that lies in this rank's flat partition
  (param._hp_mapping). They need the optimizer state to exist, and torch's AdamW creates it only at the first
  step, after which DeepSpeed links each parameter's state fragments (stage_1_and_2._optimizer_step ->
  _lazy_init_hp_params_optimizer_state). So the state of every flat partition is created here first, as AdamW
  would ({step, exp_avg, exp_avg_sq}; AdamW keeps `step` per parameter as a CPU float tensor unless capturable or
  fused), then linked, then filled. The module's (bf16 or fp32) copies are set from the same fp32 values;
- no ZeRO: the module parameters (and DeepSpeed's fp32 copies in a bf16 run) and the torch optimizer's state;
- the LR scheduler's state (its step count) and the engine's step counters.

What cannot be mapped: per-rank RNG streams (dropout, router noise) belong to ranks that no longer exist; the
resumed run keeps the streams seeded at start-up, so models with dropout or router noise continue with other
draws than an uninterrupted run would (without them, the continuation is exact). The data position needs nothing:
the batch order is a pure function of the step (wider/data.py).
"""

from __future__ import annotations

from typing import Optional

import torch

from wider.checkpoint.native import ADAM_STATES, CheckpointError, consolidate, inspect

RNG_NOTE = ("per-rank RNG streams are not restored across layouts: dropout / router-noise draws differ from an "
            "uninterrupted run (models without them continue exactly)")


def engine_layout(engine) -> dict:
    """The parallel layout of a running engine, in the form complete.json records."""
    from wider import parallel
    from wider.moe.layer import MoE

    layout = parallel.current_layout()
    eps = {m.ep_size for m in engine.module.modules() if isinstance(m, MoE)}
    return {"world_size": layout.world_size, "tp": layout.tp, "dp": layout.dp, "ep_size": max(eps) if eps else 1,
            "zero_stage": int(engine.zero_optimization_stage()), "bf16": bool(engine.bfloat16_enabled())}


def describe(layout: dict) -> str:
    return (f"dp {layout['dp']} x tp {layout['tp']}, ep_size {layout['ep_size']}, ZeRO {layout['zero_stage']}, "
            f"{'bf16' if layout['bf16'] else 'fp32'}")


def load_resharded(engine, path: str) -> dict:
    """Collective-free: load checkpoint `path` (saved at any layout) into `engine` (built at the current one).
    Returns the checkpoint's client state (step, config, ...)."""
    info = inspect(path)
    if engine_layout(engine)["tp"] != 1:
        raise CheckpointError(f"resuming {path!r} at another layout with tensor parallelism is not supported; "
                              "resume with the layout it was saved with")
    model = engine.module
    cons = consolidate(path, optimizer=True, model=model, info=info)
    local = _local_tensors(model, cons.weights, path)
    states = {name: _local_states(model, name, d) for name, d in (cons.optimizer or {}).items()}
    params = dict(model.named_parameters())
    missing = sorted(n for n in params if n not in states)
    if missing:
        raise CheckpointError(f"checkpoint {path!r} holds no Adam state for {missing[:4]} (saved before any step?)")
    step = int(cons.adam_step or 0)
    opt = engine.optimizer
    first = next(iter(params.values()))
    with torch.no_grad():
        for name, t in local.items():  # the module's copies (bf16 in a bf16 run), persistent buffers included
            target = params.get(name)
            if target is None:
                target = model.get_buffer(name)
            target.copy_(t.to(target.dtype))
        if hasattr(first, "_hp_mapping"):  # ZeRO 1/2 (or DeepSpeed's BF16_Optimizer): flat fp32 partitions
            _set_partitioned(opt, params, local, states, step)
        else:
            _set_plain(opt, params, local, states, step)
    _restore_schedule(engine, cons.lr_scheduler, path)
    s = info.states
    engine.global_steps = int(s.get("global_steps", info.step))
    engine.global_samples = int(s.get("global_samples", engine.global_steps * engine.train_batch_size()))
    engine.skipped_steps = int(s.get("skipped_steps", 0))
    return dict(info.client)


def _expert_slices(model: torch.nn.Module) -> dict:
    """parameter name -> (ep_rank, local experts) for every expert parameter (wider's MoE knows its ep_rank)."""
    from wider.moe.layer import MoE

    owner = {}
    for module in model.modules():
        if isinstance(module, MoE):
            for p in module.deepspeed_moe.experts.parameters():
                owner[id(p)] = (module.ep_rank, module.num_local_experts)
    return {n: owner[id(p)] for n, p in model.named_parameters() if id(p) in owner}


def _local_tensors(model: torch.nn.Module, full: dict, path: str) -> dict:
    slices = _expert_slices(model)
    wanted = dict(model.named_parameters())
    wanted.update({n: b for n, b in model.named_buffers() if n in full})
    missing, unexpected = sorted(set(wanted) - set(full)), sorted(set(full) - set(wanted))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path!r} does not fit the model being resumed: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}; resume with the run's own model config")
    out = {}
    for name, target in wanted.items():
        t = full[name]
        if name in slices:
            ep_rank, L = slices[name]
            if t.shape[0] % L or t.shape[0] // L < ep_rank + 1:
                raise CheckpointError(f"checkpoint {path!r}: {name} holds {t.shape[0]} experts, which this run's "
                                      f"ep layout ({L} local experts, ep_rank {ep_rank}) cannot take")
            t = t[ep_rank * L:(ep_rank + 1) * L]
        if tuple(t.shape) != tuple(target.shape):
            raise CheckpointError(f"checkpoint {path!r}: {name} has shape {tuple(t.shape)} for this rank, the model "
                                  f"{tuple(target.shape)}; resume with the run's own model config")
        out[name] = t
    return out


def _local_states(model: torch.nn.Module, name: str, d: dict) -> dict:
    slices = _expert_slices(model)
    if name not in slices:
        return d
    ep_rank, L = slices[name]
    return {k: v[ep_rank * L:(ep_rank + 1) * L] for k, v in d.items()}


def _step_tensor(step: int, group: dict, device: torch.device) -> torch.Tensor:
    """AdamW's per-parameter `step`: a CPU scalar in the default float dtype, on the parameter's device only
    when capturable or fused (torch/optim/adamw.py _init_group)."""
    on_device = group.get("capturable", False) or group.get("fused", False)
    return torch.tensor(float(step), device=device if on_device else "cpu")


def _set_partitioned(opt, params: dict, local: dict, states: dict, step: int) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    base = opt.optimizer
    for group in base.param_groups:  # each group holds one flat fp32 partition of this rank
        for flat in group["params"]:
            base.state[flat] = {"step": _step_tensor(step, group, flat.device),
                                **{k: torch.zeros_like(flat) for k in ADAM_STATES}}
    opt._hp_optimizer_states_linked = False  # link the fragments to the state just created
    opt._lazy_init_hp_params_optimizer_state()
    for name, p in params.items():
        value = local[name].to(p.device, torch.float32)
        safe_set_full_fp32_param(p, value)
        for key in ADAM_STATES:
            safe_set_full_optimizer_state(p, states[name][key].to(p.device, torch.float32), key)


def _set_plain(opt, params: dict, local: dict, states: dict, step: int) -> None:
    """No ZeRO: the torch optimizer over the module's parameters, or DeepSpeed's bf16 wrapper (fp16_groups /
    fp32_groups: fp32 copies beside the bf16 parameters, deepspeed/runtime/fp16/unfused_optimizer.py)."""
    masters = {}
    base = opt
    if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):
        masters = {id(lp): hp for g16, g32 in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(g16, g32)}
        base = opt.optimizer
    group_of = {id(p): g for g in base.param_groups for p in g["params"]}
    for name, p in params.items():
        hp = masters.get(id(p), p)
        hp.copy_(local[name].to(hp.device, hp.dtype))
        base.state[hp] = {"step": _step_tensor(step, group_of[id(hp)], hp.device),
                          **{k: states[name][k].to(hp.device, hp.dtype).clone() for k in ADAM_STATES}}


def _restore_schedule(engine, saved: Optional[dict], path: str) -> None:
    """The LR scheduler's state, and the rates it implies put into the optimizer's groups (a scheduler sets
    them only when it steps)."""
    sched = engine.lr_scheduler
    if sched is None or saved is None:
        return
    if len(saved.get("base_lrs", [])) != len(sched.base_lrs):
        raise CheckpointError(f"checkpoint {path!r}: its LR schedule has {len(saved.get('base_lrs', []))} parameter "
                              f"groups, this run's {len(sched.base_lrs)}; resume with the run's own model config")
    sched.load_state_dict(saved)
    lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
    for group, lr in zip(sched.optimizer.param_groups, lrs):
        group["lr"] = lr
    sched._last_lr = lrs
