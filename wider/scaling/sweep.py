"""Sweep a grid of runs through the normal recipes, and the runs CSV that `fit` and `plot` read.

    python -m wider.scaling sweep --grid preset=fine_256x4,fine_512x4 G=1,2,4,8,16 tokens=2B,8B --out runs/sweep
    python -m wider.scaling sweep --grid preset=fine_smoke G=2,4 iters=10 --out runs/smoke --dry-run
    python -m wider.scaling sweep --grid preset=fine_smoke G=2,4 iters=50 --out runs/smoke -- --eval-iters 1

Each grid point (preset x G x E x token count) is one run, launched one after another as
`python recipes/pretrain_<arch>.py --preset P --granularity G --expansion-rate E --train-iters I
--run-dir OUT/NAME --resume auto [flags after --]` (`--launcher "deepspeed --num_gpus 8"` puts a launcher in
front of the recipe). The child's output goes to OUT/NAME/train.log. A run whose OUT/NAME/summary.json exists
has finished and is skipped; an interrupted one continues from its last checkpoint (--resume auto), so running
the same command again resumes the sweep. The flags a run was started with are kept in OUT/NAME/sweep.json: a
finished run is not reused for different flags. Token counts are rounded to whole optimizer steps.

The runs CSV (OUT/runs.csv unless --csv): one row per finished run under OUT (this grid's, then those of
earlier sweeps into the same OUT, so a study grown in stages keeps one CSV), columns

    column    meaning                                                                  needed
    run       run name (OUT/NAME)                                                      no
    preset    the preset it started from                                               no
    N         total non-embedding parameters: attention, every expert, router, norms   yes, > 0
    N_active  non-embedding parameters one token applies                               no
    D         training tokens: steps x global batch x sequence length                  yes, > 0
    G         granularity d_ff / d_expert (1 for dense models)                         yes (not for --dense), >= 1
    E         expansion rate: all experts' parameters / the dense FFN's (1 = dense)    no, > 0
    flops     the paper's training FLOPs (12 d^2 c_f + d E G c_r) n_blocks D           no, > 0
    loss      final validation loss (nats per token)                                   yes, > 0
    router    token_choice or expert_choice (model.moe_router; the paper's law was fitted  no
              on expert choice, so fit one routing at a time)
    d_model, n_blocks, steps, run_dir                                                  no

Runs trained elsewhere can be brought in a CSV with at least N, D, G and loss (N, D and loss for --dense).
Where flops is blank, `plot` derives it from N, D, G and E under the paper's shape rule (law.py).
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from wider.files import atomic_path, atomic_write_json
from wider.launch import new_job_env
from wider.scaling.law import C_F, ScalingError

COLUMNS = ("run", "preset", "N", "N_active", "D", "G", "E", "flops", "loss", "router", "d_model", "n_blocks",
           "steps", "run_dir")
REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------------------
# The runs CSV


@dataclass
class Runs:
    """The numeric columns of a runs CSV as arrays (NaN where an optional column is blank or absent)."""

    names: list[str]
    N: np.ndarray
    D: np.ndarray
    G: np.ndarray
    loss: np.ndarray
    E: np.ndarray
    flops: np.ndarray

    def __len__(self) -> int:
        return len(self.loss)


def read_runs(path: str, need_granularity: bool = True) -> Runs:
    """Read and check a runs CSV; any problem raises ScalingError naming the file, line and column."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        raise ScalingError(f"{path}: cannot read it ({e.strerror})") from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise ScalingError(f"{path}: not a readable CSV file ({e})") from None
    required = ("N", "D", "G", "loss") if need_granularity else ("N", "D", "loss")
    if not rows or not any(cell.strip() for cell in rows[0]):
        raise ScalingError(f"{path} is empty: expected a header line with the columns {', '.join(required)} "
                           "(see `python -m wider.scaling sweep --help`)")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in required if c not in header]
    if missing:
        hint = " (or fit the dense law with --dense, which needs no G)" if missing == ["G"] else ""
        raise ScalingError(f"{path}: missing column {', '.join(repr(c) for c in missing)}; needed: "
                           f"{', '.join(required)}; found: {', '.join(header) or 'none'}{hint}")
    body = [(i + 2, r) for i, r in enumerate(rows[1:]) if any(cell.strip() for cell in r)]
    if not body:
        raise ScalingError(f"{path} has a header but no runs")
    col = {h: j for j, h in enumerate(header)}
    if "router" in col:
        kinds = sorted({r[col["router"]].strip() for _, r in body if col["router"] < len(r)} - {""})
        if len(kinds) > 1:
            raise ScalingError(f"{path}: the runs mix routings ({', '.join(kinds)}); one law describes one routing "
                               "(the paper's was fitted on expert choice): keep the rows of one router")
    out: dict[str, list[float]] = {k: [] for k in ("N", "D", "G", "loss", "E", "flops")}
    names = []
    for line, r in body:
        name = r[col["run"]].strip() if "run" in col and col["run"] < len(r) else ""
        names.append(name or f"line {line}")
        where = f"{path} line {line}" + (f" (run {name!r})" if name else "")
        if len(r) != len(header):
            raise ScalingError(f"{where}: {len(r)} fields, but the header has {len(header)}")
        for key in out:
            text = r[col[key]].strip() if key in col else ""
            if not text and key not in required:
                out[key].append(math.nan)
                continue
            try:
                value = float(text)
            except ValueError:
                value = math.nan
            if not (math.isfinite(value) and value > 0):
                raise ScalingError(f"{where}: column {key!r} is {text!r}; it must be a positive number")
            if key == "G" and value < 1:
                raise ScalingError(f"{where}: column 'G' is {text!r}; granularity d_ff / d_expert is >= 1")
            out[key].append(value)
    arrays = {k: np.array(v, dtype=np.float64) for k, v in out.items()}
    if not need_granularity:
        arrays["G"] = np.where(np.isnan(arrays["G"]), 1.0, arrays["G"])
    return Runs(names=names, **arrays)


