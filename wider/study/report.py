"""A study's table and plots, from its run directories (metrics.jsonl, summary.json) and the counters.

Statistics over seeds: mean and sample standard deviation (ddof 1) of each arm's final validation loss (the whole
validation split, evaluated once at the end), and the difference of each arm's mean to the reference arm's with a
95% Welch t interval (two independent samples, unequal variances: scipy.stats.ttest_ind(equal_var=False)
.confidence_interval). "Outside the seed noise" means that interval excludes 0. Seeds share nothing across arms but
their number (initialisation and data order both follow the seed), so the unpaired interval is the right one; with
three seeds it is wide, and an effect inside it is not shown, not refuted.

The curves are the periodic validation losses (the same first eval_iters batches of the validation split every
time), mean over the finished seeds with a band of +- one standard deviation, against tokens and against training
FLOPs (tokens x wider.info's training FLOPs per token); the final full-split losses are drawn as points with error
bars at the end. "Last quarter" in the table is how much the periodic loss still fell over the last quarter of the
tokens (mean over seeds): small means the curve has flattened.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import subprocess
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from wider.files import atomic_path, atomic_write_json, atomic_write_text
from wider.scaling.sweep import REPO

CONFIDENCE = 0.95


# ----------------------------------------------------------------------------------------------------------
# Statistics


@dataclass
class Summary:
    n: int
    mean: float
    std: float  # sample standard deviation (ddof 1); nan for one value


def summarize(values: Sequence[float]) -> Summary:
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return Summary(0, math.nan, math.nan)
    return Summary(int(a.size), float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else math.nan)


@dataclass
class Difference:
    diff: float  # mean(arm) - mean(reference)
    low: float  # CONFIDENCE interval of the difference (Welch); nan when it cannot be computed
    high: float
    df: float  # Welch-Satterthwaite degrees of freedom
    note: str = ""  # why there is no interval

    @property
    def outside_noise(self) -> Optional[bool]:
        if math.isnan(self.low):
            return None
        return self.low > 0 or self.high < 0


def welch(arm: Sequence[float], reference: Sequence[float], confidence: float = CONFIDENCE) -> Difference:
    """Difference of means with Welch's t interval (scipy.stats.ttest_ind, equal_var=False)."""
    from scipy import stats

    a, r = np.asarray(arm, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if a.size == 0 or r.size == 0:
        return Difference(math.nan, math.nan, math.nan, math.nan, "no finished seed")
    diff = float(a.mean() - r.mean())
    if a.size < 2 or r.size < 2:
        return Difference(diff, math.nan, math.nan, math.nan, "needs 2 seeds per arm")
    if a.var(ddof=1) + r.var(ddof=1) == 0:
        return Difference(diff, math.nan, math.nan, math.nan, "no spread over seeds")
    res = stats.ttest_ind(a, r, equal_var=False)
    ci = res.confidence_interval(confidence)
    return Difference(diff, float(ci.low), float(ci.high), float(res.df))


# ----------------------------------------------------------------------------------------------------------
# Run outputs


@dataclass
class RunResult:
    name: str
    seed: int
    status: str  # finished | failed | partial | not started
    final_loss: Optional[float] = None
    steps: int = 0
    curve: list = field(default_factory=list)  # [(step, periodic validation loss)]
    why: str = ""  # failed: the reason (first line)


def read_curve(run_dir: str) -> list:
    """(step, loss) of the periodic evaluations in metrics.jsonl (the last record of a step wins: a resumed run
    logs again the steps after its checkpoint)."""
    points = {}
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if r.get("kind") == "eval":
                    points[int(r["step"])] = float(r["loss"])
    except OSError:
        return []
    return sorted(points.items())


def read_run(run_dir: str, name: str, seed: int, failures: dict) -> RunResult:
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
        loss = summary.get("final_valid_loss")
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            return RunResult(name, seed, "finished", float(loss), int(summary.get("steps", 0)), read_curve(run_dir))
    except (OSError, ValueError, AttributeError):
        pass
    if name in failures:
        return RunResult(name, seed, "failed", curve=read_curve(run_dir), why=str(failures[name]).splitlines()[0])
    if os.path.isfile(os.path.join(run_dir, "config.json")):
        return RunResult(name, seed, "partial", curve=read_curve(run_dir))
    return RunResult(name, seed, "not started")


@dataclass
class ArmResult:
    name: str
    label: str
    skipped: str
    info: dict
    lr: float
    tokens_per_step: int
    runs: list  # RunResult per seed
    loss: Summary = None
    vs_reference: Optional[Difference] = None
    last_quarter: Optional[float] = None  # how much the periodic loss fell over the last quarter (mean over seeds)

    @property
    def finished(self) -> list:
        return [r for r in self.runs if r.status == "finished"]

    def status(self) -> str:
        if self.skipped:
            return f"skipped: {self.skipped}"
        counts = {}
        for r in self.runs:
            counts[r.status] = counts.get(r.status, 0) + 1
        if counts.get("finished", 0) == len(self.runs):
            return f"ok ({len(self.runs)} seeds)"
        parts = [f"{n} {s}" for s, n in counts.items()]
        failed = [r for r in self.runs if r.status == "failed"]
        head = "FAILED" if failed else "incomplete"
        why = f"; s{failed[0].seed}: {failed[0].why}" if failed else ""
        return f"{head}: {', '.join(parts)} of {len(self.runs)} seeds{why}"


def last_quarter_drop(curve: list, steps: int) -> Optional[float]:
    """Loss at the periodic evaluation nearest 75% of the steps minus the last periodic loss."""
    if len(curve) < 2 or steps <= 0:
        return None
    at = min(curve, key=lambda p: abs(p[0] - 0.75 * steps))
    last = curve[-1]
    return at[1] - last[1] if last[0] > at[0] else None


def collect(p, failures: dict) -> list:
    """ArmResult per arm of the plan (wider.study.runner.StudyPlan), statistics filled in."""
    arms = []
    for a in p.arms:
        runs = [read_run(r.run_dir, r.name, s, failures) for s, r in enumerate(a.runs, 1)]
        tps = a.info.get("tokens_per_step", 0) if a.info else 0
        arms.append(ArmResult(a.arm.name, a.arm.label, a.skipped, a.info, a.lr, tps, runs))
    ref = next((x for x in arms if x.name == p.study.reference), None)
    ref_losses = [r.final_loss for r in ref.finished] if ref else []
    for x in arms:
        losses = [r.final_loss for r in x.finished]
        x.loss = summarize(losses)
        if x is not ref and not x.skipped:
            x.vs_reference = welch(losses, ref_losses)
        drops = [d for d in (last_quarter_drop(r.curve, r.steps) for r in x.finished) if d is not None]
        x.last_quarter = float(np.mean(drops)) if drops else None
    return arms


# ----------------------------------------------------------------------------------------------------------
# The table


def count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.3g}"


