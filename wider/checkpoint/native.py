"""Read a native DeepSpeed checkpoint (what engine.save_checkpoint writes) into full tensors by parameter name.

No process group and no engine are needed: the files are read one by one on CPU (memory-mapped).

Shape suffixes: E experts, L local experts (E / ep_size), D model width, F expert FFN width.

The layout, as DeepSpeed 0.19.8 writes it (runtime/engine.py _save_checkpoint / _save_moe_checkpoint /
_save_zero_checkpoint, runtime/zero/stage_1_and_2.py state_dict), in RUN_DIR/checkpoints/step_XXXXXXXX/:

- `mp_rank_00_model_states.pt` (written by data-parallel rank 0): "module" = the module state dict without the
  expert keys (bf16 copies in a bf16 run), "param_shapes" (ZeRO: per optimizer group, name -> local shape, in the
  order of the flat buffer), "optimizer" (no ZeRO, dense models: the torch optimizer's state dict),
  "lr_scheduler", "global_steps", "dp_world_size", "mp_world_size", "ds_config" (the resolved DeepSpeed dict,
  our "moe" block included), "num_experts" (one entry per MoE layer, MoE models), and wider's client state
  ("step", "config", "tokenizer_sha256", "layout", ...).
- `layer_<l>_expert_<e>_mp_rank_00_model_states.pt` (MoE): the state-dict keys of global expert e of MoE layer l
  (`<module>.deepspeed_moe.experts.deepspeed_experts.<e>.w1|w2`, the per-expert layout that wider.moe.layer's
  state-dict hooks present for the stacked w1_LDF / w2_LFD), l counting the MoE modules in named_modules() order.
- ZeRO 1/2: `[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt`, one per data-parallel rank r ("bf16_" in bf16
  runs). Its "optimizer_state_dict" holds, per optimizer group i: "single_partition_of_fp32_groups"[i], this
  rank's slice of the group's flat fp32 master weights (end padding removed); "param_slice_mappings"[i], name ->
  fragment_address(start, numel) of every parameter with a fragment in that slice; "base_optimizer_state", the
  torch optimizer's state dict over the flat slices (state[i] = {step, exp_avg, exp_avg_sq}, each as long as the
  slice); "partition_count"[i], the number of ranks the group is split over. A parameter's full flat value is
  its fragments in partition order. Dense groups are split over the data-parallel group (partition = r); expert
  groups over the expert-data-parallel group of their experts (DeepSpeed's groups: ranks r with the same
  ep_rank = r % ep_size, partition = r // ep_size), whose fragments assemble the L local experts of ep_rank;
  the E experts are the ep_size local blocks in ep_rank order (global expert id = ep_rank * L + local id).
- No ZeRO with experts: `expp_rank_<e>_mp_rank_00_optim_states.pt`, the optimizer state dict of expert-parallel
  rank e ("optimizer"). Without ZeRO the optimizer state dict has no parameter names: its order is that of
  wider.optim.make_optimizer over the model, which is rebuilt (or given) to name them.

In a bf16 run the fp32 master weights are the optimizer's (ZeRO's flat partitions, or the bf16 optimizer's
fp32 copies without ZeRO), not the bf16 module copy; in an fp32 run the two are equal.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from wider.checkpoint.paths import EXPERT_FILE, EXPP_FILE, MARKER, MODEL_STATES, ZERO_FILE, CheckpointError

ADAM_STATES = ("exp_avg", "exp_avg_sq")

def _load(path: str):
    """torch.load of a DeepSpeed file (it pickles DeepSpeed objects: fragment_address, ZeroStageEnum, the loss
    scaler, so weights_only=False; these are the run's own files). Memory-mapped: only what is read is paged in."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path!r} is missing; the checkpoint is damaged or was copied "
                              "partially: copy the whole step directory again or use an earlier checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a truncated or foreign file
        raise CheckpointError(f"checkpoint file {path!r} cannot be read ({type(e).__name__}: {e}); it is damaged "
                              "(an interrupted copy?): use another checkpoint") from None


@dataclass
class NativeInfo:
    """What a checkpoint directory says about itself."""

    path: str
    step: int
    dp: int
    tp: int
    ep_size: int
    zero_stage: int
    bf16: bool
    num_experts: list  # experts per MoE layer (DeepSpeed's "num_experts"); [] for a dense model
    ds_config: dict
    client: dict  # the model-states file without tensors ("module", "optimizer" dropped)
    states: dict = field(repr=False, default_factory=dict)  # the whole model-states file

    @property
    def world_size(self) -> int:
        return self.dp * self.tp

    def layout(self) -> dict:
        return {"world_size": self.world_size, "tp": self.tp, "dp": self.dp, "ep_size": self.ep_size,
                "zero_stage": self.zero_stage, "bf16": self.bf16}

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)