def write_runs(path: str, rows: Sequence[dict]) -> None:
    """Write rows (dicts keyed by COLUMNS) atomically: a reader never sees half a file."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for row in rows:
            w.writerow({k: _cell(row.get(k)) for k in COLUMNS})


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.10g}"
    return str(v)


# ----------------------------------------------------------------------------------------------------------
# The grid


class SweepError(RuntimeError):
    """A sweep cannot go on (a run failed, or a run directory holds another run); the message names the run
    and where to look."""


class GridError(ScalingError):
    """The grid or the flags for the recipe are invalid; nothing was started."""


GRID_KEYS = {"preset": "preset", "presets": "preset", "g": "G", "granularity": "G", "e": "E",
             "expansion": "E", "expansion_rate": "E", "tokens": "tokens", "d": "tokens", "iters": "iters",
             "train_iters": "iters"}


def parse_count(text: str) -> float:
    """'4e9', '4B', '500M', '12k', '1.5T' -> a number."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBtT]?)\s*", text)
    if not m:
        raise ValueError(text)
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2).lower()]
    return float(m.group(1)) * scale


def parse_grid(items: Sequence[str]) -> dict[str, list]:
    """['preset=a,b', 'G=1,2', 'tokens=1e9'] -> {'preset': [...], 'G': [...], 'E': [...], 'tokens'|'iters': [...]}.
    Absent G / E / length mean the preset's own value."""
    grid: dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        k = GRID_KEYS.get(key.strip().lower())
        if not sep or k is None:
            raise GridError(f"--grid item {item!r}: expected KEY=V1,V2,... with KEY one of preset, G, E, tokens, "
                             "iters")
        if k in grid:
            raise GridError(f"--grid names {k} twice; give all its values in one item: {k}=V1,V2")
        parts = [v.strip() for v in values.split(",") if v.strip()]
        if not parts:
            raise GridError(f"--grid item {item!r} has no values")
        try:
            if k == "preset":
                grid[k] = parts
            elif k == "tokens":
                grid[k] = [parse_count(v) for v in parts]
            else:
                grid[k] = [int(v) for v in parts]
        except ValueError:
            kind = "token counts such as 4e9 or 4B" if k == "tokens" else "whole numbers"
            raise GridError(f"--grid item {item!r}: {k} takes {kind}") from None
        if k != "preset" and min(grid[k]) <= 0:
            raise GridError(f"--grid item {item!r}: values must be positive")
    if "preset" not in grid:
        raise GridError("--grid needs preset=NAME[,NAME...] (e.g. preset=fine_smoke)")
    if "tokens" in grid and "iters" in grid:
        raise GridError("--grid: give the run length as tokens=... or iters=..., not both")
    return grid


@dataclass
class PlannedRun:
    name: str
    args: list[str]  # the recipe's flags, without --run-dir / --resume
    recipe: str
    run_dir: str
    cfg: object  # wider.config.RunConfig
    info: dict = field(default_factory=dict)  # wider.info.describe(cfg)

    def status(self) -> str:
        if _finished_loss(self.run_dir) is not None:
            return "finished"
        if os.path.exists(os.path.join(self.run_dir, "config.json")):
            return "partial"
        return "new"

    def command(self, launcher: Sequence[str]) -> list[str]:
        return [*launcher, self.recipe, *self.args, "--run-dir", self.run_dir, "--resume", "auto"]


def _quiet_imports() -> None:
    """megatron-core warns at import (the parameter counters import it); the sweep's console is for the sweep."""
    import warnings

    warnings.filterwarnings("ignore")


