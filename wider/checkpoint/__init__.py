"""Portable checkpoints: load any run, checkpoint or release for inference; export releases; resume at another
parallel layout.

- `load_for_inference(path, device, dtype)`: a run directory (its latest complete checkpoint), one checkpoint
  directory (RUN_DIR/checkpoints/step_XXXXXXXX, any ep_size / data-parallel size / ZeRO stage 0-2 / precision)
  or a release directory -> LoadedModel. No DeepSpeed engine and no process group are needed from the caller
  (wider.checkpoint.rebuild explains the private one-rank group megatron-core makes unavoidable).
- `from_pretrained(release_dir, ...)`: the same for a release directory (also `wider.from_pretrained`).
- `export(...)` (wider.checkpoint.release, recipes/export.py): a checkpoint -> a release directory.
- `consolidate(...)` (wider.checkpoint.native): a native DeepSpeed checkpoint -> full tensors by name, fp32
  master weights, Adam states, LR-scheduler state.
- `wider.checkpoint.reshard.load_resharded(engine, path)`: what `--resume` uses when the layout changed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from wider.checkpoint.native import consolidate, inspect
from wider.checkpoint.paths import CheckpointError, resolve
from wider.checkpoint.release import export


@dataclass
class LoadedModel:
    model: Any  # torch.nn.Module: eval mode, on `device`, parameters in `dtype`; MoE layers at ep_size 1
    config: Any  # wider.config.RunConfig: the run's resolved config (for a release: tokenizer = the release's copy)
    moe: Optional[Any]  # wider.moe.settings.MoESettings: the run's resolved "moe" block with ep_size=1; None if dense
    tokenizer: Any  # wider.data.SentencePieceTokenizer: the tokenizer the run trained with (None: the image task)
    source: str  # the checkpoint or release directory the weights came from
    step: Optional[int]  # the training step of the weights, when known


def load_for_inference(path: str, device="cpu", dtype=None, task: Optional[str] = None) -> LoadedModel:
    """path: a run directory (its latest complete checkpoint), one checkpoint directory
    (RUN_DIR/checkpoints/step_XXXXXXXX) or a release directory made by recipes/export.py.
    No DeepSpeed engine and no process group are needed from the caller. dtype: torch.float32 (default) or
    torch.bfloat16 (also 'fp32' / 'bf16'). task: the model.task the caller needs (perplexity and generation:
    'causal_lm'); a run of another task is refused before its weights are read. None = any."""
    import torch

    from wider.checkpoint.native import moe_block
    from wider.checkpoint.rebuild import (build_for_config, load_tensors, run_config_of, run_tokenizer_candidates,
                                          tokenizer_for)
    from wider.config import tokenized
    from wider.data import model_vocab_size
    from wider.devices import resolve_device, resolve_dtype

    dtype = resolve_dtype(dtype)
    device = resolve_device(device)
    kind, where = resolve(path)
    if kind == "release":
        from safetensors.torch import load_file

        from wider.checkpoint.paths import RELEASE_WEIGHTS
        from wider.checkpoint.release import read_release

        rel = read_release(where)
        cfg, moe, step = rel["config"], rel["moe"], rel["meta"].get("step")
        _check_task(cfg, task, where)
        tok = tokenizer_for([cfg.data.tokenizer], rel["meta"], f"release {where!r}") if tokenized(cfg.model) else None
        tensors = load_file(os.path.join(where, RELEASE_WEIGHTS))
    else:
        info = inspect(where)
        cfg = run_config_of(info)
        _check_task(cfg, task, where)
        tok = (tokenizer_for(run_tokenizer_candidates(where, cfg), info.client, f"checkpoint {where!r}")
               if tokenized(cfg.model) else None)
        moe, step = moe_block(info, ep_size=1), info.step
        tensors = consolidate(where, info=info).weights
    vocab = model_vocab_size(cfg.model, tok.vocab_size) if tok is not None else 0
    model = build_for_config(cfg, moe, vocab, bf16=dtype == torch.bfloat16)
    model = model.to(dtype)
    load_tensors(model, tensors, f"{kind} {where!r}")
    model = model.to(device).eval()
    return LoadedModel(model=model, config=cfg, moe=moe, tokenizer=tok, source=where, step=step)


def _check_task(cfg, task: Optional[str], where: str) -> None:
    if task is not None and cfg.model.task != task:
        raise CheckpointError(f"{where!r} is a model of task {cfg.model.task!r}; this tool needs a {task!r} model "
                              "(DESIGN 5.8)")


def from_pretrained(path: str, device="cpu", dtype=None) -> LoadedModel:
    """Load a release directory made by recipes/export.py (wider.from_pretrained)."""
    kind, where = resolve(path)
    if kind != "release":
        raise CheckpointError(f"{path!r} is a DeepSpeed checkpoint, not a release; export it first "
                              f"(python recipes/export.py --source {path} --output RELEASE_DIR) or load it with "
                              "wider.checkpoint.load_for_inference")
    return load_for_inference(where, device=device, dtype=dtype)


__all__ = ["CheckpointError", "LoadedModel", "consolidate", "export", "from_pretrained", "inspect",
           "load_for_inference"]
