"""Training checkpoints: DeepSpeed's engine.save_checkpoint plus what makes them safe to resume from.

Layout (wider.checkpoint.paths): RUN_DIR/checkpoints/step_00000120/ holds DeepSpeed's files (model, ZeRO optimizer
shards), one RNG file per rank, and `complete.json`, written by rank 0 only after every rank has finished writing.
A checkpoint without `complete.json` is ignored by `--resume auto` (a rank killed mid-save leaves one), so
the previous complete checkpoint is never touched and is always the one resumed. Older complete
checkpoints beyond `keep_checkpoints` and stale incomplete ones are deleted after a successful save.

`complete.json` and the client state record the layout (world size, tp, dp, moe.ep_size, ZeRO stage,
precision). `load` resumes with DeepSpeed's own load when the layout is the same (exact and cheap) and
through wider.checkpoint.reshard otherwise (another data-parallel size, ep_size, ZeRO stage or precision).
"""

from __future__ import annotations

import os
import shutil
import time

import torch
import torch.distributed as dist

from wider import parallel
from wider.checkpoint import reshard
from wider.checkpoint.native import saved_layout
from wider.checkpoint.paths import MARKER, RNG_FILE, CheckpointError, ckpt_root, list_checkpoints, tag_for
from wider.files import atomic_path, atomic_write_json


def save(engine, run_dir: str, step: int, client_state: dict, keep: int) -> str:
    """Collective: every rank calls it. Returns the checkpoint directory."""
    layout = parallel.current_layout()
    recorded = reshard.engine_layout(engine)
    client_state = {**client_state, "layout": recorded}
    root, tag = ckpt_root(run_dir), tag_for(step)
    path = os.path.join(root, tag)
    if os.path.isfile(os.path.join(path, MARKER)):
        return path  # already saved (a resumed run that stops where it started): never rewrite a good one
    if layout.is_main and os.path.isdir(path):
        shutil.rmtree(path)  # an incomplete attempt at this very step
    dist.barrier()
    engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=True)
    _fault_injection(step, layout.rank)
    with atomic_path(os.path.join(path, RNG_FILE.format(rank=layout.rank))) as tmp:
        torch.save(parallel.rng_state(), tmp)
    dist.barrier()  # every rank's files are on disk before the marker
    if layout.is_main:
        atomic_write_json(os.path.join(path, MARKER), {"step": step, **recorded, "time": time.time()})
        _prune(run_dir, keep, current=path)
    dist.barrier()
    return path


def _prune(run_dir: str, keep: int, current: str) -> None:
    entries = list_checkpoints(run_dir)
    complete = [p for _, p, ok in entries if ok]
    doomed = [p for _, p, ok in entries if not ok and p != current]
    if keep > 0:
        doomed += complete[:-keep]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)


def load(engine, path: str) -> dict:
    """Load a checkpoint directory into the engine (model, optimizer, LR schedule) and restore this rank's
    RNG states. Returns the client state saved with it; when the layout differed from the saving one (and the
    load was re-sharded), its "resume_note" says so."""
    if not os.path.isfile(os.path.join(path, MARKER)):
        raise CheckpointError(f"checkpoint {path!r} is incomplete (no {MARKER}: a save was interrupted); resume "
                              "from an earlier one or use --resume auto, which skips incomplete checkpoints")
    saved, now = saved_layout(path), reshard.engine_layout(engine)
    keys = ("tp", "dp", "ep_size", "zero_stage", "bf16")
    if any(saved[k] != now[k] for k in keys):
        client = reshard.load_resharded(engine, path)
        client["resume_note"] = (f"re-sharded from {reshard.describe(saved)} to {reshard.describe(now)}; "
                                 f"{reshard.RNG_NOTE}")
        return client
    root, tag = os.path.dirname(os.path.abspath(path)), os.path.basename(os.path.normpath(path))
    loaded, client = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                            load_lr_scheduler_states=True)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {path!r}")
    rng_file = os.path.join(path, RNG_FILE.format(rank=parallel.current_layout().rank))
    if os.path.isfile(rng_file):
        parallel.set_rng_state(torch.load(rng_file, weights_only=False))
    return client or {}


def _fault_injection(step: int, rank: int) -> None:
    """WIDER_FAULT_KILL_IN_SAVE=STEP:RANK kills that rank with SIGKILL right after DeepSpeed wrote its files
    for that step and before the checkpoint is marked complete: the failure the marker exists for. Used by
    tests/test_training.py; unset in normal runs."""
    spec = os.environ.get("WIDER_FAULT_KILL_IN_SAVE")
    if spec:
        at_step, at_rank = (int(x) for x in spec.split(":"))
        if step == at_step and rank == at_rank:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