def parse_recipe_flags(flags: list[str], what: str):
    """The recipes' own parser (wider.cli), so a sweep accepts exactly what a recipe accepts."""
    from wider import cli

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return cli.parse(flags)
    except SystemExit:
        last = [line for line in err.getvalue().strip().splitlines() if line.strip()]
        raise GridError(f"{what}: the recipe rejects `{shlex.join(flags)}`: "
                         f"{last[-1] if last else 'invalid flags'}") from None


def plan(grid: dict[str, list], out_dir: str, extra: Sequence[str]) -> list[PlannedRun]:
    """Expand the grid into runs (resolving each preset's G, E and length), in grid order."""
    _quiet_imports()
    from wider.info import describe
    from wider.models import ARCHITECTURES

    extra = list(extra)
    for key, flag in (("G", "--granularity"), ("E", "--expansion-rate"), ("tokens", "--train-iters"),
                      ("iters", "--train-iters")):
        if key in grid and flag in extra:
            raise GridError(f"{flag} after -- clashes with {key}= in --grid; give it in one place")
    for flag in ("--run-dir", "--resume", "--preset", "--config"):
        if flag in extra:
            raise GridError(f"{flag} after -- is set by the sweep itself; remove it")
    runs: list[PlannedRun] = []
    combos = itertools.product(grid["preset"], grid.get("G", [None]), grid.get("E", [None]),
                               grid.get("tokens", grid.get("iters", [None])))
    for preset, G, E, length in combos:
        flags = ["--preset", preset]
        if G is not None:
            flags += ["--granularity", str(G)]
        if E is not None:
            flags += ["--expansion-rate", str(E)]
        what = f"grid point preset={preset}" + (f" G={G}" if G else "") + (f" E={E}" if E else "")
        base = parse_recipe_flags(flags + extra, what)
        if "tokens" in grid:
            per_step = base.train.global_batch_size * base.model.seq_length
            iters = max(1, round(length / per_step))
        elif "iters" in grid:
            iters = length
        else:
            iters = base.train.train_iters
        if "tokens" in grid or "iters" in grid:
            flags += ["--train-iters", str(iters)]
        flags += extra
        m = base.model
        name = preset + (f"-G{m.granularity}" if m.granularity else "") + \
            (f"-E{m.expansion_rate}" if m.expansion_rate else "") + f"-{iters}it"
        run_dir = os.path.join(os.path.abspath(out_dir), name)
        cfg = parse_recipe_flags(flags + ["--run-dir", run_dir], f"run {name}")
        recipe = str(REPO / ARCHITECTURES[cfg.model.arch].recipe)
        runs.append(PlannedRun(name=name, args=flags, recipe=recipe, run_dir=run_dir, cfg=cfg, info=describe(cfg)))
    names = [r.name for r in runs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise GridError(f"the grid gives two runs the same name {dup[0]!r} (token counts that round to the same "
                         "number of steps?); drop the duplicate values")
    return runs


# ----------------------------------------------------------------------------------------------------------
# Running


def _finished_loss(run_dir: str) -> Optional[float]:
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            loss = json.load(f).get("final_valid_loss")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return float(loss) if isinstance(loss, (int, float)) and math.isfinite(loss) else None


def _record_path(run: PlannedRun) -> str:
    return os.path.join(run.run_dir, "sweep.json")


def _check_same_flags(run: PlannedRun) -> None:
    try:
        with open(_record_path(run)) as f:
            before = json.load(f).get("args")
    except (OSError, json.JSONDecodeError, AttributeError):
        return  # trained outside the sweep: its config.json is what it is
    if before is not None and before != run.args:
        raise SweepError(f"run {run.name} in {run.run_dir} was started with other flags ({shlex.join(before)}); "
                         "delete that directory to retrain it, or sweep into another --out")


def row_for(run_dir: str, name: str) -> Optional[dict]:
    """A CSV row from a finished run's own files (summary.json, config.json); None if it has not finished."""
    loss = _finished_loss(run_dir)
    if loss is None or not os.path.isfile(os.path.join(run_dir, "config.json")):
        return None
    _quiet_imports()
    from wider.config import RunConfig
    from wider.info import describe

    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = RunConfig.from_dict(json.load(f))
    with open(os.path.join(run_dir, "summary.json")) as f:
        steps = int(json.load(f)["steps"])
    info = describe(cfg)
    m, t = cfg.model, cfg.train
    D = steps * t.global_batch_size * m.seq_length
    G = info.get("extra_granularity", 1.0)
    E = info.get("extra_expansion_rate", 1.0)
    # The paper's FLOPs per token; a model without experts has no routing term (eq. 10 with E G c_r = 0).
    per_token = info.get("extra_paper_flops_per_token", 12 * m.hidden_size ** 2 * C_F * m.num_layers)
    return {"run": name, "preset": cfg.preset, "N": info["params_non_embedding"],
            "N_active": info["params_active"] - info["params_embedding"], "D": D, "G": G, "E": E,
            "flops": per_token * D, "loss": loss, "router": m.moe_router if m.num_experts else "",
            "d_model": m.hidden_size, "n_blocks": m.num_layers,
            "steps": steps, "run_dir": run_dir}


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def train_run(run: PlannedRun, launcher: Sequence[str], tag: str, echo=print,
              env: Optional[dict] = None) -> Optional[str]:
    """Bring one run to its end: a finished run is skipped (refused when it was started with other flags), a partial
    one resumes (--resume auto), a new one starts. Returns None when it has finished, else why not (naming its log).
    env: extra environment variables for the recipe. Shared by the sweep and `python -m wider.study`."""
    if run.status() == "finished":
        _check_same_flags(run)
        echo(f"{tag}: finished earlier (loss {_finished_loss(run.run_dir):.4f}), skipped")
        return None
    # A partial run resumes with --resume auto; the recipe itself refuses a checkpoint of another model.
    atomic_write_json(_record_path(run), {"args": run.args})
    log = os.path.join(run.run_dir, "train.log")
    cmd = run.command(launcher)
    resumed = " (resuming)" if run.status() == "partial" else ""
    echo(f"{tag}: training{resumed}, N {run.info['params_non_embedding']:,} D "
         f"{run.info['total_tokens']:,} -> {log}")
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False,
                              env=new_job_env(PYTHONUNBUFFERED="1", **(env or {}))).returncode
    if code != 0 or _finished_loss(run.run_dir) is None:
        why = f"exited with status {code}" if code != 0 else "stopped before the end (no summary.json)"
        return (f"run {run.name} {why}; its log is {log}. Fix the cause and run the same command again: "
                f"finished runs are skipped and this one resumes.\n--- last lines of {log} ---\n{_tail(log)}")
    return None


