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

import contextlib
import errno
import json
import os
import shutil
import signal
import time
from typing import Optional

import torch
import torch.distributed as dist

from wider import parallel
from wider.checkpoint import reshard
from wider.checkpoint.native import inspect, saved_layout
from wider.checkpoint.paths import (MARKER, RNG_FILE, CheckpointError, ckpt_root, latest_complete, list_checkpoints,
                                    tag_for)
from wider.files import atomic_path, atomic_write_json


class SaveError(RuntimeError):
    """A checkpoint could not be written (a full disk, a quota, a failing file system); the message says what,
    and that the previous checkpoint is intact. The run stops with exit status 1."""


# DeepSpeed copies these into every checkpoint; they cannot read wider's MoE checkpoints (recipes/export.py can).
_RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")


def save(engine, run_dir: str, step: int, client_state: dict, keep: int) -> str:
    """Collective: every rank calls it. Returns the checkpoint directory. Raises SaveError on every rank when any
    rank failed to write (the ranks agree before anything is marked complete)."""
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
    error = None
    try:
        with _fault_injection(engine, step, layout.rank):
            engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=True)
        with atomic_path(os.path.join(path, RNG_FILE.format(rank=layout.rank))) as tmp:
            torch.save(parallel.rng_state(), tmp)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as RuntimeError ("unexpected pos ...")
        error = e
    if parallel.all_reduce_max(1.0 if error is not None else 0.0, layout.device) > 0:
        raise _save_failed(error, path, run_dir, layout.is_main)
    if layout.is_main:
        for where in (path, root):  # DeepSpeed 0.19.8 copies them beside the step directories
            for script in _RECOVERY_SCRIPTS:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(where, script))
        files = {name: os.path.getsize(os.path.join(path, name)) for name in sorted(os.listdir(path))}
        atomic_write_json(os.path.join(path, MARKER), {
            "step": step, **recorded, "time": time.time(), "files": files, "config": client_state.get("config"),
            **{k: client_state[k] for k in ("tokenizer_id", "tokenizer_sha256") if k in client_state}})
        _prune(run_dir, keep, current=path)
    dist.barrier()
    return path


def _save_failed(error, path: str, run_dir: str, is_main: bool) -> SaveError:
    """The SaveError every rank raises; rank 0 also removes the partial directory it was writing (made by this
    save, never complete), which gives the space back."""
    previous = latest_complete(run_dir)
    if is_main:
        shutil.rmtree(path, ignore_errors=True)
    free = shutil.disk_usage(os.path.dirname(path) if os.path.isdir(os.path.dirname(path)) else run_dir).free
    full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT) or \
        "iostream error" in str(error) or "unexpected pos" in str(error) or free < (64 << 20)
    why = (f"no space left on the device ({free / 2**20:.0f} MiB free)" if full else
           f"{type(error).__name__}: {error}" if error is not None else "another rank could not write its files")
    keep = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    return SaveError(f"saving checkpoint {path} failed: {why}; {keep}. Free space (or choose another --run-dir for "
                     "a new run), then continue with --resume auto")


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


@contextlib.contextmanager
def _fault_injection(engine, step: int, rank: int):
    """Failures inside DeepSpeed's writer, for tests/test_training.py (unset in normal runs):
    WIDER_FAULT_IN_SAVE=STEP:RANK:kill   that rank dies (SIGKILL) halfway through writing its first file
    WIDER_FAULT_IN_SAVE=STEP:RANK:enospc its first write fails halfway as a full disk does (OSError ENOSPC)
    Both leave a partly written file under the checkpoint's real name, the damage the completion marker and the
    pre-resume inspection exist for."""
    spec = os.environ.get("WIDER_FAULT_IN_SAVE", "").split(":")
    if len(spec) != 3 or (int(spec[0]), int(spec[1])) != (step, rank):
        yield
        return
    writer = engine.checkpoint_engine
    original = writer.save

    def failing_save(state_dict, path):
        import io

        buf = io.BytesIO()
        torch.save(state_dict, buf)
        with open(path, "wb") as f:
            f.write(buf.getvalue()[: buf.tell() // 2])
            f.flush()
        if spec[2] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, "No space left on device", path)

    writer.save = failing_save
    try:
        yield
    finally:
        writer.save = original


# --- what to resume ----------------------------------------------------------------------------------------------


def verify(path: str):
    """The inspection export and resume share (wider.checkpoint.native.inspect: complete, the model states readable,
    every file the layout needs present), plus every file at the size complete.json recorded and one RNG file per
    rank. Returns the NativeInfo; raises CheckpointError saying what is missing or damaged."""
    info = inspect(path)
    marker = _marker(path)
    for name, size in (marker.get("files") or {}).items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"checkpoint {path!r} lacks {name}, which it was saved with; the checkpoint is "
                                  "damaged or was copied partially")
        if os.path.getsize(file) != size:
            raise CheckpointError(f"checkpoint {path!r}: {name} has {os.path.getsize(file)} bytes, {size} when it "
                                  "was saved; the file is damaged or truncated")
    for rank in range(int(marker.get("world_size") or 0)):
        if not os.path.isfile(os.path.join(path, RNG_FILE.format(rank=rank))):
            raise CheckpointError(f"checkpoint {path!r} lacks {RNG_FILE.format(rank=rank)} (rank {rank}'s random "
                                  "state); the checkpoint is damaged or was copied partially")
    return info


