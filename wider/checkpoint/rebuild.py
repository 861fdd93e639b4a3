"""Build a run's model outside training (no launcher, no DeepSpeed engine) and load full tensors into it.

Why a private one-rank process group: megatron-core 0.16.1's layers cannot run without torch.distributed.
They look their tensor-parallel group up at every forward (e.g. tensor_parallel/layers.py
linear_with_grad_accumulation_and_async_allreduce and VocabParallelEmbedding.forward call
utils.get_tensor_model_parallel_group_if_none, which returns None when torch.distributed is not initialized, and
mappings._reduce then asserts `group is not None`), and GPTModel without an explicit ProcessGroupCollection takes
its groups from parallel_state. Passing one-rank groups of our own through a ProcessGroupCollection does not avoid
it either (measured: the forward still asserts once the default group is gone). So, only when the caller has
none: a one-rank gloo default group over an in-memory HashStore (no port, no environment variables, nothing
listens) and megatron's parallel_state at size 1, exactly the state a one-rank training run has. A caller's
existing group is never touched; it is reused when its tensor-parallel size is 1 (every model is built whole,
experts at ep_size 1, so no collective ever runs). wider.parallel.destroy() removes ours like any other.
"""

from __future__ import annotations

import json
import os

import torch

from wider.checkpoint.paths import CheckpointError


def ensure_local_groups() -> None:
    """A one-rank default process group and megatron parallel_state, unless the caller has them (see above)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if not ps.model_parallel_is_initialized():
        if dist.get_world_size() != 1:
            raise CheckpointError(
                f"this process belongs to a process group of {dist.get_world_size()} ranks but megatron's "
                "parallel_state is not initialized; call wider.parallel.init_distributed() on every rank before "
                "loading a model (or load it in a process without a process group)")
        ps.initialize_model_parallel(tensor_model_parallel_size=1)
    elif ps.get_tensor_model_parallel_world_size() != 1:
        raise CheckpointError(
            f"megatron's parallel_state has tensor-parallel size {ps.get_tensor_model_parallel_world_size()}; a "
            "loaded model is built whole (tensor-parallel size 1): load it where the tensor-parallel size is 1")


def build_for_config(cfg, moe, vocab_size: int, bf16: bool = False) -> torch.nn.Module:
    """The run's model through the architecture registry, whole (ep_size 1 for MoE models), on CPU. moe: the run's
    resolved "moe" block (wider.moe.settings.MoESettings) or None. The caller's CPU RNG state is kept (the build
    draws initial weights that the loaded tensors then replace)."""
    from wider.models import ARCHITECTURES
    from wider.moe.config import MoERuntime

    if cfg.model.arch not in ARCHITECTURES:
        raise CheckpointError(f"the run's model.arch {cfg.model.arch!r} is not one of this wider's architectures "
                              f"{sorted(ARCHITECTURES)}; load it with the wider version that trained it")
    if moe is not None and moe.ep_size != 1:
        raise ValueError(f"build_for_config builds whole models: pass the moe block at ep_size 1, got {moe.ep_size}")
    ensure_local_groups()
    import patches

    # The CPU code paths of megatron-core (RoPE, RNG tracker, KV cache) need these; applying is idempotent and
    # explicit here, as in every entry point (never an import side effect).
    patches.apply_defaults()
    with torch.random.fork_rng(devices=[]):
        return ARCHITECTURES[cfg.model.arch].build(cfg, vocab_size, bf16, None if moe is None else MoERuntime(moe))


def load_tensors(model: torch.nn.Module, tensors: dict, source: str) -> None:
    """Copy full tensors by name (parameters as named_parameters() names them, experts stacked; persistent
    buffers) into the model; every name must match in both directions, with equal shapes."""
    targets = dict(model.named_parameters())
    for name, buf in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if leaf not in module._non_persistent_buffers_set:
            targets[name] = buf
    missing = sorted(set(targets) - set(tensors))
    unexpected = sorted(set(tensors) - set(targets))
    if missing or unexpected:
        raise CheckpointError(f"{source}: the tensors do not fit the model built from its config: missing "
                              f"{missing[:6]}{' ...' if len(missing) > 6 else ''}, unexpected "
                              f"{unexpected[:6]}{' ...' if len(unexpected) > 6 else ''} (a checkpoint from another "
                              "model config or wider version?)")
    with torch.no_grad():
        for name, target in targets.items():
            value = tensors[name]
            if tuple(value.shape) != tuple(target.shape):
                raise CheckpointError(f"{source}: {name} has shape {tuple(value.shape)}, the model built from its "
                                      f"config {tuple(target.shape)}")
            target.copy_(value.to(target.dtype))


def run_config_of(info):
    """The RunConfig a checkpoint was trained with: its client state's "config", else RUN_DIR/config.json."""
    from wider.config import RunConfig

    d = info.client.get("config")
    if d is None:
        run_dir = os.path.dirname(os.path.dirname(info.path))
        path = os.path.join(run_dir, "config.json")
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {info.path!r} records no run config and {path!r} does not exist; "
                                  "copy the run's config.json next to its checkpoints/ directory")
        with open(path) as f:
            d = json.load(f)
    return RunConfig.from_dict(d)


def tokenizer_for(candidates: list, recorded: dict, source: str):
    """The run's SentencePiece tokenizer: the first of `candidates` (paths, best first: the run directory's own copy,
    then the path its config names) that opens and is the tokenizer `recorded` names (by content,
    SentencePieceTokenizer.matches), so a run directory works wherever it is copied to."""
    from wider.data import DataError, SentencePieceTokenizer

    problems = []
    for path in dict.fromkeys(p for p in candidates if p):
        if not os.path.isfile(path):
            problems.append(f"{path} does not exist")
            continue
        try:
            tok = SentencePieceTokenizer(path)
        except DataError as e:
            problems.append(str(e))
            continue
        if tok.matches(recorded):
            return tok
        problems.append(f"{path} holds another tokenizer (other pieces than the run trained with)")
    raise CheckpointError(f"{source}: the run's tokenizer was not found ({'; '.join(problems)}); put the tokenizer the "
                          f"run trained with at {candidates[0]}")


def run_tokenizer_candidates(checkpoint_dir: str, cfg) -> list:
    """Where a checkpoint's tokenizer may be: its run directory's copy (RUN_DIR/tokenizer.model, made at the run's
    start), then the path the run's config names."""
    from wider.checkpoint.paths import RUN_TOKENIZER

    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint_dir)))
    return [os.path.join(run_dir, RUN_TOKENIZER), cfg.data.tokenizer_path]