def run_all(runs: Sequence[PlannedRun], launcher: Sequence[str], keep_going: bool = False,
            echo=print) -> list[str]:
    """Train every unfinished run in order; returns the names of runs that failed (only with keep_going)."""
    failed = []
    total = len(runs)
    t_sweep = time.time()
    trained = 0
    for i, run in enumerate(runs, 1):
        tag = f"[{i}/{total}] {run.name}"
        earlier = run.status() == "finished"
        t0 = time.time()
        msg = train_run(run, launcher, tag, echo)
        if msg is not None:
            if not keep_going:
                raise SweepError(msg)
            echo(f"{tag}: FAILED: {msg}")
            failed.append(run.name)
            continue
        if earlier:
            continue
        trained += 1
        left = sum(1 for r in runs[i:] if r.status() != "finished")
        eta = (time.time() - t_sweep) / trained * left
        echo(f"{tag}: done in {time.time() - t0:.1f} s, final valid loss {_finished_loss(run.run_dir):.4f}"
             + (f" ({left} to go, about {eta:.0f} s)" if left else ""))
    return failed


def collect(runs: Sequence[PlannedRun], out_dir: str, csv_path: str) -> list[dict]:
    """Rows of every finished run under out_dir: this grid's in grid order, then those of earlier sweeps into
    the same directory (a study grown in stages keeps one CSV)."""
    mine = {run.run_dir for run in runs}
    root = os.path.abspath(out_dir)
    earlier = sorted(e.path for e in os.scandir(root) if e.is_dir() and e.path not in mine
                     and os.path.isfile(os.path.join(e.path, "summary.json"))) if os.path.isdir(root) else []
    dirs = [(run.run_dir, run.name) for run in runs] + [(d, os.path.basename(d)) for d in earlier]
    rows = [r for r in (row_for(d, name) for d, name in dirs) if r is not None]
    write_runs(csv_path, rows)
    return rows


def format_plan(runs: Sequence[PlannedRun], launcher: Sequence[str]) -> str:
    lines = [f"{'run':<36} {'status':<9} {'N':>12} {'N_active':>12} {'D':>14} {'G':>3} {'E':>4} {'FLOPs':>10}"]
    for r in runs:
        info = r.info
        G = info.get("extra_granularity", 1.0)
        E = info.get("extra_expansion_rate", 1.0)
        m = r.cfg.model
        per_token = info.get("extra_paper_flops_per_token", 12 * m.hidden_size ** 2 * C_F * m.num_layers)
        lines.append(f"{r.name:<36} {r.status():<9} {info['params_non_embedding']:>12,} "
                     f"{info['params_active'] - info['params_embedding']:>12,} {info['total_tokens']:>14,} "
                     f"{G:>3g} {E:>4g} {per_token * info['total_tokens']:>10.3g}")
    lines.append("commands:")
    lines += [f"  {shlex.join(r.command(launcher))}" for r in runs]
    return "\n".join(lines)
