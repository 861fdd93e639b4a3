"""DeepSpeed JSON: load, check, and complete with the keys that follow from the run config.

The JSON in ds_configs/ owns what DeepSpeed owns: ZeRO stage, precision, communication. Batch sizes and
gradient clipping are run-config settings; they are written into the DeepSpeed dict here. A JSON that
also sets one of them must agree, or the run stops with an error naming both places. The optimizer and
LR schedule are built by wider (AdamW with decoupled weight decay, warmup + cosine), so "optimizer" and
"scheduler" blocks are refused rather than silently overridden.

DeepSpeed ignores unknown top-level keys; a key that looks like a misspelling of a known one is an error.
"""

from __future__ import annotations

import difflib
import json
import os
import warnings
from typing import Optional

from wider.config import ConfigError, RunConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Top-level keys of DeepSpeed 0.19's config that a wider run may set, plus our own "moe" block.
KNOWN_KEYS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
    "scheduler", "communication_data_type", "prescale_gradients", "gradient_predivide_factor",
    "sparse_gradients", "fp16", "bf16", "amp", "torch_autocast", "gradient_clipping", "zero_optimization",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "steps_per_print",
    "wall_clock_breakdown", "dump_state", "memory_breakdown", "flops_profiler", "activation_checkpointing",
    "aio", "tensorboard", "wandb", "csv_monitor", "comet", "comms_logger", "autotuning", "elasticity",
    "data_efficiency", "curriculum_learning", "checkpoint", "data_types", "compression_training",
    "seq_parallel_communication_data_type", "timers", "expert_parallel", "nebula", "compile",
    "use_data_before_expert_parallelism", "graph_harvesting", "dataloader_drop_last", "load_universal",
    "use_node_local_storage", "disable_allgather", "gradient_allreduce_op", "moe",
}
# Keys wider derives from the run config: (run-config flag, value getter).
DERIVED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
           "gradient_clipping")


def default_path(moe: bool = False) -> str:
    import torch

    if moe:
        name = "moe_zero1_bf16.json" if torch.cuda.is_available() else "moe_cpu.json"
    else:
        name = "zero1_bf16.json" if torch.cuda.is_available() else "cpu_smoke.json"
    return os.path.join(REPO, "ds_configs", name)


def resolve_path(path: str, moe: bool = False) -> str:
    if path == "auto":
        return default_path(moe)
    if not os.path.isabs(path) and not os.path.exists(path) and os.path.exists(os.path.join(REPO, path)):
        return os.path.join(REPO, path)
    return path


def load(path: str) -> dict:
    """Read a DeepSpeed JSON file; malformed files end with the line and column of the problem."""
    path = resolve_path(path)
    if not os.path.isfile(path):
        raise ConfigError(f"ds_config {path!r} does not exist; pass --ds-config with one of "
                          f"{sorted(os.listdir(os.path.join(REPO, 'ds_configs')))} or your own file")
    with open(path) as f:
        text = f.read()
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"ds_config {path!r} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}; "
                          "fix the file (DeepSpeed JSON allows no comments or trailing commas)") from None
    if not isinstance(d, dict):
        raise ConfigError(f"ds_config {path!r} must hold a JSON object, got {type(d).__name__}")
    return d


# Blocks DeepSpeed reads as objects: a scalar there (--ds-set fp16=true) is refused here, not inside DeepSpeed.
OBJECT_BLOCKS = ("fp16", "bf16", "amp", "zero_optimization", "moe", "activation_checkpointing", "flops_profiler",
                 "tensorboard", "wandb", "csv_monitor", "comms_logger", "data_types", "checkpoint", "aio",
                 "compile", "expert_parallel")


def check(d: dict, path: str) -> None:
    for block in OBJECT_BLOCKS:
        if block in d and not isinstance(d[block], dict):
            raise ConfigError(f"ds_config {path!r}: {block!r} must be an object, got {d[block]!r}; e.g. "
                              f"--ds-set {block}.enabled=true, or {{\"{block}\": {{...}}}} in the JSON")
    for key in d:
        if key in KNOWN_KEYS:
            continue
        close = difflib.get_close_matches(key, KNOWN_KEYS, n=1, cutoff=0.75)
        if close:
            raise ConfigError(f"ds_config {path!r}: unknown key {key!r}; did you mean {close[0]!r}? "
                              "(DeepSpeed would silently ignore it)")
        warnings.warn(f"ds_config {path!r}: key {key!r} is not one wider knows; DeepSpeed may ignore it")
    for key in ("optimizer", "scheduler"):
        if key in d:
            raise ConfigError(f"ds_config {path!r} has an {key!r} block, but the optimizer and LR schedule "
                              "come from the run config (--lr, --min-lr, --warmup-iters, --weight-decay, ...); "
                              "remove the block from the JSON")
    zero = d.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"ds_config {path!r}: zero_optimization must be an object, got {zero!r}")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2):
        raise ConfigError(f"ds_config {path!r}: zero_optimization.stage {stage!r} is not supported; use 0, 1 "
                          "or 2 (DeepSpeed's native MoE refuses ZeRO-3, and wider keeps one code path)")
    if d.get("fp16", {}).get("enabled", False):
        raise ConfigError(f"ds_config {path!r} enables fp16; wider trains in bf16 on GPU and fp32 on CPU: "
                          "set \"bf16\": {\"enabled\": true} or remove the fp16 block")
    if "expert_parallel" in d:
        ep = d["expert_parallel"].get("ep_size") if isinstance(d["expert_parallel"], dict) else None
        raise ConfigError(f"ds_config {path!r} has DeepSpeed's own 'expert_parallel' (AutoEP) block"
                          f"{f' with ep_size {ep}' if ep is not None else ''}: AutoEP would replace the model's "
                          "MoE layers, and ep_size has one home in wider, moe.ep_size. Move it there and remove "
                          "the 'expert_parallel' block")
    moe_settings(d, path)


