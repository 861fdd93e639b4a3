"""python -m wider.scaling {fit,optimal,plot,sweep}: the fine-grained MoE scaling-law toolkit (DESIGN 5.5).

    python -m wider.scaling fit runs.csv [--dense] [--restarts 8] [--bootstrap 100] [--json]
    python -m wider.scaling optimal --flops 1e20 [--coeffs paper|law.json] [--expansion 64] [--memory-cap-params 2e11]
    python -m wider.scaling optimal --table
    python -m wider.scaling plot runs.csv [--coeffs paper|law.json]
    python -m wider.scaling sweep --grid preset=fine_smoke G=2,4 iters=10 --out runs/smoke [--dry-run] [-- FLAGS]

`python -m wider.scaling COMMAND --help` explains each; wider/scaling/law.py says how the paper fits and
allocates, and wider/scaling/sweep.py documents the runs CSV that fit and plot read.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Optional, Sequence

from wider.scaling import law as L
from wider.scaling import plot as plot_module
from wider.scaling import sweep as sweep_module
from wider.scaling.law import ScalingError
from wider.scaling.sweep import SweepError

CSV_HELP = ("runs CSV: columns N (total non-embedding params), D (training tokens), G (granularity; not needed "
            "with --dense), loss (final validation loss); others optional. `sweep` writes one; see `sweep --help`.")


def _count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.3g}"


def _granularities(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--granularities {text!r}: expected numbers such as 1,2,4,8") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--granularities {text!r}: values must be >= 1")
    return values


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m wider.scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fit", allow_abbrev=False, help="fit the law to a runs CSV", description=L.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("csv", help=CSV_HELP)
    f.add_argument("--dense", action="store_true", help="fit the dense law c + a/N^alpha + b/D^beta (no G term)")
    f.add_argument("--restarts", type=int, default=8,
                   help="BFGS runs, from the best points of the grid of starts (default 8)")
    f.add_argument("--bootstrap", type=int, default=100,
                   help="row resamples for percentile intervals of each coefficient; 0 = none (default 100)")
    f.add_argument("--interval", type=float, default=80.0,
                   help="central percent of the bootstrap distribution shown (default 80: the paper's 10th-90th "
                        "percentiles)")
    f.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    f.add_argument("--json", action="store_true",
                   help="print one JSON object (coefficients, RMSE, intervals); `optimal --coeffs` and "
                        "`plot --coeffs` read it")

    o = sub.add_parser("optimal", allow_abbrev=False, help="compute-optimal N, D, G for a FLOP budget",
                       description="The compute-optimal N, D, G for a budget under the law: the paper's section 6 "
                                   "(shape rule d_model = 64 n_blocks, FLOPs (12 d^2 c_f + d E G c_r) D n_blocks, "
                                   "Brent's method over d_model per G).")
    o.add_argument("--flops", type=_positive, help="training FLOP budget, e.g. 1e20")
    o.add_argument("--coeffs", default="paper",
                   help="'paper' (Table 1, MoE), 'paper-dense', or a JSON file from `fit --json` (default paper)")
    o.add_argument("--expansion", type=_positive, default=64.0,
                   help="expansion rate E, all experts' parameters / the dense FFN's (default 64, the paper's)")
    o.add_argument("--granularities", type=_granularities, default=list(L.PAPER_GRANULARITIES),
                   help="G values to consider, comma-separated (default 1,2,4,8,16,32,64)")
    o.add_argument("--memory-cap-params", type=_positive, default=None,
                   help="largest total parameter count N that fits your hardware; the optimum is searched below it")
    o.add_argument("--table", action="store_true",
                   help="the paper's Table 2 budgets, with this law's recommendation beside each paper row")
    o.add_argument("--json", action="store_true", help="print one JSON object")

    pl = sub.add_parser("plot", allow_abbrev=False, help="PNG figures of a runs CSV and a law, next to the CSV",
                        description=plot_module.__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    pl.add_argument("csv", help=CSV_HELP)
    pl.add_argument("--coeffs", default=None,
                    help="'paper', 'paper-dense' or a `fit --json` file; default: fit the CSV itself")
    pl.add_argument("--dense", action="store_true", help="with no --coeffs: fit the dense law")
    pl.add_argument("--expansion", type=_positive, default=None,
                    help="E for the law's curves (default: the CSV's median E, else 64)")

    s = sub.add_parser("sweep", allow_abbrev=False, help="train a grid of runs through the recipes and collect a runs CSV",
                       description=sweep_module.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2",
                   help="preset=NAME[,NAME] (required), G=..., E=..., and the length as tokens=... (4e9, 4B) or "
                        "iters=...; absent keys keep the preset's value")
    s.add_argument("--out", required=True, help="sweep directory: one run directory per grid point, and runs.csv")
    s.add_argument("--csv", default=None, help="where to write the runs CSV (default OUT/runs.csv)")
    s.add_argument("--dry-run", action="store_true", help="show the runs, their sizes and commands; train nothing")
    s.add_argument("--launcher", default=None,
                   help="command put before the recipe, e.g. 'deepspeed --num_gpus 8' (default: this Python, "
                        "one rank)")
    s.add_argument("--keep-going", action="store_true", help="after a failed run, go on with the others")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:  # sweep: what follows -- goes to every run's recipe
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    if extra and args.command != "sweep":
        print(f"error: flags after -- are for `sweep` only, got {' '.join(extra)}", file=sys.stderr)
        return 2
    try:
        return {"fit": cmd_fit, "optimal": cmd_optimal, "plot": cmd_plot,
                "sweep": lambda a: cmd_sweep(a, extra)}[args.command](args)
    except ScalingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; run the same command again to continue", file=sys.stderr)
        return 130


def cmd_fit(args) -> int:
    if args.restarts < 1 or args.bootstrap < 0 or not 0 < args.interval < 100:
        raise ScalingError("--restarts must be >= 1, --bootstrap >= 0 and --interval in (0, 100)")
    runs = sweep_module.read_runs(args.csv, need_granularity=not args.dense)
    result = L.fit(runs.N, runs.D, runs.G, runs.loss, dense=args.dense, restarts=args.restarts,
                   bootstrap=args.bootstrap, interval=args.interval, seed=args.seed)
    if args.json:
        print(json.dumps({"csv": args.csv, **result.to_dict()}, indent=2))
        return 0
    law, paper = result.law, (L.PAPER_DENSE if args.dense else L.PAPER)
    print(f"{'dense' if args.dense else 'MoE'} law fitted to {result.rows} runs of {args.csv}: Huber (delta "
          f"{L.HUBER_DELTA}) on L, BFGS from the {result.starts} best of {result.grid_size} grid starts")
    lo, hi = (100 - args.interval) / 2, (100 + args.interval) / 2
    head = f"{'coefficient':<12} {'fit':>10}"
    if result.intervals:
        head += f" {f'{lo:g}%':>10} {f'{hi:g}%':>10}"
    print(head + f" {'paper':>8}")
    for k, v in law.coefficients().items():
        line = f"{k:<12} {v:>10.4f}"
        if result.intervals:
            a, b = result.intervals[k]
            line += f" {a:>10.4f} {b:>10.4f}"
        print(line + f" {getattr(paper, k):>8g}")
    if result.bootstrap and not result.intervals:
        print("(no bootstrap intervals: every resample had a single granularity)")
    elif result.bootstrap:
        print(f"intervals: {result.bootstrap} row resamples, refitted")
    print(f"RMSE {result.rmse:.4f} over {result.rows} runs (the paper's fit: 0.015)")
    g_term = "" if law.dense else f"{law.g:.4g} / G^{law.gamma:.4g} + "
    print(f"L(N, D{'' if law.dense else ', G'}) = {law.c:.4g} + ({g_term}{law.a:.4g}) / N^{law.alpha:.4g} + "
          f"{law.b:.4g} / D^{law.beta:.4g}")
    return 0


def _describe_point(p: L.Point) -> str:
    return (f"{p.expansion:g} x {_count(p.N_active)}" if p.expansion > 1 else _count(p.N))


def cmd_optimal(args) -> int:
    law = L.load_law(args.coeffs)
    label = {"paper": "paper coefficients (Table 1, MoE)", "paper-dense": "paper coefficients (Table 1, dense)"}.get(
        args.coeffs, f"coefficients from {args.coeffs}")
    if args.table:
        return _table(law, label, args)
    if args.flops is None:
        raise ScalingError("give --flops F (a training FLOP budget, e.g. 1e20), or --table for the paper's budgets")
    opt = L.optimal(law, args.flops, args.expansion, args.granularities, args.memory_cap_params)
    if args.json:
        print(json.dumps({"coeffs": args.coeffs, "law": law.to_dict(), "flops": args.flops, **opt.to_dict()},
                         indent=2))
        return 0
    b = opt.best
    print(f"budget {args.flops:.3g} FLOPs | E {b.expansion:g} | {label}")
    print(f"{'G':>5} {'loss':>8} {'d_model':>8} {'n_blocks':>8} {'N total':>9} {'N_active':>9} {'D tokens':>9} "
          f"{'D/N_act':>8}")
    for p in opt.per_granularity:
        mark = "*" if p is b else " "
        print(f"{mark}{p.granularity:>4g} {p.loss:>8.4f} {p.d_model:>8.0f} {p.n_blocks:>8.1f} {_count(p.N):>9} "
              f"{_count(p.N_active):>9} {_count(p.D):>9} {p.D / p.N_active:>8.1f}")
    print(f"optimum: G {b.granularity:g} | N {_count(b.N)} total ({_describe_point(b)} active) | d_model "
          f"{b.d_model:.0f} x {b.n_blocks:.1f} blocks (shape rule d_model = 64 n_blocks) | D {_count(b.D)} tokens "
          f"| predicted loss {b.loss:.3f}")
    if b.capped:
        print(f"note: the memory cap ({_count(args.memory_cap_params)} params) sets the size; without it the law "
              "would choose a larger model")
    if opt.at_grid_edge:
        print(f"note: the best G is the largest considered ({b.granularity:g}); widen --granularities")
    return 0


def _table(law: L.Law, label: str, args) -> int:
    rows = []
    for flops, n_act, D, G, loss in L.PAPER_TABLE2:
        best = L.optimal(law, flops, args.expansion, args.granularities, args.memory_cap_params).best
        rows.append({"flops": flops, "paper": {"N_active": n_act, "D": D, "G": G, "loss": loss},
                     "ours": best.to_dict()})
    if args.json:
        print(json.dumps({"coeffs": args.coeffs, "law": law.to_dict(), "rows": rows}, indent=2))
        return 0
    print(f"Table 2 of Krajewski et al. 2024 (paper) beside this law's optimum (ours): {label}, E {args.expansion:g}")
    print(f"{'FLOPs':>9} | {'paper: N':>12} {'D':>8} {'G':>3} {'loss':>6} | {'ours: N':>12} {'D':>8} {'G':>3} "
          f"{'loss':>6} {'diff':>7}")
    for r in rows:
        p, o = r["paper"], r["ours"]
        paper_n = f"64 x {_count(p['N_active'])}"
        ours_n = f"{o['expansion']:g} x {_count(o['N_active'])}" if o["expansion"] > 1 else _count(o["N"])
        print(f"{r['flops']:>9.3g} | {paper_n:>12} {_count(p['D']):>8} {p['G']:>3} {p['loss']:>6.3f} | "
              f"{ours_n:>12} {_count(o['D']):>8} {o['granularity']:>3g} {o['loss']:>6.3f} "
              f"{o['loss'] - p['loss']:>+7.3f}")
    print("(the paper's loss column runs 0.011-0.024 above its own coefficients' prediction: rounding, DESIGN 5.5)")
    return 0


def cmd_plot(args) -> int:
    if args.coeffs is not None:
        law = L.load_law(args.coeffs)
        runs = sweep_module.read_runs(args.csv, need_granularity=not law.dense)
        label = {"paper": "paper law", "paper-dense": "paper dense law"}.get(args.coeffs, f"law {args.coeffs}")
    else:
        runs = sweep_module.read_runs(args.csv, need_granularity=not args.dense)
        try:
            law = L.fit(runs.N, runs.D, runs.G, runs.loss, dense=args.dense).law
        except ScalingError as e:
            raise ScalingError(f"{e}; or draw against the paper's law with --coeffs paper") from None
        label = "law fitted to the CSV"
    for path in plot_module.plot_all(runs, law, args.csv, label, expansion=args.expansion):
        print(path)
    return 0


def cmd_sweep(args, extra: list[str]) -> int:
    grid = sweep_module.parse_grid(args.grid)
    launcher = shlex.split(args.launcher) if args.launcher else [sys.executable]
    runs = sweep_module.plan(grid, args.out, extra)
    csv_path = args.csv or os.path.join(args.out, "runs.csv")
    if args.dry_run:
        print(sweep_module.format_plan(runs, launcher))
        print(f"{len(runs)} runs; {sum(r.status() == 'finished' for r in runs)} finished. The CSV would be {csv_path}")
        return 0
    try:
        failed = sweep_module.run_all(runs, launcher, keep_going=args.keep_going)
    finally:  # what has finished is in the CSV even when a run fails or the sweep is interrupted
        rows = sweep_module.collect(runs, args.out, csv_path)
        done = sum(r.status() == "finished" for r in runs)
        print(f"{csv_path}: {done} of this grid's {len(runs)} runs"
              + (f", and {len(rows) - done} earlier runs in {args.out}" if len(rows) > done else ""))
    if failed:
        print(f"error: {len(failed)} runs failed: {', '.join(failed)}; their logs are RUN_DIR/train.log",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