def commit() -> str:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except OSError:
        return "unknown"
    return (head + (" + working tree" if dirty else "")) if head else "unknown"


def loss_cell(s: Summary) -> str:
    if s.n == 0:
        return "-"
    if s.n == 1:
        return f"{s.mean:.4f} (1 seed)"
    return f"{s.mean:.4f} ± {s.std:.4f} (n {s.n})"


def diff_cell(d: Optional[Difference]) -> tuple[str, str]:
    if d is None:
        return "reference", ""
    if math.isnan(d.diff):
        return "-", ""
    if math.isnan(d.low):
        return f"{d.diff:+.4f} ({d.note})", "-"
    return f"{d.diff:+.4f} [{d.low:+.4f}, {d.high:+.4f}]", "yes" if d.outside_noise else "no"


def table(p, arms: list, matches: list, lr_grid: Optional[dict]) -> str:
    """The Markdown report: what is compared and matched, the table, the statistics and the plots."""
    s, study = p.scale, p.study
    tokens = p.steps * (next((a.tokens_per_step for a in arms if a.tokens_per_step), 0))
    lines = [f"# Study `{study.name}`, scale `{p.scale_name}`", "",
             f"{datetime.date.today().isoformat()}, commit {commit()}. Written by `python -m wider.study` "
             "(DESIGN 11).", "",
             f"**Claim tested.** {study.claim}.", "",
             f"**Matched.** {study.matched}. Checked with wider.info's counters:", ""]
    for m in matches:
        values = ", ".join(f"{k} {count(v) if abs(v) >= 1e4 else f'{v:g}'}" for k, v in m.values.items())
        tol = "equal" if m.match.rel_tol == 0 else f"within {100 * m.match.rel_tol:g}%"
        lines.append(f"- {m.match.what} ({tol}): {'yes' if m.ok else 'NO'}, largest deviation "
                     f"{100 * m.deviation:.2f}% ({values})")
    corpus = (f"the embedded corpus re-tokenized with {s.vocab} pieces" if s.vocab and "--data-path" not in p.extra
              else "the corpus given after --" if "--data-path" in p.extra else "the presets' corpus")
    lines += ["", f"**Budget.** {count(tokens)} training tokens per arm ({p.steps} steps of "
                  f"{count(tokens / max(p.steps, 1))} tokens), {p.seeds} seeds per arm, {corpus}; the same schedule "
                  f"for every arm: linear warmup over {100 * s.warmup:g}% of the steps, cosine to "
                  f"{s.min_lr_ratio:g} x the peak learning rate."]
    if lr_grid:
        fam = "; ".join(f"{f} (tuned on {v['arm']}): " + ", ".join(
            f"{lr} -> {'failed' if loss is None else f'{loss:.4f}'}" for lr, loss in v["losses"].items())
            + f"; chosen {v['chosen']:g}" + (" (at the grid's edge)" if v.get("at_edge") else "")
            for f, v in lr_grid["families"].items() if v.get("chosen") is not None)
        lines += ["", f"**Learning rates.** Tuned once per architecture family on the grid "
                      f"{', '.join(f'{x:g}' for x in lr_grid['grid'])} (one seed, the same budget; final validation "
                      f"loss): {fam}."]
    else:
        lines += ["", "**Learning rates.** The presets' peak rates (no grid recorded; `--lr-grid` tunes one per "
                      "architecture family)."]
    ref = study.reference
    lines += ["", "| arm | what | unique params | active params | train FLOPs / token | tokens | peak lr | final "
                  f"valid loss (mean ± std) | Δ vs {ref} [95% CI] | outside seed noise | last-quarter drop | status |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in arms:
        if x.skipped:
            lines.append(f"| {x.name} | {x.label} | - | - | - | - | - | - | - | - | - | {x.status()} |")
            continue
        d, noise = diff_cell(x.vs_reference)
        lq = f"{x.last_quarter:.4f}" if x.last_quarter is not None else "-"
        lines.append(f"| {x.name} | {x.label} | {count(x.info['params_total'])} | {count(x.info['params_active'])} | "
                     f"{count(x.info['train_flops_per_token'])} | {count(x.info['total_tokens'])} | {x.lr:g} | "
                     f"{loss_cell(x.loss)} | {d} | {noise} | {lq} | {x.status()} |")
    first = next((a.cfg for a in p.arms if a.cfg is not None), None)
    n_final = first.train.final_eval_iters if first is not None else None
    split = ("the whole validation split" if n_final is None else
             f"the first {n_final} global batches of the validation split")
    lines += ["", f"Final validation loss: nats per token on {split}, once at the end of each run. "
                  "Δ: the arm's mean minus the reference's, with a 95% Welch t interval (unequal variances, "
                  "scipy.stats.ttest_ind); \"outside seed noise\" = the interval excludes 0. Unique parameters count "
                  "shared weights once; active parameters are those one token applies (shared layers once per "
                  "application; embeddings included). Last-quarter drop: how much the periodic validation loss still "
                  "fell over the last quarter of the tokens (mean over seeds).", "",
              "![validation loss against tokens](loss_vs_tokens.png)", "",
              "![validation loss against training FLOPs](loss_vs_flops.png)", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# The plots


def plot(p, arms: list) -> list:
    """loss_vs_tokens.png and loss_vs_flops.png in OUT: per arm, the mean periodic validation loss over its finished
    seeds with a +- 1 std band, and the final full-split loss (mean +- std) as a point at the end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for kind, xlabel in (("tokens", "training tokens"), ("flops", "training FLOPs (wider.info)")):
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for i, x in enumerate(a for a in arms if a.finished):
            color = f"C{i % 10}"
            scale = x.tokens_per_step * (x.info["train_flops_per_token"] if kind == "flops" else 1.0)
            common = sorted(set.intersection(*(set(s for s, _ in r.curve) for r in x.finished)))
            if common:
                ys = np.array([[dict(r.curve)[s] for s in common] for r in x.finished])
                xs = np.array(common, dtype=np.float64) * scale
                mean = ys.mean(axis=0)
                ax.plot(xs, mean, color=color, label=f"{x.name} (n {len(x.finished)})")
                if len(x.finished) > 1:
                    sd = ys.std(axis=0, ddof=1)
                    ax.fill_between(xs, mean - sd, mean + sd, color=color, alpha=0.2, linewidth=0)
            end = max(r.steps for r in x.finished) * scale
            ax.errorbar([end], [x.loss.mean], yerr=[0 if math.isnan(x.loss.std) else x.loss.std], color=color,
                        marker="o", markersize=4, capsize=3, label=None if common else f"{x.name} (final)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats / token)")
        ax.set_title(f"study {p.study.name}, scale {p.scale_name}: periodic validation loss, mean ± std over seeds; "
                     "points: the final evaluation", fontsize=9)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(p.out, f"loss_vs_{kind}.png")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
        paths.append(path)
    return paths


def write(p, failures: dict, matches: list, lr_grid: Optional[dict]) -> tuple[str, list]:
    """OUT/results.md (the table), OUT/results.json (its numbers) and the two PNGs. Returns (results.md, arms)."""
    arms = collect(p, failures)
    text = table(p, arms, matches, lr_grid)
    os.makedirs(p.out, exist_ok=True)
    plot(p, arms)
    md = os.path.join(p.out, "results.md")
    atomic_write_text(md, text)

    def num(v):
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else v

    atomic_write_json(os.path.join(p.out, "results.json"), {
        "study": p.study.name, "scale": p.scale_name, "reference": p.study.reference, "steps": p.steps,
        "seeds": p.seeds, "confidence": CONFIDENCE, "lr_grid": lr_grid,
        "matches": [{"what": m.match.what, "quantity": m.match.quantity, "rel_tol": m.match.rel_tol, "ok": m.ok,
                     "deviation": m.deviation, "values": m.values} for m in matches],
        "arms": [{"arm": x.name, "label": x.label, "status": x.status(), "skipped": x.skipped or None,
                  "params_total": x.info.get("params_total"), "params_active": x.info.get("params_active"),
                  "train_flops_per_token": x.info.get("train_flops_per_token"),
                  "tokens": x.info.get("total_tokens"), "lr": x.lr,
                  "final_losses": {f"s{r.seed}": r.final_loss for r in x.runs},
                  "mean": num(x.loss.mean), "std": num(x.loss.std), "n": x.loss.n,
                  "diff": num(x.vs_reference.diff) if x.vs_reference else None,
                  "ci": [num(x.vs_reference.low), num(x.vs_reference.high)] if x.vs_reference else None,
                  "last_quarter_drop": x.last_quarter} for x in arms]})
    return md, arms