def inspect(path: str, require_complete: bool = True) -> NativeInfo:
    """Read a checkpoint directory's metadata and check that every file its layout needs is there."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path!r} is not a directory; give a run directory, a checkpoint directory "
                              "(RUN_DIR/checkpoints/step_XXXXXXXX) or a release directory made by recipes/export.py")
    if require_complete and not os.path.isfile(os.path.join(path, MARKER)):
        if os.path.isfile(os.path.join(path, MODEL_STATES)):
            raise CheckpointError(f"checkpoint {path!r} is incomplete (no {MARKER}: its save was interrupted, so "
                                  "some ranks' files may be missing or stale); use an earlier checkpoint, or the "
                                  "run directory, whose latest complete checkpoint is then taken")
        raise CheckpointError(f"{path!r} is not a checkpoint directory (no {MODEL_STATES}, no {MARKER}); give a "
                              "run directory, RUN_DIR/checkpoints/step_XXXXXXXX or a release directory")
    states = _load(os.path.join(path, MODEL_STATES))
    if not isinstance(states, dict) or "module" not in states:
        raise CheckpointError(f"{os.path.join(path, MODEL_STATES)!r} is not a DeepSpeed model-states file (no "
                              "'module' entry)")
    ds = states.get("ds_config") or {}
    layout = _layout_of(states)
    tp, dp, ep = layout["tp"], layout["dp"], layout["ep_size"]
    if tp != 1:
        raise CheckpointError(f"checkpoint {path!r} was saved with tensor parallelism {tp}; consolidating "
                              "tensor-parallel shards is not supported (models with experts refuse TP > 1 anyway): "
                              "resume it with the same --tensor-parallel instead")
    num_experts = states.get("num_experts") or []
    if not isinstance(num_experts, list):
        num_experts = [int(num_experts)]
    step = states.get("step", states.get("global_steps"))
    client = {k: v for k, v in states.items() if k not in ("module", "optimizer")}
    info = NativeInfo(path=path, step=int(step or 0), dp=dp, tp=tp, ep_size=ep, zero_stage=layout["zero_stage"],
                      bf16=layout["bf16"], num_experts=list(num_experts), ds_config=ds, client=client, states=states)
    if num_experts and dp % ep:
        raise CheckpointError(f"checkpoint {path!r}: moe.ep_size {ep} does not divide the data-parallel size {dp} "
                              "it records; the files are inconsistent")
    for name in _required_files(info):
        if not os.path.isfile(info.file(name)):
            raise CheckpointError(f"checkpoint {path!r} lacks {name} (its layout: dp {dp}, ep_size {ep}, ZeRO "
                                  f"{info.zero_stage}, {'bf16' if info.bf16 else 'fp32'}); the checkpoint is damaged "
                                  "or was copied partially: copy the whole directory again or use another checkpoint")
    return info


def _required_files(info: NativeInfo) -> list:
    names = [EXPERT_FILE.format(layer=l, expert=e) for l, n in enumerate(info.num_experts) for e in range(n)]
    if info.zero_stage in (1, 2):
        names += [ZERO_FILE.format(prefix="bf16_" if info.bf16 else "", rank=r) for r in range(info.dp)]
    elif info.num_experts:
        names += [EXPP_FILE.format(rank=e) for e in range(info.ep_size)]
    return names


def saved_layout(path: str) -> dict:
    """The parallel layout a checkpoint was saved with: from complete.json when it records everything, otherwise
    (checkpoints from before it recorded ep_size / ZeRO stage / precision) from the model-states file."""
    try:
        with open(os.path.join(path, MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        marker = {}
    keys = ("world_size", "tp", "dp", "ep_size", "zero_stage", "bf16")
    if all(k in marker for k in keys):
        return {k: marker[k] for k in keys}
    return _layout_of(_load(os.path.join(path, MODEL_STATES)))  # any tensor-parallel size: only compared


def _layout_of(states: dict) -> dict:
    """The layout a model-states file records (its sizes and the resolved ds_config it was saved with)."""
    ds = states.get("ds_config") or {}
    tp, dp = int(states.get("mp_world_size", 1) or 1), int(states.get("dp_world_size", 1) or 1)
    return {"world_size": tp * dp, "tp": tp, "dp": dp, "ep_size": int((ds.get("moe") or {}).get("ep_size", 1) or 1),
            "zero_stage": int((ds.get("zero_optimization") or {}).get("stage", 0) or 0),
            "bf16": bool((ds.get("bf16") or {}).get("enabled", False))}


# --- consolidation ---------------------------------------------------------------------------------------------

@dataclass
class Consolidated:
    """Full tensors of a checkpoint by parameter name, as an ep_size-1 model names them (experts stacked:
    `...experts.w1_LDF` [E, D, F]). weights: fp32 master weights (plus persistent buffers); optimizer: name ->
    {exp_avg, exp_avg_sq} of the same shapes (None when not asked for); adam_step: the optimizer steps taken."""

    info: NativeInfo
    weights: dict
    optimizer: Optional[dict] = None
    adam_step: Optional[int] = None
    lr_scheduler: Optional[dict] = None


def consolidate(path: str, optimizer: bool = False, model: Optional[torch.nn.Module] = None,
                info: Optional[NativeInfo] = None, progress: bool = False) -> Consolidated:
    """Read checkpoint directory `path` into full tensors by parameter name (see the module docstring).

    optimizer: also the Adam states and step. model: a built model of the run (any ep_size) that names the
    optimizer's parameters when the checkpoint has no ZeRO (its state dict is by position); without it, one is
    built on CPU when needed."""
    info = info or inspect(path)
    weights = _module_tensors(info)
    weights.update(_experts(info, progress))
    out = Consolidated(info=info, weights=weights, lr_scheduler=info.states.get("lr_scheduler"))
    if info.zero_stage in (1, 2):
        masters, states, step = _zero_partitions(info, optimizer, progress)
        _check_same_names(info, weights, masters)
        weights.update(masters)
        if optimizer:
            out.optimizer, out.adam_step = states, step
    elif optimizer or info.bf16:
        masters, states, step = _plain_optimizer(info, model)
        if masters:
            weights.update(masters)
        if optimizer:
            out.optimizer, out.adam_step = states, step
    return out


def _module_tensors(info: NativeInfo) -> dict:
    """The non-expert entries of the module state dict (megatron's `_extra_state` entries are not tensors)."""
    return {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
            for k, v in info.states["module"].items() if torch.is_tensor(v)}


_EXPERT_KEY = re.compile(r"^(?P<prefix>.+)\.deepspeed_experts\.(?P<expert>\d+)\.(?P<name>\w+)$")


def _experts(info: NativeInfo, progress: bool) -> dict:
    """Every expert file -> the stacked [E, ...] parameters of the ep_size-1 model."""
    from wider.moe.layer import STACKED_EXPERT_PARAMS as stacked_names

    found: dict = {}  # (module prefix, stacked name) -> {global expert: tensor}
    files = [(l, e) for l, n in enumerate(info.num_experts) for e in range(n)]
    for l, e in _bar(files, progress, "experts"):
        name = EXPERT_FILE.format(layer=l, expert=e)
        for key, t in _load(info.file(name)).items():
            m = _EXPERT_KEY.match(key)
            if not m or int(m["expert"]) != e or m["name"] not in stacked_names:
                raise CheckpointError(f"{info.file(name)!r} holds key {key!r}, not a weight of expert {e} "
                                      f"({'|'.join(stacked_names)}); the file does not belong to this checkpoint")
            found.setdefault((m["prefix"], stacked_names[m["name"]]), {})[e] = t.detach().float()
    out = {}
    for (prefix, stacked), by_expert in found.items():
        n = max(by_expert) + 1
        missing = sorted(set(range(n)) - set(by_expert))
        if missing:  # inspect() checked the files, so this is a file with the wrong module inside
            raise CheckpointError(f"checkpoint {info.path!r}: experts {missing} of {prefix} are in no expert file")
        out[f"{prefix}.{stacked}"] = torch.stack([by_expert[e] for e in range(n)])
    return out


def _group_partitions(info: NativeInfo, moe_group: bool) -> list:
    """[(rank file index, ep_rank, partition index)] of every rank holding part of a group (module docstring)."""
    if not moe_group or info.ep_size == 1:
        return [(r, 0, r) for r in range(info.dp)]
    return [(r, r % info.ep_size, r // info.ep_size) for r in range(info.dp)]


def _zero_partitions(info: NativeInfo, with_states: bool, progress: bool):
    """ZeRO 1/2: fp32 master weights (and Adam states) of every optimized parameter from the flat partitions."""
    prefix = "bf16_" if info.bf16 else ""
    shapes = info.states.get("param_shapes") or []
    frags: dict = {}  # name -> {(ep_rank, partition): {"param": t, "exp_avg": t, ...}}
    moe_of: dict = {}
    steps = set()
    for r in _bar(range(info.dp), progress, "ZeRO partitions"):
        fname = info.file(ZERO_FILE.format(prefix=prefix, rank=r))
        osd = _load(fname).get("optimizer_state_dict") or {}
        try:
            flats = osd["single_partition_of_fp32_groups"]
            mappings = osd["param_slice_mappings"]
            counts = osd["partition_count"]
            base = osd["base_optimizer_state"]
        except KeyError as e:
            raise CheckpointError(f"{fname!r} is not a ZeRO stage 1/2 optimizer file of DeepSpeed 0.19 (no {e}); "
                                  "this reader supports DeepSpeed's ZeRO 1/2 layout only") from None
        for i, (flat, mapping) in enumerate(zip(flats, mappings)):
            state_i = _group_state(base, i, osd)
            if "step" in state_i:
                steps.add(int(float(state_i["step"])))
            moe = _is_moe_group(base, i, counts[i], info)
            part = [p for p in _group_partitions(info, moe) if p[0] == r][0]
            for name, addr in mapping.items():
                moe_of[name] = moe
                entry = {"param": flat.narrow(0, addr.start, addr.numel)}
                if with_states:
                    for key in ADAM_STATES:
                        if key in state_i:
                            entry[key] = state_i[key].narrow(0, addr.start, addr.numel)
                frags.setdefault(name, {})[(part[1], part[2])] = entry
    local_shape = {name: tuple(shape) for group in shapes for name, shape in group.items()}
    masters, states = {}, {}
    for name, pieces in frags.items():
        if name not in local_shape:
            raise CheckpointError(f"checkpoint {info.path!r}: parameter {name!r} has optimizer partitions but no "
                                  "shape in param_shapes; the files do not belong together")
        shape = local_shape[name]
        ep_ranks = sorted({e for e, _ in pieces})
        full = {}
        for key in ("param", *(ADAM_STATES if with_states else ())):
            blocks = []
            for e in ep_ranks:
                parts = sorted((p, v[key]) for (er, p), v in pieces.items() if er == e and key in v)
                flat = torch.cat([t for _, t in parts])
                if flat.numel() != torch.Size(shape).numel():
                    raise CheckpointError(f"checkpoint {info.path!r}: the partitions of {name!r} hold {flat.numel()} "
                                          f"values for shape {shape}; the ZeRO files are damaged or mixed")
                blocks.append(flat.view(shape).float())
            full[key] = torch.cat(blocks) if moe_of[name] and info.ep_size > 1 else blocks[0]
        masters[name] = full.pop("param")
        if with_states:
            states[name] = full
    return masters, states, _one_step(steps, info)


def _group_state(base, i: int, osd: dict) -> dict:
    """State of flat group i: a torch optimizer state dict (DeepSpeed's default) or, with
    zero_optimization.elastic_checkpoint, a list of per-group states plus base_optimizer_state_step."""
    if isinstance(base, dict) and "state" in base:
        return dict(base["state"].get(i, {}))
    state = dict(base[i])
    if "base_optimizer_state_step" in osd:
        state["step"] = osd["base_optimizer_state_step"]
    return state


def _is_moe_group(base, i: int, count: int, info: NativeInfo) -> bool:
    if isinstance(base, dict) and "param_groups" in base:
        return bool(base["param_groups"][i].get("moe", False))
    return info.ep_size > 1 and count == info.dp // info.ep_size


def _one_step(steps: set, info: NativeInfo) -> int:
    if len(steps) > 1:
        raise CheckpointError(f"checkpoint {info.path!r}: optimizer groups disagree on the Adam step {sorted(steps)}")
    return steps.pop() if steps else 0


def _plain_optimizer(info: NativeInfo, model: Optional[torch.nn.Module]):
    """No ZeRO: the optimizer state dict(s) by position -> names (make_optimizer's order over the model). bf16
    runs keep fp32 copies in DeepSpeed's bf16 optimizer ('fp32_groups', same order)."""
    if info.num_experts:
        per_ep = [_load(info.file(EXPP_FILE.format(rank=e))).get("optimizer") for e in range(info.ep_size)]
    else:
        per_ep = [info.states.get("optimizer")]
    if any(sd is None for sd in per_ep):
        raise CheckpointError(f"checkpoint {info.path!r} holds no optimizer state (saved without an optimizer?)")
    order = _param_order(info, model)
    masters: dict = {}  # name -> [one block per expert-parallel rank for experts, one block for the rest]
    states: dict = {}  # name -> {exp_avg: [blocks], exp_avg_sq: [blocks]}
    steps = set()
    for e, sd in enumerate(per_ep):
        torch_sd = sd.get("optimizer_state_dict", sd)  # bf16: DeepSpeed's wrapper around the torch state dict
        groups = torch_sd["param_groups"]
        if [len(g["params"]) for g in groups] != [len(names) for names in order]:
            raise CheckpointError(f"checkpoint {info.path!r}: its optimizer groups hold "
                                  f"{[len(g['params']) for g in groups]} parameters, the run's model "
                                  f"{[len(n) for n in order]}; the config does not match the checkpoint")
        fp32_groups = sd.get("fp32_groups")
        for gi, (group, names) in enumerate(zip(groups, order)):
            if e > 0 and not (group.get("moe", False) and info.ep_size > 1):
                continue  # dense parameters are replicated: expert-parallel rank 0's copy serves
            for pos, (index, name) in enumerate(zip(group["params"], names)):
                st = torch_sd["state"].get(index, {})
                if "step" in st:
                    steps.add(int(float(st["step"])))
                if fp32_groups is not None:
                    masters.setdefault(name, []).append(fp32_groups[gi][pos].detach().float())
                for key in ADAM_STATES:
                    if key in st:
                        states.setdefault(name, {}).setdefault(key, []).append(st[key].detach().float())
    cat = lambda ts: torch.cat(ts) if len(ts) > 1 else ts[0]  # noqa: E731 - expert blocks in ep_rank order
    masters = {n: cat(ts) for n, ts in masters.items()}
    states = {n: {k: cat(ts) for k, ts in d.items()} for n, d in states.items()}
    return masters, states, _one_step(steps, info)


def _param_order(info: NativeInfo, model: Optional[torch.nn.Module]) -> list:
    """Parameter names per optimizer group, in wider.optim.make_optimizer's order (which the run used)."""
    from wider.optim import make_optimizer

    if model is None:
        from wider.checkpoint.rebuild import build_for_config, run_config_of

        cfg = run_config_of(info)
        model = build_for_config(cfg, moe_block(info, ep_size=1), vocab_size_of(info, cfg))
    names = {p: n for n, p in model.named_parameters()}
    opt = make_optimizer(model, run_config_of(info).train)
    return [[names[p] for p in g["params"]] for g in opt.param_groups]


def _check_same_names(info: NativeInfo, weights: dict, masters: dict) -> None:
    """Every parameter the module had must have an fp32 master (and vice versa); buffers have none."""
    missing = sorted(set(masters) - set(weights))
    if missing:
        raise CheckpointError(f"checkpoint {info.path!r}: the optimizer holds parameters {missing[:5]} that the "
                              "module state dict lacks; the files do not belong together")


def moe_block(info: NativeInfo, ep_size: Optional[int] = None):
    """The run's resolved "moe" block (wider.moe.settings.MoESettings), optionally at another ep_size; None for a
    dense model."""
    import dataclasses

    from wider.moe.settings import MoESettings

    if not info.num_experts:
        return None
    s = MoESettings.from_block(info.ds_config.get("moe"), f"checkpoint {info.path!r} ds_config")
    return dataclasses.replace(s, ep_size=ep_size) if ep_size is not None else s


def vocab_size_of(info: NativeInfo, cfg) -> int:
    """The vocabulary the run built its model with (wider.data.model_vocab_size, the training loop's rule; the saved
    embedding is padded, so it cannot tell)."""
    from wider.data import SentencePieceTokenizer, model_vocab_size

    return model_vocab_size(cfg.model, None if cfg.model.vocab_size else SentencePieceTokenizer(cfg.data.tokenizer_path).vocab_size)


def _bar(items, enabled: bool, desc: str):
    items = list(items)
    if not enabled or len(items) < 2:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="file", leave=False)
