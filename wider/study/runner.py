"""Plan and train a study: every arm x seed as a run of the normal recipes, through the sweep's runner.

A run is a `wider.scaling.sweep.PlannedRun` trained by `wider.scaling.sweep.train_run` (one runner for sweeps and
studies): OUT/ARM-sSEED/ holds the recipe's run directory and its train.log; a finished run (summary.json) is
skipped, a partial one resumes with --resume auto, and a run directory started with other flags is refused. The
study adds: its arms' flags (preset, overrides, the scale's common flags, the schedule laid out over the token
budget), seeds, several runs at a time (--jobs), a learning-rate grid per architecture family, and a record of
failures (OUT/failures.json) so that the table reports a failed arm as failed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import shlex
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from wider.files import atomic_write_json
from wider.scaling.sweep import REPO, GridError, PlannedRun, parse_recipe_flags, train_run
from wider.studies import Arm, Match, Scale, Study


class StudyError(ValueError):
    """Invalid input to a study (unknown study or scale, flags, a directory of another study); nothing was
    trained. The message names the problem and the fix."""


# Flags the study sets itself for every run; after -- they would silently fight its budget and schedule.
OWN_FLAGS = ("--preset", "--config", "--run-dir", "--resume", "--train-iters", "--warmup-iters", "--lr", "--min-lr",
             "--lr-decay-style", "--seed", "--eval-interval", "--save-interval", "--exit-at-iter")


# ----------------------------------------------------------------------------------------------------------
# Quantities the matching rules compare (wider.info's counters; nothing re-derived)


def _active_less_routing(info: dict, cfg) -> float:
    """Active parameters without the routing parameters of the MoE layers (routers, expert choice's output
    LayerNorm, shared experts: whatever one MoE layer holds beside its routed experts, by the counter's own
    moe_layer_params and expert_params), which the fine-grained paper does not count. A model without experts:
    its active parameters."""
    if "extra_moe_layer_params" not in info or not cfg.model.num_experts:
        return info["params_active"]
    routing = info["extra_moe_layer_params"] - cfg.model.num_experts * info["extra_expert_params"]
    return info["params_active"] - info["extra_moe_layers"] * routing


QUANTITIES: dict[str, Callable] = {
    "active_less_routing": _active_less_routing,
    "expansion_rate": lambda info, cfg: info.get("extra_expansion_rate", 1.0),
    "num_layers": lambda info, cfg: cfg.model.num_layers,
    "hidden_size": lambda info, cfg: cfg.model.hidden_size,
}


def quantity(name: str, info: dict, cfg) -> float:
    if name in QUANTITIES:
        return QUANTITIES[name](info, cfg)
    if name in info:
        return info[name]
    raise StudyError(f"matching rule on {name!r}: not a wider.info quantity ({', '.join(sorted(info))}) nor one of "
                     f"{', '.join(QUANTITIES)}")


@dataclass
class MatchResult:
    match: Match
    values: dict  # arm name -> value
    deviation: float  # largest |value - first| / |first|

    @property
    def ok(self) -> bool:
        return self.deviation <= self.match.rel_tol + 1e-12


# ----------------------------------------------------------------------------------------------------------
# The plan


@dataclass
class ArmPlan:
    arm: Arm
    family: str
    runs: list  # PlannedRun per seed, in seed order; empty when skipped
    skipped: str = ""  # why the arm is not trained (a field this version of wider lacks)
    cfg: object = None  # the first seed's RunConfig
    info: dict = field(default_factory=dict)  # wider.info.describe of it
    lr: float = 0.0


@dataclass
class StudyPlan:
    study: Study
    scale_name: str
    scale: Scale
    out: str
    extra: list
    seeds: int
    steps: int
    arms: list  # ArmPlan, in the study's order
    lrs: dict  # family -> peak learning rate chosen by a grid (absent: the preset's)
    tokens: Optional[float] = None  # the --tokens override (None: the scale's budget)

    def arm(self, name: str) -> ArmPlan:
        return next(a for a in self.arms if a.arm.name == name)

    def runs(self) -> list:
        """Every run, seed-major (one seed of every arm first): an interrupted study has the most arms covered."""
        return [a.runs[s] for s in range(self.seeds) for a in self.arms if a.runs]


def override_flags(overrides: Sequence[str], where: str) -> list[str]:
    """'model.num_experts=8' -> ['--num-experts', '8']; booleans -> --x / --no-x; 'moe.k=v' entries -> one
    --ds-set (argparse keeps only the last occurrence of a repeated --ds-set)."""
    from wider.config import RunConfig

    bools = {f.name for sec in RunConfig().sections().values() for f in dataclasses.fields(sec)
             if f.type in (bool, "bool")}
    flags, ds_set = [], []
    for item in overrides:
        key, sep, value = item.partition("=")
        section, _, name = key.partition(".")
        if not sep or not name or section not in ("model", "data", "train", "moe"):
            raise StudyError(f"{where}: override {item!r} is not SECTION.FIELD=VALUE (model., data., train. or moe.)")
        if section == "moe":
            ds_set.append(f"{key}={value}")
        elif name in bools:
            if value.lower() not in ("true", "false"):
                raise StudyError(f"{where}: override {item!r}: {key} takes true or false")
            flags.append(("--" if value.lower() == "true" else "--no-") + name.replace("_", "-"))
        else:
            flags += ["--" + name.replace("_", "-"), value]
    return flags + (["--ds-set", *ds_set] if ds_set else [])


def missing_fields(arm: Arm) -> list[str]:
    from wider.config import RunConfig

    have = {f"{sec}.{f.name}" for sec, obj in RunConfig().sections().items() for f in dataclasses.fields(obj)}
    return [r for r in arm.requires if r not in have]


def data_flags(scale: Scale, extra: Sequence[str], echo=print) -> list[str]:
    """The scale's corpus: the embedded one re-tokenized at scale.vocab (prepared once into cache/embedded_V),
    unless the flags after -- name a corpus."""
    if "--data-path" in extra or scale.vocab is None:
        return []
    from data_prep.prepare_embedded import prepare_embedded

    got = prepare_embedded(out_dir=str(REPO / "cache" / f"embedded_{scale.vocab}"), vocab_size=scale.vocab,
                           quiet=True)
    if not got["cached"]:
        echo(f"prepared the embedded corpus with a {scale.vocab}-piece vocabulary in {got['out_dir']}")
    return ["--data-path", got["prefix"], "--tokenizer", got["tokenizer"]]


def check_extra(extra: Sequence[str]) -> None:
    for flag in OWN_FLAGS:
        if flag in extra:
            raise StudyError(f"{flag} after -- is set by the study itself (token budget, schedule, seeds, run "
                             "directories); remove it (learning rates: --lr-grid or the study's definition)")


def plan(study: Study, scale_name: str, out: str, extra: Sequence[str] = (), seeds: Optional[int] = None,
         tokens: Optional[float] = None, lrs: Optional[dict] = None, echo=print) -> StudyPlan:
    """Every arm's runs with their flags, configs and counts. Raises StudyError / GridError (invalid input)."""
    import warnings

    warnings.filterwarnings("ignore")  # megatron-core warns at import (the counters import it)
    from wider.info import describe
    from wider.models import ARCHITECTURES

    if scale_name not in study.scales:
        raise StudyError(f"study {study.name!r} has no scale {scale_name!r}; it has {', '.join(study.scales)}")
    scale = study.scales[scale_name]
    extra = list(extra)
    check_extra(extra)
    if seeds is not None and seeds < 1:
        raise StudyError(f"--seeds {seeds}: give at least 1")
    seeds = seeds or scale.seeds
    budget = tokens if tokens is not None else scale.tokens
    if not budget > 0:
        raise StudyError(f"--tokens {budget}: give a positive token count")
    lrs = dict(lrs or {})
    common = [*scale.flags, *data_flags(scale, extra, echo), *extra]
    out = os.path.abspath(out)
    arms, steps = [], None
    for arm in study.scales[scale_name].arms:
        missing = missing_fields(arm)
        if missing:
            arms.append(ArmPlan(arm=arm, family=arm.family, runs=[],
                                skipped=f"needs {', '.join(missing)}, which this version of wider does not have"))
            continue
        what = f"study {study.name} ({scale_name}), arm {arm.name}"
        base_flags = ["--preset", arm.preset, *override_flags(arm.overrides, what), *common]
        base = parse_recipe_flags(base_flags, what)
        per_step = base.train.global_batch_size * base.model.seq_length
        arm_steps = max(1, round(budget / per_step))
        if steps is not None and arm_steps != steps:
            raise StudyError(f"{what}: {per_step} tokens per step gives {arm_steps} steps where the other arms take "
                             f"{steps}; give every arm the same batch and sequence length (the scale's flags)")
        steps = arm_steps
        family = arm.family or base.model.arch
        lr = lrs.get(family, base.train.lr)
        runs = []
        for seed in range(1, seeds + 1):
            name = f"{arm.name}-s{seed}"
            flags = [*base_flags, *schedule_flags(scale, steps, lr), "--seed", str(seed)]
            run_dir = os.path.join(out, name)
            cfg = parse_recipe_flags(flags + ["--run-dir", run_dir], f"{what}, seed {seed}")
            recipe = str(REPO / ARCHITECTURES[cfg.model.arch].recipe)
            runs.append(PlannedRun(name=name, args=flags, recipe=recipe, run_dir=run_dir, cfg=cfg,
                                   info=describe(cfg) if seed == 1 else runs[0].info))
        arms.append(ArmPlan(arm=arm, family=family, runs=runs, cfg=runs[0].cfg, info=runs[0].info, lr=lr))
    names = [a.arm.name for a in arms]
    if study.reference not in names:
        raise StudyError(f"study {study.name}: the reference arm {study.reference!r} is not one of {names}")
    return StudyPlan(study=study, scale_name=scale_name, scale=scale, out=out, extra=extra, seeds=seeds,
                     steps=steps or 0, arms=arms, lrs=lrs, tokens=tokens)


