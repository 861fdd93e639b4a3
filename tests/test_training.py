"""Training behaviour through the real recipe, the real DeepSpeed engine and launcher, on CPU ranks.

Runs are shared between tests (session fixtures) because each launch costs seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from conftest import PY, REPO, TINY, child_env, explain, free_port, launch_cmd, run_recipe, train_losses

STEPS = 6


def _args(data_args, run_dir, *extra):
    return [*TINY, *data_args, "--train-iters", str(STEPS), "--run-dir", str(run_dir), *extra]


@pytest.fixture(scope="session")
def one_rank_gas(data_args, tmp_path_factory):
    """One rank, ZeRO-2, gradient accumulation over 2 micro-batches per step."""
    run_dir = tmp_path_factory.mktemp("one_rank") / "run"
    p = run_recipe(_args(data_args, run_dir, "--ds-config", "ds_configs/cpu_zero2.json"))
    assert p.returncode == 0, explain(p)
    return run_dir


@pytest.fixture(scope="session")
def two_ranks(data_args, tmp_path_factory):
    """Two data-parallel ranks, ZeRO-2, one micro-batch each per step, checkpoints every 3 steps."""
    run_dir = tmp_path_factory.mktemp("two_ranks") / "run"
    p = run_recipe(_args(data_args, run_dir, "--ds-config", "ds_configs/cpu_zero2.json", "--save-interval", "3",
                         "--keep-checkpoints", "0"), ranks=2)
    assert p.returncode == 0, explain(p)
    return run_dir


def _assert_same(a: dict, b: dict, steps, tol=1e-5):
    for s in steps:
        assert s in a and s in b, f"step {s} missing: {sorted(a)} vs {sorted(b)}"
        assert abs(a[s] - b[s]) <= tol, f"step {s}: {a[s]!r} != {b[s]!r}"


def test_two_ranks_zero2_equal_one_rank_accumulating(one_rank_gas, two_ranks):
    a, b = train_losses(one_rank_gas), train_losses(two_ranks)
    _assert_same(a, b, range(1, STEPS + 1))
    assert a[STEPS] < a[1], "the loss did not decrease at all"


def test_checkpoints_written_and_marked_complete(two_ranks):
    ckpts = sorted(p.name for p in (two_ranks / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_00000003", "step_00000006"]
    for c in ckpts:
        marker = json.loads((two_ranks / "checkpoints" / c / "complete.json").read_text())
        assert marker["world_size"] == 2
        assert (two_ranks / "checkpoints" / c / "rng_rank00001.pt").exists()
    summary = json.loads((two_ranks / "summary.json").read_text())
    assert summary["steps"] == STEPS


def test_tensorboard_events_hold_the_run(two_ranks):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(two_ranks / "tensorboard"))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/ppl", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/memory_gb",
                "valid/loss", "valid/ppl"):
        assert tag in scalars, (tag, scalars)
    losses = {e.step: e.value for e in acc.Scalars("train/loss")}
    jsonl = train_losses(two_ranks)
    assert losses and all(abs(losses[s] - jsonl[s]) < 1e-6 for s in losses)
    assert acc.Tags()["tensors"], "the resolved config is missing from the text tab"


def test_resume_after_exit_at_step_k_equals_uninterrupted(data_args, two_ranks, tmp_path):
    run_dir = tmp_path / "run"
    common = _args(data_args, run_dir, "--ds-config", "ds_configs/cpu_zero2.json")
    p = run_recipe([*common, "--exit-at-iter", "3"], ranks=2)
    assert p.returncode == 0, explain(p)
    assert max(train_losses(run_dir)) == 3
    p = run_recipe([*common, "--resume", "auto"], ranks=2)
    assert p.returncode == 0, explain(p)
    assert "resumed from" in p.stdout
    _assert_same(train_losses(run_dir), train_losses(two_ranks), range(1, STEPS + 1))


def test_fresh_start_refuses_run_dir_with_checkpoints(data_args, two_ranks, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(two_ranks, run_dir)
    p = run_recipe(_args(data_args, run_dir))
    assert p.returncode == 2
    assert "--resume auto" in p.stderr


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"run ended early: {proc.returncode}"
        if (run_dir / "metrics.jsonl").exists():
            losses = train_losses(run_dir)
            if losses and max(losses) >= step:
                return max(losses)
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not reached")


def _no_rank_left(run_dir: Path) -> list:
    """Processes still running with this run directory on their command line (orphaned ranks or launchers)."""
    left = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if str(run_dir) in " ".join(p.info["cmdline"] or []):
                left.append(p.pid)
    return left


def test_ctrl_c_to_wider_launch_saves_returns_zero_after_the_checkpoint_and_resumes_equal(data_args, tmp_path):
    """What a terminal's Ctrl-C (SIGINT to the process group of the command) or a scheduler does to ./run.sh's
    launcher: the ranks save at the next step boundary, the command returns 0 only once the checkpoint is complete,
    no traceback, no process left behind; the resumed run continues exactly as an uninterrupted one."""
    long = 400  # a schedule long enough that the signal lands mid-run
    run_dir = tmp_path / "run"
    args = _args(data_args, run_dir, "--train-iters", str(long), "--log-interval", "1")
    cmd = [PY, "-m", "wider.launch", "--num_gpus", "2", "--master_port", str(free_port()), "recipes/pretrain_gpt.py",
           *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    _wait_for_step(run_dir, 3, proc)
    os.killpg(proc.pid, signal.SIGINT)  # the whole foreground group, as a terminal does
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    assert "saving a checkpoint at the next step boundary" in out, out[-3000:]
    assert "stopped at step" in out and "preempted" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    done = [p for p in (run_dir / "checkpoints").iterdir() if (p / "complete.json").exists()]
    assert len(done) == 1  # complete when the command returned
    assert _no_rank_left(run_dir) == []
    k = json.loads((done[0] / "complete.json").read_text())["step"]
    assert 3 <= k < long

    p = run_recipe([*args, "--resume", "auto", "--exit-at-iter", str(k + 3)], ranks=2)
    assert p.returncode == 0, explain(p)
    ref_dir = tmp_path / "ref"
    ref = run_recipe([*_args(data_args, ref_dir, "--train-iters", str(long)), "--exit-at-iter", str(k + 3)], ranks=2)
    assert ref.returncode == 0, explain(ref)
    _assert_same(train_losses(run_dir), train_losses(ref_dir), range(1, k + 4))


def test_sigterm_to_a_plain_deepspeed_launchs_rank_exits_zero(data_args, tmp_path):
    """Without wider-launch: a scheduler's SIGTERM to the rank of a `deepspeed` launch saves, and DeepSpeed's runner
    and launcher pass the rank's 0 on."""
    run_dir = tmp_path / "run"
    args = _args(data_args, run_dir, "--train-iters", "400", "--log-interval", "1")
    proc = subprocess.Popen(launch_cmd(args, ranks=2), cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    _wait_for_step(run_dir, 2, proc)
    ranks = [c for c in psutil.Process(proc.pid).children(recursive=True)
             if "pretrain_gpt.py" in " ".join(c.cmdline()) and "deepspeed.launcher" not in " ".join(c.cmdline())]
    assert len(ranks) == 2
    ranks[1].send_signal(signal.SIGTERM)  # any subset of ranks: they agree on the flag
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    assert "stopped at step" in out and _no_rank_left(run_dir) == []


def test_kill_inside_the_checkpoint_writer_keeps_the_previous_checkpoint(data_args, two_ranks, tmp_path):
    """A rank killed halfway through writing its ZeRO shard (inside DeepSpeed's writer): that checkpoint is never
    marked complete, --resume auto continues from the previous one with the uninterrupted losses, and metrics.jsonl
    holds each step once although the killed run had logged steps past that checkpoint."""
    run_dir = tmp_path / "run"
    args = _args(data_args, run_dir, "--save-interval", "2", "--keep-checkpoints", "0",
                 "--ds-config", "ds_configs/cpu_zero2.json")
    p = run_recipe(args, ranks=2, env={"WIDER_FAULT_IN_SAVE": "4:1:kill"}, timeout=300)
    assert p.returncode != 0, "the run survived a killed rank"
    states = {c.name: (c / "complete.json").exists() for c in (run_dir / "checkpoints").iterdir()
              if c.name.startswith("step_")}
    assert states == {"step_00000002": True, "step_00000004": False}, states
    assert max(train_losses(run_dir)) == 4  # logged before the save
    p = run_recipe([*args, "--resume", "auto"], ranks=2)
    assert p.returncode == 0, explain(p)
    assert "resumed from" in p.stdout and "step_00000002" in p.stdout
    _assert_same(train_losses(run_dir), train_losses(two_ranks), range(3, STEPS + 1))
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, STEPS + 1))


def test_full_disk_during_a_save_stops_with_its_reason_and_keeps_the_previous_checkpoint(data_args, tmp_path):
    """A write that fails as on a full disk (ENOSPC inside DeepSpeed's writer, halfway through a file): one message
    saying so, exit 1, the partial checkpoint removed, the previous one intact and resumable."""
    run_dir = tmp_path / "run"
    args = _args(data_args, run_dir, "--save-interval", "2", "--keep-checkpoints", "0")
    p = run_recipe(args, env={"WIDER_FAULT_IN_SAVE": "4:0:enospc"}, timeout=300)
    assert p.returncode == 1, explain(p)
    assert "no space left on the device" in p.stderr and "step_00000002 is intact" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "iostream" not in p.stderr
    assert sorted(c.name for c in (run_dir / "checkpoints").iterdir() if c.name.startswith("step_")) == \
        ["step_00000002"]
    p = run_recipe([*args, "--resume", "auto"])
    assert p.returncode == 0 and "resumed from" in p.stdout, explain(p)
