"""Every input of a training run checked once, before any rank starts and before anything is written.

    check(cfg, world_size) -> Preflight     raises ConfigError / DataError: one message naming the value and the fix

In this order (README, "Operations", says the same):
1. the run config's fields and, at world_size ranks, the parallel layout (wider.models.validate);
2. the DeepSpeed JSON and its "moe" block for that data-parallel size (wider.ds_config.build);
3. the tokenizer (it opens; its vocabulary fits model.vocab_size; none for the image task) and the task's inputs
   (wider.tasks: every dataset prefix there, not truncated, made with this tokenizer's vocabulary; the classification
   files' columns and labels; every image of the image folders);
4. the run directory: not in use by a running run (its lock), and what to resume (wider.checkpoint.store.
   resume_target: --resume none refuses a directory that holds checkpoints or another run's config; auto takes the
   newest complete checkpoint whose files are all there at their recorded sizes, passing over damaged ones and
   saying which and why; an explicit checkpoint must be complete and intact);
5. the resume target against this run: the same model config and the same tokenizer (by content), with our
   message, before DeepSpeed reads anything; or, for a fresh start with train.init_from, the pretrained source
   (wider.checkpoint.init.check: a run, checkpoint or release of a task it can start from, the same backbone and
   tokenizer).

wider.launch (./run.sh, `wider-launch`) runs it in one process before it starts the ranks; every rank runs it again
at set-up (wider.training.loop), so that a plain `deepspeed` launch is checked by the same code.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Optional

from wider import ds_config
from wider.checkpoint import store
from wider.config import ConfigError, RunConfig
from wider.data import DataError, SentencePieceTokenizer, model_vocab_size
from wider.files import RunDirLock
from wider.models import validate
from wider.tasks.registry import task_of


@dataclass
class Preflight:
    """What the checks decided: the checkpoint to resume (None: a fresh start) and why."""

    resume_from: Optional[str]
    notes: list = field(default_factory=list)  # e.g. damaged checkpoints passed over
    vocab_size: int = 0


def check(cfg: RunConfig, world_size: Optional[int]) -> Preflight:
    """Raise ConfigError / DataError for the first invalid input (the module docstring lists the checks)."""
    t = cfg.train
    validate(cfg, world_size)
    # world_size None: a launch whose size only the hosts know; the ranks check the layout again.
    ds_config.build(cfg, None if world_size is None else world_size // t.tensor_parallel)
    task = task_of(cfg)
    tokenizer = SentencePieceTokenizer(cfg.data.tokenizer_path) if task.uses_tokenizer else None
    vocab = model_vocab_size(cfg.model, tokenizer.vocab_size) if tokenizer is not None else 0
    task.check_inputs(tokenizer)
    holder = RunDirLock.holder(t.run_dir)
    if holder is not None:
        raise ConfigError(f"run directory {t.run_dir!r} is in use by another run ({holder}); wait for it to end, or "
                          "train elsewhere with --run-dir")
    resume_from, notes = store.resume_target(cfg, tokenizer)
    if t.init_from and resume_from is None:
        from wider.checkpoint.init import check as check_source

        notes.append(check_source(cfg, tokenizer))
    return Preflight(resume_from=resume_from, notes=notes, vocab_size=vocab)


class ReportedElsewhere(ConfigError):
    """This rank's inputs passed, another rank's did not: that rank prints the reason; this one exits 2 quietly."""


def check_on_every_rank(cfg: RunConfig, layout) -> tuple[Preflight, Optional[RunDirLock]]:
    """check() on every rank of a launch, then the run directory's lock taken by rank 0. The ranks agree before any
    of them goes on: if any failed, the first failing rank raises its error and every other one ReportedElsewhere,
    so the reason is printed once and every rank exits 2. Returns the result and rank 0's held lock."""
    from wider import parallel

    def agree(error: Optional[Exception]) -> None:
        first = -parallel.all_reduce_max(-(layout.rank if error is not None else layout.world_size), layout.device)
        if first < layout.world_size:
            raise error if error is not None and first == layout.rank else ReportedElsewhere("")

    result, error = None, None
    try:
        result = check(cfg, layout.world_size)
    except (ConfigError, DataError) as e:
        error = e
    agree(error)
    lock = None
    if layout.is_main:
        lock = RunDirLock(cfg.train.run_dir)
        if not lock.acquire():
            error = ConfigError(f"run directory {cfg.train.run_dir!r} is in use by another run "
                                f"({RunDirLock.holder(cfg.train.run_dir)}); wait for it to end, or train elsewhere "
                                "with --run-dir")
            lock = None
    agree(error)
    return result, lock


def main(script: Optional[str], argv: list, world_size: Optional[int]) -> int:
    """`wider-launch`'s pre-flight: parse the recipe's arguments as the recipe will, check, print one line on
    failure. Returns the exit status (0 = go ahead, 2 = invalid input)."""
    from wider import cli, presets
    from wider.models import ARCHITECTURES
    from wider.tasks import DEFAULT_PRESETS, RECIPES

    arch = _arch_of(script, ARCHITECTURES)
    task = next((k for k, v in RECIPES.items() if script and os.path.basename(v) == os.path.basename(script)), None)
    if arch is None and task is None:
        return 0  # not one of wider's training recipes: nothing of ours to check
    default = presets.default_for(arch) if arch is not None else DEFAULT_PRESETS[task]
    cfg = cli.parse(argv, default_preset=default, arch=arch, task=task or "causal_lm")  # exits 2 for bad flags
    try:
        pre = check(cfg, world_size)
    except (ConfigError, DataError) as e:
        print(f"error: {cli.with_flags(str(e))}", file=sys.stderr, flush=True)
        return 2
    for note in pre.notes:
        print(f"[wider] {note}", flush=True)
    return 0


def _arch_of(script: Optional[str], architectures: dict) -> Optional[str]:
    """The architecture a recipe script trains (its registry entry names the script), None for another script."""
    if script is None:
        return None
    name = os.path.basename(script)
    for arch, entry in architectures.items():
        if os.path.basename(entry.recipe) == name:
            return arch
    return None