def schedule_flags(scale: Scale, steps: int, lr: float) -> list[str]:
    """The same schedule shape for every arm: linear warmup over scale.warmup of the steps, cosine to
    scale.min_lr_ratio x the peak; periodic evaluations and checkpoints spread over the run."""
    return ["--train-iters", str(steps), "--warmup-iters", str(max(1, round(scale.warmup * steps))),
            "--lr-decay-style", "cosine", "--lr", f"{lr:g}", "--min-lr", f"{lr * scale.min_lr_ratio:g}",
            "--eval-interval", str(max(1, steps // scale.evals)),
            "--save-interval", str(max(1, steps // scale.saves))]


def check_matches(p: StudyPlan) -> list[MatchResult]:
    """Each matching rule of the study over its trained arms (skipped arms aside), from the counters."""
    out = []
    for m in p.study.matches:
        order = list(m.arms) or [a.arm.name for a in p.arms]  # deviations are relative to the first arm named
        arms = sorted((a for a in p.arms if a.runs and a.arm.name in order), key=lambda a: order.index(a.arm.name))
        values = {a.arm.name: quantity(m.quantity, a.info, a.cfg) for a in arms}
        first = next(iter(values.values()), 0)
        dev = max((abs(v - first) / abs(first) if first else abs(v) for v in values.values()), default=0.0)
        out.append(MatchResult(match=m, values=values, deviation=dev))
    return out


# ----------------------------------------------------------------------------------------------------------
# Training


def failures_path(out: str) -> str:
    return os.path.join(out, "failures.json")


def read_failures(out: str) -> dict:
    try:
        with open(failures_path(out)) as f:
            return dict(json.load(f))
    except (OSError, ValueError, TypeError):
        return {}


def record_study(p: StudyPlan, lr_grid: Optional[dict]) -> None:
    """OUT/study.json: what `report` needs to rebuild the plan (the flags after --, seeds, tokens, the grid's
    choices). Refuses a directory that holds another study."""
    path = os.path.join(p.out, "study.json")
    try:
        with open(path) as f:
            before = json.load(f)
    except (OSError, ValueError):
        before = None
    if before and (before.get("study"), before.get("scale")) != (p.study.name, p.scale_name):
        raise StudyError(f"{p.out} holds study {before.get('study')!r} at scale {before.get('scale')!r}; give "
                         "another --out")
    os.makedirs(p.out, exist_ok=True)
    atomic_write_json(path, {"study": p.study.name, "scale": p.scale_name, "extra": p.extra, "seeds": p.seeds,
                             "tokens": p.tokens, "steps": p.steps, "lrs": p.lrs, "lr_grid": lr_grid})


def read_study(out: str) -> Optional[dict]:
    try:
        with open(os.path.join(out, "study.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def child_env(jobs: int) -> dict:
    """One thread per run when several share the CPU cores (small models scale poorly across threads;
    DESIGN 9), unless OMP_NUM_THREADS is set."""
    if "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}


def train(runs: Sequence[PlannedRun], launcher: Sequence[str], jobs: int = 1, out: Optional[str] = None,
          echo=print) -> dict:
    """Train the runs, `jobs` at a time; returns {run name: why it failed}. Finished runs are checked first (a run
    directory started with other flags is refused before anything trains). Failures are recorded in
    OUT/failures.json (a later success removes its entry). Ctrl-C: no new run starts, the running ones stop at a
    step boundary with a checkpoint (the recipes' own handling), and KeyboardInterrupt is raised."""
    total = len(runs)
    lock = threading.Lock()
    failed: dict = {}
    recorded = read_failures(out) if out else {}
    tags = {r.name: f"[{i}/{total}] {r.name}" for i, r in enumerate(runs, 1)}
    for r in runs:
        if r.status() == "finished":
            train_run(r, launcher, tags[r.name], echo)  # skips it, after the flags check
            recorded.pop(r.name, None)
    todo: queue.Queue = queue.Queue()
    for r in runs:
        if r.status() != "finished":
            todo.put(r)
    stop = threading.Event()
    env = child_env(jobs)

    def note(name: str, why: Optional[str]) -> None:
        with lock:
            if why is None:
                recorded.pop(name, None)
            else:
                recorded[name] = why
                failed[name] = why
            if out:
                atomic_write_json(failures_path(out), recorded)

    def worker() -> None:
        while not stop.is_set():
            try:
                r = todo.get_nowait()
            except queue.Empty:
                return
            t0 = time.time()
            why = train_run(r, launcher, tags[r.name], echo, env=env)
            if stop.is_set() and why is not None:
                return  # interrupted, not failed: the next invocation resumes it
            note(r.name, why)
            if why is None:
                echo(f"{tags[r.name]}: finished in {time.time() - t0:.0f} s, final valid loss "
                     f"{final_loss(r.run_dir):.4f}")
            else:
                echo(f"{tags[r.name]}: FAILED: {why}")

    if out:  # the finished runs' stale entries go
        atomic_write_json(failures_path(out), recorded)
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, jobs))]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.5)
    except KeyboardInterrupt:
        stop.set()
        echo("interrupted: the running arms save a checkpoint and stop; run the same command again to continue")
        for t in threads:
            t.join()
        raise
    return failed


# ----------------------------------------------------------------------------------------------------------
# The learning-rate grid


def parse_lr_grid(text: str) -> list[float]:
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise StudyError(f"--lr-grid {text!r}: expected peak learning rates such as 1e-3,3e-3,1e-2") from None
    if len(values) < 2 or min(values) <= 0:
        raise StudyError(f"--lr-grid {text!r}: give at least two positive learning rates")
    return values


def grid_plans(p: StudyPlan, grid: Sequence[float]) -> dict:
    """family -> (representative arm, [(lr, PlannedRun)]): the family's first arm at seed 1, once per grid value,
    with the study's budget and schedule, under OUT/lr_grid/."""
    out = {}
    for a in p.arms:
        if not a.runs or a.family in out:
            continue
        base = a.runs[0]
        runs = []
        for lr in grid:
            args = list(base.args)
            i = args.index("--lr")
            args[i + 1] = f"{lr:g}"
            args[args.index("--min-lr") + 1] = f"{lr * p.scale.min_lr_ratio:g}"
            name = f"{a.arm.name}-lr{lr:g}"
            run_dir = os.path.join(p.out, "lr_grid", name)
            cfg = parse_recipe_flags(args + ["--run-dir", run_dir], f"lr grid {name}")
            runs.append((lr, PlannedRun(name=name, args=args, recipe=base.recipe, run_dir=run_dir, cfg=cfg,
                                 info=base.info)))
        out[a.family] = (a.arm.name, runs)
    return out


def final_loss(run_dir: str) -> Optional[float]:
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            v = json.load(f).get("final_valid_loss")
    except (OSError, ValueError, AttributeError):
        return None
    return float(v) if isinstance(v, (int, float)) else None


def choose_lrs(grids: dict, grid: Sequence[float]) -> dict:
    """The grid record: per family, its representative arm, each rate's final validation loss (None: failed) and
    the chosen rate (the lowest loss)."""
    record = {"grid": list(grid), "families": {}}
    for family, (arm, runs) in grids.items():
        losses = {f"{lr:g}": final_loss(r.run_dir) for lr, r in runs}
        done = {lr: loss for lr, loss in ((lr, losses[f"{lr:g}"]) for lr, _ in runs) if loss is not None}
        chosen = min(done, key=done.get) if done else None
        record["families"][family] = {"arm": arm, "losses": losses, "chosen": chosen,
                                      "at_edge": chosen in (min(grid), max(grid)) if chosen is not None else False}
    return record


def command_line(run: PlannedRun, launcher: Sequence[str]) -> str:
    return shlex.join(run.command(launcher))


__all__ = ["ArmPlan", "GridError", "MatchResult", "StudyError", "StudyPlan", "check_matches", "choose_lrs",
           "grid_plans", "override_flags", "parse_lr_grid", "plan", "quantity", "read_failures", "read_study",
           "record_study", "train"]