def _marker(path: str) -> dict:
    try:
        with open(os.path.join(path, MARKER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def resume_target(cfg, tokenizer) -> tuple[Optional[str], list]:
    """(the checkpoint to resume or None for a fresh start, notes) for cfg.train.resume, after checking it:
    'none' refuses a run directory with checkpoints (or with another run's config.json); 'auto' takes the newest
    complete checkpoint that passes verify(), passing over damaged ones with a note each; a path must pass verify().
    The checkpoint must have been trained with this model config and tokenizer. Raises ConfigError."""
    from wider.config import ConfigError

    t = cfg.train
    notes: list = []
    if t.resume == "none":
        if latest_complete(t.run_dir):
            raise ConfigError(f"run_dir {t.run_dir!r} already holds checkpoints; continue it with --resume auto or "
                              "start elsewhere with --run-dir")
        _check_fresh_run_dir(cfg)
        return None, notes
    if t.resume != "auto":
        if not os.path.isdir(t.resume):
            raise ConfigError(f"train.resume {t.resume!r} is not a checkpoint directory; give "
                              "RUN_DIR/checkpoints/step_XXXXXXXX, or --resume auto")
        info = verify(t.resume)
        check_compatible(cfg, info, tokenizer)
        return os.path.abspath(t.resume), notes
    for _, path, complete in reversed(list_checkpoints(t.run_dir)):
        if not complete:
            continue
        try:
            info = verify(path)
        except CheckpointError as e:
            notes.append(f"not resuming from {os.path.basename(path)}: {e}")
            continue
        check_compatible(cfg, info, tokenizer)
        if notes:
            notes.append(f"resuming from {os.path.basename(path)}, the newest intact checkpoint")
        return path, notes
    if notes:
        raise ConfigError(f"--resume auto: no intact checkpoint in {t.run_dir!r} ({'; '.join(notes)}); restore the "
                          "files, or start a new run elsewhere with --run-dir")
    _check_fresh_run_dir(cfg)
    return None, notes


def check_compatible(cfg, info, tokenizer) -> None:
    """The checkpoint was trained with this model config (compared through RunConfig, so fields added since compare
    at their defaults) and this tokenizer (by content); raises ConfigError naming what differs."""
    from wider.config import ConfigError, RunConfig

    saved = (info.client.get("config") or {}).get("model")
    if saved is not None:
        saved, now = RunConfig.from_dict({"model": saved}).to_dict()["model"], cfg.to_dict()["model"]
        if saved["task"] != now["task"]:  # DESIGN 5.8: a pretrained checkpoint starts a fine-tuning run, not resumes it
            raise ConfigError(f"checkpoint {info.path!r} is a checkpoint of task {saved['task']!r}, and this run trains "
                              f"model.task {now['task']!r}: it cannot be resumed; to start from its weights give "
                              f"--init-from {info.path} (and a fresh --run-dir)")
        differ = sorted(k for k in now if saved.get(k) != now[k])
        if differ:
            shown = ", ".join(f"model.{k} {saved.get(k)!r} (now {now[k]!r})" for k in differ[:4])
            raise ConfigError(f"checkpoint {info.path!r} was trained with another model config: {shown}"
                              f"{' ...' if len(differ) > 4 else ''}; resume with the run's own config (--config "
                              f"{os.path.join(os.path.dirname(os.path.dirname(info.path)), 'config.json')}) or start "
                              "a new run elsewhere with --run-dir")
    if tokenizer is not None and not tokenizer.matches(info.client):
        raise ConfigError(f"checkpoint {info.path!r} was trained with another tokenizer than {tokenizer.path} (other "
                          "pieces); resume with the run's own tokenizer (its copy: RUN_DIR/tokenizer.model)")


def _check_fresh_run_dir(cfg) -> None:
    """A fresh start may reuse a run directory without checkpoints only for the same run (its config.json has this
    model config): a retry after a run that died before its first checkpoint. Another run's directory is refused."""
    from wider.config import ConfigError, RunConfig

    path = os.path.join(cfg.train.run_dir, "config.json")
    if not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            other = RunConfig.from_dict(json.load(f))
    except (OSError, ValueError) as e:
        raise ConfigError(f"run_dir {cfg.train.run_dir!r} holds a config.json that cannot be read ({e}); start "
                          "elsewhere with --run-dir") from None
    if other.to_dict()["model"] != cfg.to_dict()["model"]:
        raise ConfigError(f"run_dir {cfg.train.run_dir!r} holds another run (its config.json has another model "
                          "config); start elsewhere with --run-dir")
