"""Start a run from pretrained weights (train.init_from; DESIGN 5.8): the fine-tuning step of ALBERT / BERT (a masked-LM
checkpoint -> a classification run) and of any other task.

- `check(cfg, tokenizer)` (the pre-flight, nothing written): the source is a run directory, checkpoint or release;
  it was trained on a task this run may start from (SOURCES); its backbone has this run's shape (BACKBONE fields);
  its tokenizer is this run's, by content.
- `initialize(model, cfg, log)` (every rank, before the optimizer is built): every tensor of the model that the source
  holds with the same name and shape is copied from it; at expert parallelism each rank takes its experts' slice of
  the consolidated [E, ...] weights. Only the task's heads (HEADS) may be missing from the source or shaped otherwise
  (a classifier of another label count, a ViT head of another class count); they keep their fresh initialisation.
  The optimizer state and the step are not taken: the run starts at step 0 with its own schedule.
"""

from __future__ import annotations

import os

import torch

from wider.checkpoint.paths import CheckpointError, resolve

# The tasks whose weights can start a run of each task.
SOURCES = {"causal_lm": ("causal_lm",), "masked_lm": ("masked_lm",),
           "classification": ("masked_lm", "classification"), "image_classification": ("image_classification",)}
# Tensors (name prefixes) of each task's heads: the only ones a source may lack or hold in another shape.
HEADS = {"causal_lm": (), "masked_lm": ("mlm_", "sop_head."), "classification": ("classifier.",),
         "image_classification": ("head.",)}
# Model fields that shape the shared tensors; a source that differs in any is refused before anything is written.
BACKBONE = ("arch", "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "num_experts",
            "moe_ffn_hidden_size", "moe_layer_freq", "activation", "normalization", "add_bias_linear", "head_dim",
            "embedding_size", "share_norms", "position_embedding", "seq_length", "vocab_size",
            "make_vocab_size_divisible_by", "tie_embeddings", "image_size", "patch_size", "num_channels")


def _source(path: str):
    """(kind, directory, its RunConfig, its tokenizer record, its step)."""
    kind, where = resolve(path)
    if kind == "release":
        from wider.checkpoint.release import read_release

        rel = read_release(where)
        return kind, where, rel["config"], rel["meta"], rel["meta"].get("step")
    from wider.checkpoint.native import inspect
    from wider.checkpoint.rebuild import run_config_of

    info = inspect(where)
    return kind, where, run_config_of(info), info.client, info.step


def check(cfg, tokenizer) -> str:
    """Raise ConfigError (CheckpointError) unless train.init_from can start this run; returns a note for the log."""
    kind, where, source, record, step = _source(cfg.train.init_from)
    task, theirs = cfg.model.task, source.model.task
    if theirs not in SOURCES[task]:
        raise CheckpointError(f"train.init_from {cfg.train.init_from!r} is a {kind} of task {theirs!r}; a {task!r} run "
                              f"starts from {' or '.join(SOURCES[task])} weights: give a run, checkpoint or release of "
                              "that task (e.g. the masked_lm pretraining run for classification)")
    mine, other = cfg.to_dict()["model"], source.to_dict()["model"]
    differ = [f"model.{k} {other.get(k)!r} (this run {mine[k]!r})" for k in BACKBONE if other.get(k) != mine[k]]
    if differ:
        raise CheckpointError(f"train.init_from {where!r} has another backbone: {', '.join(differ[:4])}"
                              f"{' ...' if len(differ) > 4 else ''}; give this run the source's shape (its "
                              "config.json) or start from another source")
    if tokenizer is not None and not tokenizer.matches(record):
        raise CheckpointError(f"train.init_from {where!r} was trained with another tokenizer than {tokenizer.path}; "
                              "fine-tune with the tokenizer it was pretrained with (its copy: RUN_DIR/tokenizer.model "
                              "or the release's tokenizer.model)")
    return f"initialising from {where} ({kind} of task {theirs}, step {step})"


def _tensors(kind: str, where: str) -> dict:
    if kind == "release":
        from safetensors.torch import load_file

        from wider.checkpoint.paths import RELEASE_WEIGHTS

        return load_file(os.path.join(where, RELEASE_WEIGHTS))
    from wider.checkpoint.native import consolidate

    return consolidate(where).weights


def _expert_slices(model: torch.nn.Module) -> dict:
    """name of each stacked expert tensor -> (ep_rank, local experts) of its layer."""
    from wider.moe.layer import MoE

    out = {}
    for prefix, module in model.named_modules():
        if isinstance(module, MoE):
            for name, p in module.deepspeed_moe.experts.named_parameters():
                out[f"{prefix}.deepspeed_moe.experts.{name}"] = (module.ep_rank, p.shape[0])
    return out


def initialize(model: torch.nn.Module, cfg, log=print) -> None:
    """Copy the source's tensors into the freshly built model (see the module docstring)."""
    kind, where = resolve(cfg.train.init_from)
    tensors = _tensors(kind, where)
    heads = HEADS[cfg.model.task]
    slices = _expert_slices(model)
    targets = dict(model.named_parameters())
    for name, buf in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        if leaf not in (model.get_submodule(owner) if owner else model)._non_persistent_buffers_set:
            targets[name] = buf
    fresh, copied = [], 0
    with torch.no_grad():
        for name, target in targets.items():
            value = tensors.get(name)
            if value is not None and name in slices and value.shape[0] != target.shape[0]:
                rank, local = slices[name]
                value = value[rank * local:(rank + 1) * local]
            if value is None or tuple(value.shape) != tuple(target.shape):
                if not name.startswith(heads):
                    raise CheckpointError(
                        f"train.init_from {where!r}: {name} is " + (
                            "missing" if value is None else f"shaped {tuple(value.shape)}, the model "
                                                            f"{tuple(target.shape)}") +
                        "; only the task's heads may differ from the source (a source of another model config?)")
                fresh.append(name)
                continue
            target.copy_(value.to(target.dtype))
            copied += target.numel()
    unused = sorted(set(tensors) - set(targets))
    log(f"[wider] initialised {copied:,} parameters from {where}; fresh: {', '.join(fresh) or 'none'}; not used: "
        f"{len(unused)} tensors of the source{(' (' + ', '.join(unused[:4]) + (' ...' if len(unused) > 4 else '') + ')') if unused else ''}")
