"""`wider-launch` (python -m wider.launch): DeepSpeed's launcher, with the whole configuration checked first and
signals handled so that a scheduler sees the truth.

    wider-launch --num_gpus 8 recipes/pretrain_widenet.py --preset widenet_l --resume auto    # deepspeed's arguments
    wider-launch --hostfile hostfile recipes/pretrain_gpt.py --preset gpt_1b3 --run-dir /shared/runs/gpt1b3
    ./run.sh PRESET ...                                                                       # uses it

It takes exactly the `deepspeed` command's arguments and runs that command, adding two things:

1. Pre-flight (wider.preflight): the recipe's arguments are parsed and every input is checked in this one process
   before any rank starts (run config, ds_config, tokenizer, datasets, run directory, resume target). Invalid input
   prints one line naming the value and the fix and exits 2 within seconds; nothing is written.
2. Signals: DeepSpeed's runner and launcher run in a session of their own, so a signal meant for the job (SIGTERM
   from `kill`, `timeout` or a scheduler, SIGHUP, Ctrl-C's SIGINT to the terminal's process group) reaches this
   process only. It sends SIGTERM to the training ranks alone: they agree at the next step boundary, save a
   checkpoint and exit 0, after which DeepSpeed's launcher and runner exit 0 and so does this process. It returns
   only once the checkpoint is complete. A second Ctrl-C (SIGINT) interrupts the ranks at once. (Signalled
   directly, DeepSpeed's own launcher kills the ranks with a 30 s grace each and exits 1, and its single-node runner
   has no handler at all: the ranks would be orphaned.)

Exit status: 0 finished (or stopped at --exit-at-iter), or preempted by a signal with its checkpoint complete;
2 invalid input; 1 a failure (a rank failed; DeepSpeed's own messages say which); 128 + N when signal N arrived
before any rank had started, or when a second signal interrupted the ranks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from typing import Optional


# Environment variables that describe one job's rank layout (a launcher's, or the one-rank default that
# wider.parallel sets in its own process): a new job started from such a process must not inherit them, or it joins
# a rendezvous port that is still listening.
RANK_LAYOUT_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE",
                    "CROSS_RANK", "CROSS_SIZE")


def new_job_env(**extra: str) -> dict:
    """This process's environment for a child that is a job of its own: no inherited rank layout, plus extra."""
    env = {k: v for k, v in os.environ.items() if k not in RANK_LAYOUT_VARS}
    env.update(extra)
    return env


def _recipe_args(argv: list) -> tuple[Optional[str], list]:
    """(the training script, its arguments) out of a deepspeed command line (DeepSpeed's own parser)."""
    from deepspeed.launcher import runner

    args = runner.parse_args(argv)
    return args.user_script, list(args.user_args)


def world_size(argv: list) -> Optional[int]:
    """The ranks DeepSpeed's runner would start for these arguments (its own resource rules), or None when that
    depends on what only the hosts know."""
    from deepspeed.launcher import runner

    args = runner.parse_args(argv)
    pool = runner.fetch_hostfile(args.hostfile) if os.path.isfile(args.hostfile) else None
    if not pool:
        if args.num_gpus > 0:
            return args.num_gpus * max(args.num_nodes, 1)
        from deepspeed.accelerator import get_accelerator

        count = get_accelerator().device_count()
        return count if count > 0 else None
    active = runner.parse_inclusion_exclusion(pool, args.include, args.exclude)
    active = runner.apply_num_nodes_and_gpus(active, args.num_nodes, args.num_gpus)
    return sum(len(slots) for slots in active.values())


def _deepspeed_command() -> list:
    """DeepSpeed's `deepspeed` command of this environment."""
    here = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return [here] if os.path.isfile(here) else [shutil.which("deepspeed") or "deepspeed"]


class Supervisor:
    """Runs the deepspeed command in its own session and turns signals into a clean stop of the ranks."""

    def __init__(self, argv: list, script: str):
        self.argv, self.script = argv, os.path.abspath(script)
        self.signals: list[int] = []
        self.stopped_before_ranks = False
        self.proc: Optional[subprocess.Popen] = None

    def ranks(self) -> list:
        """The training processes: descendants of the runner running the recipe (DeepSpeed's launcher is not)."""
        import psutil

        if self.proc is None:
            return []
        try:
            tree = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        out = []
        for p in tree:
            try:
                cmd = p.cmdline()
            except psutil.Error:
                continue
            if "deepspeed.launcher.launch" not in cmd and any(
                    c.endswith(".py") and os.path.abspath(c) == self.script for c in cmd):
                out.append(p)
        return out

    def handle(self, signum, frame) -> None:
        import psutil

        self.signals.append(signum)
        name = signal.Signals(signum).name
        ranks = self.ranks()
        if not ranks:  # nothing trains yet: stop the launch itself
            print(f"[wider-launch] {name} before the ranks started: stopping the launch", file=sys.stderr, flush=True)
            self.stopped_before_ranks = True
            if self.proc is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
            return
        # First signal: SIGTERM, which the ranks turn into a checkpoint at the next step boundary. A second one
        # (Ctrl-C twice): SIGINT, which interrupts them at once (wider.training.preemption).
        forward = signal.SIGTERM if len(self.signals) == 1 else signal.SIGINT
        what = ("saving a checkpoint at the next step boundary, then stopping" if forward == signal.SIGTERM
                else "interrupting the ranks now (no checkpoint)")
        print(f"[wider-launch] {name}: {what}", file=sys.stderr, flush=True)
        for p in ranks:
            with contextlib.suppress(psutil.Error):
                p.send_signal(forward)

    def run(self) -> int:
        """Start the command and wait for it; the exit status (the module docstring lists them)."""
        previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            self.proc = subprocess.Popen(_deepspeed_command() + self.argv, start_new_session=True)
            rc = self.proc.wait()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        if rc < 0:
            rc = 128 - rc
        if self.stopped_before_ranks:
            return 128 + self.signals[0]
        if len(self.signals) > 1 and rc != 0:
            return 128 + signal.SIGINT
        return rc


def main(argv: Optional[list] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    from wider.recipe import quiet_libraries

    quiet_libraries()
    script, recipe_argv = _recipe_args(argv)
    from wider import preflight

    status = preflight.main(script, recipe_argv, world_size(argv))
    if status != 0:
        return status
    return Supervisor(argv, script).run()


if __name__ == "__main__":
    sys.exit(main())
