"""Where checkpoints and releases live and what their files are called: the names every reader and writer of
wider.checkpoint shares (and the one definition of the completion marker).

    RUN_DIR/checkpoints/step_00000120/     one training checkpoint (DeepSpeed's files, one RNG file per rank, and
                                           complete.json once every rank has written: wider.checkpoint.store)
    RELEASE/                               model.safetensors, config.json, tokenizer.model, metadata.json, README.md
                                           (wider.checkpoint.release)

`resolve(path)` tells which of the three a user gave: a release, a checkpoint, or a run directory (its latest
complete checkpoint).
"""

from __future__ import annotations

import os
import re
from typing import Optional

from wider.config import ConfigError

# A checkpoint counts only once this file exists: rank 0 writes it after every rank has finished saving.
MARKER = "complete.json"
MODEL_STATES = "mp_rank_00_model_states.pt"
EXPERT_FILE = "layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt"
ZERO_FILE = "{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
EXPP_FILE = "expp_rank_{rank}_mp_rank_00_optim_states.pt"
RNG_FILE = "rng_rank{rank:05d}.pt"
TAG_RE = re.compile(r"^step_(\d{8})$")
RUN_TOKENIZER = "tokenizer.model"  # RUN_DIR's copy of the tokenizer (with tokenizer.json beside it when it had one)

RELEASE_WEIGHTS = "model.safetensors"
RELEASE_CONFIG = "config.json"
RELEASE_METADATA = "metadata.json"
RELEASE_TOKENIZER = "tokenizer.model"
RELEASE_TOKENIZER_META = "tokenizer.json"
RELEASE_OPTIMIZER = "optimizer.safetensors"
RELEASE_TRAINER_STATE = "trainer_state.json"


class CheckpointError(ConfigError):
    """A checkpoint, run or release directory that cannot be read; the message names the file and the fix.
    A ConfigError: the directory is an input (--resume, --source), so entry points report it and exit 2."""


def ckpt_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: str) -> list[tuple[int, str, bool]]:
    """(step, path, complete) for every checkpoint directory, oldest first."""
    root = ckpt_root(run_dir)
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = TAG_RE.match(name)
        if m:
            path = os.path.join(root, name)
            out.append((int(m.group(1)), path, os.path.isfile(os.path.join(path, MARKER))))
    return sorted(out)


def step_of(path: str) -> int:
    """The step of a checkpoint directory step_XXXXXXXX (its complete.json's, for a directory named otherwise)."""
    m = TAG_RE.match(os.path.basename(os.path.normpath(path)))
    if m:
        return int(m.group(1))
    import json

    with open(os.path.join(path, MARKER)) as f:
        return int(json.load(f)["step"])


def latest_complete(run_dir: str) -> Optional[str]:
    done = [p for _, p, ok in list_checkpoints(run_dir) if ok]
    return done[-1] if done else None


def is_checkpoint_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MODEL_STATES)) or os.path.isfile(os.path.join(path, MARKER))


def is_release_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, RELEASE_METADATA)) and os.path.isfile(os.path.join(path, RELEASE_WEIGHTS))


def resolve(path: str) -> tuple[str, str]:
    """('release' | 'checkpoint', directory) for a release, checkpoint or run directory."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise CheckpointError(f"{path!r} does not exist or is not a directory; give a run directory, a checkpoint "
                              "directory (RUN_DIR/checkpoints/step_XXXXXXXX) or a release made by recipes/export.py")
    if is_release_dir(path):
        return "release", path
    if is_checkpoint_dir(path):
        return "checkpoint", path
    if os.path.basename(path) == "checkpoints" and not os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.dirname(path)  # RUN_DIR/checkpoints given: the run directory is meant
    if os.path.isdir(os.path.join(path, "checkpoints")):
        latest = latest_complete(path)
        if latest is None:
            n = len(list_checkpoints(path))
            raise CheckpointError(f"run directory {path!r} has no complete checkpoint"
                                  f"{f' ({n} incomplete: their saves were interrupted)' if n else ''}; "
                                  "train it further (--resume auto) or give an earlier checkpoint")
        return "checkpoint", latest
    raise CheckpointError(f"{path!r} is neither a run directory (no checkpoints/), a checkpoint directory (no "
                          f"{MODEL_STATES} / {MARKER}) nor a release (no {RELEASE_METADATA} + {RELEASE_WEIGHTS})")
