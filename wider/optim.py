"""The optimizer and its learning-rate schedule: what the training loop steps and what a checkpoint's optimizer
state is laid out by (wider.checkpoint reads ZeRO partitions and plain optimizer states in this order).

A leaf of the library: it imports the config only, so that the training loop and the checkpoint readers can both
use it without importing each other.

The schedule is our own function rather than megatron-core's OptimizerParamScheduler or one of DeepSpeed's
(WarmupLR / WarmupDecayLR / WarmupCosineLR), because neither can give these rates:
- warmup: step s (0-based) trains at lr * (s + 1) / warmup_iters, so the first step already learns. megatron's
  scheduler starts its warmup at init_lr (lr 0 at step 0 unless init_lr is set, and then the ramp is
  init_lr + (lr - init_lr) * s / warmup, one step behind), and its `step(increment)` takes an argument that
  DeepSpeed's engine does not pass (the engine calls lr_scheduler.step() once per optimizer step). DeepSpeed's
  WarmupCosineLR ramps from warmup_min_ratio at step 0 as well, and reaches the cosine one step later;
- decay: after warmup, cosine / linear / constant from lr to min_lr over exactly the remaining
  train_iters - warmup_iters steps. DeepSpeed's schedulers express min_lr as a ratio of each group's rate and
  offer cosine (WarmupCosineLR) or linear (WarmupDecayLR) in two classes with different warmup rules.
Adopting either would move every learning rate by one step and change the losses of every existing run and
recorded result (the default run's final validation loss is held bitwise by a test), for no gain in function.
"""

from __future__ import annotations

import math

import torch

from wider.config import TrainConfig


def learning_rate(step: int, t: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup over warmup_iters steps, then
    t.lr_decay_style ('cosine', 'linear' or 'constant') from lr to min_lr at train_iters."""
    if t.warmup_iters > 0 and step < t.warmup_iters:
        return t.lr * (step + 1) / t.warmup_iters
    if t.lr_decay_style == "constant":
        return t.lr
    span = max(1, t.train_iters - t.warmup_iters)
    frac = min(1.0, (step - t.warmup_iters) / span)
    if t.lr_decay_style == "linear":
        return t.min_lr + (t.lr - t.min_lr) * (1.0 - frac)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + math.cos(math.pi * frac))


def make_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
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


def make_scheduler(optimizer: torch.optim.Optimizer, t: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """torch's LambdaLR over learning_rate: DeepSpeed's engine steps it once per optimizer step (and saves and
    loads its state with the checkpoint)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate(s, t) / t.lr)