def moe_settings(d: dict, path: str = "ds_config"):
    """The validated "moe" block (defaults for absent keys)."""
    from wider.moe.settings import MoESettings, MoESettingsError

    try:
        return MoESettings.from_block(d.get("moe"), f"ds_config {path!r}")
    except (MoESettingsError, TypeError) as e:
        raise ConfigError(str(e)) from None


def apply_overrides(d: dict, items: list, path: str) -> dict:
    """KEY=VALUE overrides with dotted keys (moe.ep_size=2); VALUE parsed as JSON, else taken as a string."""
    for item in items:
        key, sep, text = str(item).partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--ds-set {item!r} is not KEY=VALUE with a dotted KEY (e.g. moe.ep_size=2)")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        node = d
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--ds-set {item!r}: {part!r} in ds_config {path!r} is not an object")
            node = child
        node[parts[-1]] = value
    return d


def build(cfg: RunConfig, dp: Optional[int], path: Optional[str] = None) -> dict:
    """The complete DeepSpeed dict for a run with data-parallel size dp. dp None (a launch whose size only the hosts
    know): everything but the checks and keys that need it."""
    t, m = cfg.train, cfg.model
    path = resolve_path(path or t.ds_config, moe=m.num_experts > 0)
    d = apply_overrides(load(path), t.ds_set, path)
    check(d, path)
    if m.num_experts > 0:
        from wider.moe.settings import MoESettingsError

        try:
            moe = moe_settings(d, path)
            moe.check_layout(m.num_experts, m.moe_top_k, dp, f"ds_config {path!r}")
            moe.check_routing(m.moe_router, m.num_experts, m.moe_top_k, t.micro_batch_size, m.ec_softmax_over,
                              f"ds_config {path!r}")
        except MoESettingsError as e:
            raise ConfigError(str(e)) from None
    if dp is None:
        return d
    gas, rem = divmod(t.global_batch_size, t.micro_batch_size * dp)
    if rem or gas < 1:
        raise ConfigError(f"train.global_batch_size {t.global_batch_size} is not a multiple of micro_batch_size "
                          f"{t.micro_batch_size} x data-parallel size {dp}; use --global-batch-size "
                          f"{max(1, gas) * t.micro_batch_size * dp}")
    ours = {"train_batch_size": t.global_batch_size, "train_micro_batch_size_per_gpu": t.micro_batch_size,
            "gradient_accumulation_steps": gas, "gradient_clipping": float(t.clip_grad)}
    flags = {"train_batch_size": "--global-batch-size", "train_micro_batch_size_per_gpu": "--micro-batch-size",
             "gradient_accumulation_steps": "--global-batch-size / (--micro-batch-size x data-parallel size)",
             "gradient_clipping": "--clip-grad"}
    for key in DERIVED:
        if key in d and (isinstance(d[key], bool) or not isinstance(d[key], (int, float))):
            raise ConfigError(f"ds_config {path!r}: {key} must be a number, got {d[key]!r}; better remove it: wider "
                              f"derives it from the run config ({flags[key]})")
        if key in d and float(d[key]) != float(ours[key]):
            raise ConfigError(f"ds_config {path!r} sets {key} = {d[key]} but the run config gives {ours[key]} "
                              f"({flags[key]}); remove {key} from the JSON (wider derives it) or make them agree")
    d.update(ours)
    d.setdefault("steps_per_print", 10**9)  # wider prints its own progress line
    d.setdefault("wall_clock_breakdown", False)
    return d


def uses_bf16(d: dict) -> bool:
    return bool(d.get("bf16", {}).get("enabled", False))


def zero_stage(d: dict) -> int:
    return int(d.get("zero_optimization", {}).get("stage", 0))
