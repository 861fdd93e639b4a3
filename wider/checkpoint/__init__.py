"""Portable checkpoints: load any run, checkpoint or release for inference; export releases; resume at another
parallel layout.

- `load_for_inference(path, device, dtype)`: a run directory (its latest complete checkpoint), one checkpoint
  directory (RUN_DIR/checkpoints/step_XXXXXXXX, any ep_size / data-parallel size / ZeRO stage 0-2 / precision)
  or a release directory -> LoadedModel. No DeepSpeed engine and no process group are needed from the caller
  (wider.checkpoint.model explains the private one-rank group megatron-core makes unavoidable).
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

from wider.checkpoint.native import CheckpointError, consolidate, inspect, is_checkpoint_dir
from wider.checkpoint.release import export, is_release_dir


@dataclass
class LoadedModel:
    model: Any  # torch.nn.Module: eval mode, on `device`, parameters in `dtype`; MoE layers at ep_size 1
    config: Any  # wider.config.RunConfig: the run's resolved config (for a release: tokenizer = the release's copy)
    moe: Optional[Any]  # wider.moe.settings.MoESettings: the run's resolved "moe" block with ep_size=1; None if dense
    tokenizer: Any  # wider.data.SentencePieceTokenizer: the tokenizer the run trained with
    source: str  # the checkpoint or release directory the weights came from
    step: Optional[int]  # the training step of the weights, when known


def _resolve(path: str) -> tuple[str, str]:
    """('release' | 'checkpoint', directory) for a release, checkpoint or run directory."""
    from wider.training.checkpoint import latest_complete, list_checkpoints

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
                          "mp_rank_00_model_states.pt / complete.json) nor a release (no metadata.json + "
                          "model.safetensors)")


def _dtype(dtype):
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype {dtype} is not a floating dtype a model can run in; use torch.float32 or "
                             "torch.bfloat16")
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if str(dtype) not in names:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(names)} or a torch dtype")
    return names[str(dtype)]


def load_for_inference(path: str, device="cpu", dtype=None) -> LoadedModel:
    """path: a run directory (its latest complete checkpoint), one checkpoint directory
    (RUN_DIR/checkpoints/step_XXXXXXXX) or a release directory made by recipes/export.py.
    No DeepSpeed engine and no process group are needed from the caller. dtype: torch.float32 (default) or
    torch.bfloat16 (also 'fp32' / 'bf16')."""
    import torch

    from wider.checkpoint.model import build_for_config, load_tensors, run_config_of, tokenizer_for
    from wider.checkpoint.native import moe_block

    dtype = _dtype(dtype)
    kind, where = _resolve(path)
    if kind == "release":
        from safetensors.torch import load_file

        from wider.checkpoint.release import WEIGHTS, read_release

        rel = read_release(where)
        cfg, moe, step = rel["config"], rel["moe"], rel["meta"].get("step")
        tok = tokenizer_for(cfg.data.tokenizer, rel["meta"].get("tokenizer_sha256"), f"release {where!r}")
        tensors = load_file(os.path.join(where, WEIGHTS))
    else:
        info = inspect(where)
        cfg = run_config_of(info)
        tok = tokenizer_for(cfg.data.tokenizer, info.client.get("tokenizer_sha256"), f"checkpoint {where!r}")
        moe, step = moe_block(info, ep_size=1), info.step
        tensors = consolidate(where, info=info).weights
    vocab = cfg.model.vocab_size or tok.vocab_size
    model = build_for_config(cfg, moe, vocab, bf16=dtype == torch.bfloat16)
    model = model.to(dtype)
    load_tensors(model, tensors, f"{kind} {where!r}")
    model = model.to(torch.device(device)).eval()
    return LoadedModel(model=model, config=cfg, moe=moe, tokenizer=tok, source=where, step=step)


def from_pretrained(path: str, device="cpu", dtype=None) -> LoadedModel:
    """Load a release directory made by recipes/export.py (wider.from_pretrained)."""
    kind, where = _resolve(path)
    if kind != "release":
        raise CheckpointError(f"{path!r} is a DeepSpeed checkpoint, not a release; export it first "
                              f"(python recipes/export.py --source {path} --output RELEASE_DIR) or load it with "
                              "wider.checkpoint.load_for_inference")
    return load_for_inference(where, device=device, dtype=dtype)


__all__ = ["CheckpointError", "LoadedModel", "consolidate", "export", "from_pretrained", "inspect",
           "load_for_inference"]
