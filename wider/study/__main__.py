"""python -m wider.study {list,plan,run,report}: equal-budget quality studies (DESIGN 11).

    python -m wider.study list
    python -m wider.study plan granularity --scale gpu --gpus 8 --mfu 0.2
    python -m wider.study run smoke --jobs 2
    python -m wider.study run widenet --scale cpu --jobs 2
    python -m wider.study run umoe --scale gpu --launcher "deepspeed --num_gpus 8" --jobs 1 \
        -- --data-path data/my_text_document --tokenizer data/tok.model
    python -m wider.study report widenet --scale cpu

`run` trains every arm x seed of the study at the scale through the recipes into OUT (default
runs/studies/STUDY-SCALE): OUT/ARM-sSEED is each run's directory (train.log inside), seeds first (one seed of every
arm, then the second, ...). Running the same command again skips finished runs and resumes interrupted ones
(--resume auto); a run directory started with other flags is refused. A run that fails is recorded
(OUT/failures.json), the others go on, and the table reports its arm as failed. Then OUT/results.md (the table),
OUT/results.json and OUT/loss_vs_tokens.png, OUT/loss_vs_flops.png are written (also after a failure or Ctrl-C:
what has finished is reported).

Flags after -- go to every run's recipe (a corpus: --data-path, --tokenizer; DeepSpeed settings: --ds-config,
--ds-set). The token budget, schedule, seeds and run directories are the study's. --launcher puts a launcher before
each recipe ('deepspeed --num_gpus 8', 'wider-launch --num_gpus 8'; default this Python, one rank); --jobs N trains
N runs at a time (on CPU cores: one thread each unless OMP_NUM_THREADS is set).

--lr-grid 1e-3,3e-3,1e-2 first trains each architecture family's first arm (seed 1, the study's budget and
schedule) at every rate under OUT/lr_grid/, keeps the rate with the lowest final validation loss for the whole
family, records grid, losses and choices in OUT/study.json and the table, then trains the study with them. A
recorded choice is used by later runs of the same command without --lr-grid.

Exit status: 0 every run finished; 1 a run failed (the table says which); 2 invalid input (nothing trained);
130 interrupted (the running arms saved a checkpoint; run the same command again).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Optional, Sequence

from wider import studies
from wider.scaling.sweep import GridError, SweepError
from wider.study import report as R
from wider.study import runner


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m wider.study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the studies, their claims, arms and scales")

    def common(sp):
        sp.add_argument("study", help=f"one of {', '.join(studies.STUDIES)}")
        sp.add_argument("--scale", default="cpu", help="cpu (two CPU cores) or gpu (one GPU node); default cpu")
        sp.add_argument("--out", default=None, help="study directory (default runs/studies/STUDY-SCALE)")

    pl = sub.add_parser("plan", help="arms, counts, matching, FLOPs and expected time; trains nothing")
    common(pl)
    pl.add_argument("--seeds", type=int, default=None, help="seeds per arm (default: the scale's)")
    pl.add_argument("--tokens", type=float, default=None, help="training tokens per arm (default: the scale's)")
    pl.add_argument("--gpus", type=int, default=8, help="GPUs of the expected-time estimate (default 8)")
    pl.add_argument("--mfu", type=float, default=0.3,
                    help="model FLOPs utilisation of the estimate (default 0.3: the dense GPT measured 0.32 on an "
                         "H100, WideNet 0.29, fine-grained 0.18, MoEUT 0.07; benchmarks/RESULTS.md)")
    pl.add_argument("--commands", action="store_true", help="print every run's command line")

    r = sub.add_parser("run", help="train every arm x seed (resumable), then write the table and plots")
    common(r)
    r.add_argument("--seeds", type=int, default=None, help="seeds per arm (default: the scale's)")
    r.add_argument("--tokens", type=float, default=None,
                   help="training tokens per arm (default: the scale's; for a quick look, stated in the table)")
    r.add_argument("--jobs", type=int, default=1, help="runs trained at a time (default 1)")
    r.add_argument("--launcher", default=None,
                   help="command before each recipe, e.g. 'deepspeed --num_gpus 8' (default: this Python, one rank)")
    r.add_argument("--lr-grid", default=None, metavar="LR1,LR2,...",
                   help="tune the peak learning rate once per architecture family on this grid first")

    rep = sub.add_parser("report", help="the table and plots of what has finished in OUT; trains nothing")
    common(rep)
    return p


def out_dir(args) -> str:
    return args.out or os.path.join("runs", "studies", f"{args.study}-{args.scale}")


def get_study(name: str) -> studies.Study:
    try:
        return studies.get(name)
    except KeyError as e:
        raise runner.StudyError(e.args[0]) from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    if extra and args.command not in ("plan", "run"):
        print(f"error: flags after -- are for `plan` and `run`, got {shlex.join(extra)}", file=sys.stderr)
        return 2
    try:
        return {"list": cmd_list, "plan": lambda a: cmd_plan(a, extra), "run": lambda a: cmd_run(a, extra),
                "report": cmd_report}[args.command](args)
    except (runner.StudyError, GridError, SweepError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to continue", file=sys.stderr)
        return 130


def cmd_list(args) -> int:
    for s in studies.STUDIES.values():
        print(f"{s.name}: {s.claim}")
        print(f"  reference {s.reference}; matched: {s.matched}")
        for name, sc in s.scales.items():
            arms = ", ".join(a.name + (" (needs " + ", ".join(a.requires) + ")" if runner.missing_fields(a) else "")
                             for a in sc.arms)
            print(f"  {name}: {R.count(sc.tokens)} tokens x {sc.seeds} seeds; arms {arms}")
    return 0


def _match_lines(p) -> list:
    out = []
    for m in runner.check_matches(p):
        tol = "equal" if m.match.rel_tol == 0 else f"within {100 * m.match.rel_tol:g}%"
        out.append(f"  {'ok ' if m.ok else 'NO '} {m.match.what} ({tol}): largest deviation {100 * m.deviation:.2f}%")
    return out


def cmd_plan(args, extra: list) -> int:
    study = get_study(args.study)
    p = runner.plan(study, args.scale, out_dir(args), extra, seeds=args.seeds, tokens=args.tokens)
    if args.gpus < 1 or not 0 < args.mfu <= 1:
        raise runner.StudyError("--gpus must be >= 1 and --mfu in (0, 1]")
    print(f"study {study.name}, scale {args.scale}: {p.steps} steps per run, {p.seeds} seeds, into {p.out}")
    print(f"claim: {study.claim}")
    print(f"matched: {study.matched}")
    print("\n".join(_match_lines(p)))
    head = (f"{'arm':<12} {'status':<22} {'unique':>9} {'active':>9} {'FLOPs/tok':>10} {'tokens':>9} {'FLOPs/run':>10} "
            f"{'h/run':>7}")
    print(head)
    total_s = 0.0
    for a in p.arms:
        if not a.runs:
            print(f"{a.arm.name:<12} skipped: {a.skipped}")
            continue
        i = a.info
        rate = args.gpus * a.cfg.train.peak_tflops * 1e12 * args.mfu
        secs = i["total_train_flops"] / rate
        total_s += secs * len(a.runs)
        status = "/".join(r.status() for r in a.runs)
        print(f"{a.arm.name:<12} {status:<22} {R.count(i['params_total']):>9} {R.count(i['params_active']):>9} "
              f"{R.count(i['train_flops_per_token']):>10} {R.count(i['total_tokens']):>9} "
              f"{i['total_train_flops']:>10.3g} {secs / 3600:>7.2f}")
    runs = sum(len(a.runs) for a in p.arms)
    if p.scale.vocab is None:
        print(f"expected training time of all {runs} runs on {args.gpus} GPUs of {p.arms[0].cfg.train.peak_tflops:g} "
              f"TFLOP/s at MFU {args.mfu:g}: {total_s / 3600:.1f} h (h/run: wider.info's training FLOPs at that rate; "
              "start-up and evaluation not included)")
    else:
        print(f"{runs} runs on CPU cores: the measured step times and the wall-time arithmetic are in DESIGN 11 (h/run "
              "above assumes GPUs)")
    launcher = [sys.executable]
    for a in p.arms:
        for run in a.runs[: None if args.commands else 1]:
            print(f"  {runner.command_line(run, launcher)}")
    return 0


def cmd_run(args, extra: list) -> int:
    study = get_study(args.study)
    if args.jobs < 1:
        raise runner.StudyError(f"--jobs {args.jobs}: give at least 1")
    scale = study.scales.get(args.scale)
    if scale is not None and scale.needs_data and "--data-path" not in extra:
        raise runner.StudyError(
            f"the {args.scale} scale trains billions of tokens: give your corpus after --, e.g. `python -m wider.study "
            f"run {study.name} --scale {args.scale} -- --data-path data/my_text_document --tokenizer data/tok.model` "
            "(the embedded corpus has 1M tokens)")
    grid = runner.parse_lr_grid(args.lr_grid) if args.lr_grid else None
    out = out_dir(args)
    launcher = shlex.split(args.launcher) if args.launcher else [sys.executable]
    p = runner.plan(study, args.scale, out, extra, seeds=args.seeds, tokens=args.tokens)
    before = runner.read_study(p.out)
    lr_grid = before.get("lr_grid") if before else None
    runner.record_study(p, lr_grid)
    if grid is not None:
        grids = runner.grid_plans(p, grid)
        print(f"learning-rate grid {', '.join(f'{x:g}' for x in grid)} for {', '.join(grids)}")
        grid_runs = [r for _, (_, runs) in grids.items() for _, r in runs]
        try:
            runner.train(grid_runs, launcher, args.jobs, out=os.path.join(p.out, "lr_grid"))
        finally:
            lr_grid = runner.choose_lrs(grids, grid)
            runner.record_study(p, lr_grid)
        lost = [f for f, v in lr_grid["families"].items() if v["chosen"] is None]
        if lost:
            print(f"error: every grid run of {', '.join(lost)} failed; their logs are under "
                  f"{os.path.join(p.out, 'lr_grid')}", file=sys.stderr)
            return 1
    if lr_grid:
        lrs = {f: v["chosen"] for f, v in lr_grid["families"].items() if v.get("chosen") is not None}
        for f, v in lr_grid["families"].items():
            edge = " (at the grid's edge: widen the grid)" if v.get("at_edge") else ""
            print(f"learning rate of {f}: {v['chosen']:g}{edge}")
        p = runner.plan(study, args.scale, out, extra, seeds=args.seeds, tokens=args.tokens, lrs=lrs)
        runner.record_study(p, lr_grid)
    print("\n".join(_match_lines(p)))
    for a in p.arms:
        if not a.runs:
            print(f"arm {a.arm.name}: skipped ({a.skipped})")
    failed: dict = {}
    try:
        failed = runner.train(p.runs(), launcher, args.jobs, out=p.out)
    finally:
        md, _ = R.write(p, runner.read_failures(p.out), runner.check_matches(p), lr_grid)
        print(f"table: {md}; plots: {os.path.join(p.out, 'loss_vs_tokens.png')}, "
              f"{os.path.join(p.out, 'loss_vs_flops.png')}")
    if failed:
        print(f"error: {len(failed)} runs failed: {', '.join(failed)}; their logs are OUT/RUN/train.log, and the "
              "table marks their arms", file=sys.stderr)
        return 1
    return 0


def cmd_report(args) -> int:
    study = get_study(args.study)
    out = out_dir(args)
    rec = runner.read_study(os.path.abspath(out))
    if not rec:
        raise runner.StudyError(f"{out} holds no study (no study.json): train it with `python -m wider.study run "
                                f"{args.study} --scale {args.scale}` first")
    if (rec.get("study"), rec.get("scale")) != (study.name, args.scale):
        raise runner.StudyError(f"{out} holds study {rec.get('study')!r} at scale {rec.get('scale')!r}")
    lr_grid = rec.get("lr_grid")
    lrs = {f: v["chosen"] for f, v in lr_grid["families"].items() if v.get("chosen") is not None} if lr_grid else {}
    p = runner.plan(study, args.scale, out, rec.get("extra", []), seeds=rec.get("seeds"), tokens=rec.get("tokens"),
                    lrs=lrs)
    md, arms = R.write(p, runner.read_failures(p.out), runner.check_matches(p), lr_grid)
    print(open(md).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
