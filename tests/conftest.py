"""Shared fixtures: the embedded corpus (prepared once, cached like ./run.sh does), and helpers that launch
real training runs (one rank in-process-free via `python recipes/...`, several through the `deepspeed`
launcher on CPU ranks with gloo, one thread each)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from wider.launch import new_job_env

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra) -> dict:
    # An in-process test may have set up a process group in this pytest process (its rendezvous port is
    # still listening): a child must not inherit that rank layout.
    env = new_job_env(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    env.pop("WIDER_FAULT_KILL_IN_SAVE", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def launch_cmd(args: list, ranks: int = 1, recipe: str = "recipes/pretrain_gpt.py") -> list:
    if ranks == 1:
        return [PY, recipe, *args]
    return [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), recipe, *args]


def run_recipe(args: list, ranks: int = 1, timeout: int = 600, env: dict | None = None,
               recipe: str = "recipes/pretrain_gpt.py") -> subprocess.CompletedProcess:
    """Run a training recipe to completion; returns the finished process (output captured)."""
    return subprocess.run(launch_cmd(args, ranks, recipe), cwd=REPO, env=child_env(**(env or {})),
                          capture_output=True, text=True, timeout=timeout)


def train_losses(run_dir) -> dict[int, float]:
    """step -> global-batch loss, from metrics.jsonl (the last record wins for a step run twice)."""
    out = {}
    with open(Path(run_dir) / "metrics.jsonl") as f:
        for line in f:
            r = json.loads(line)
            if r["kind"] == "train":
                out[r["step"]] = r["loss"]
    return out


def explain(p: subprocess.CompletedProcess) -> str:
    return f"exit {p.returncode}\n--- stdout ---\n{p.stdout[-4000:]}\n--- stderr ---\n{p.stderr[-4000:]}"


@pytest.fixture(scope="session")
def embedded():
    """Tokenizer and indexed dataset of the embedded corpus (cache/embedded, shared with ./run.sh)."""
    from data_prep.prepare_embedded import prepare_embedded

    return prepare_embedded(out_dir=str(REPO / "cache" / "embedded"))


@pytest.fixture(scope="session")
def data_args(embedded):
    return ["--data-path", embedded["prefix"], "--tokenizer", embedded["tokenizer"]]


# A model small enough that a step takes a few milliseconds on one core.
TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
        "--micro-batch-size", "4", "--global-batch-size", "8", "--warmup-iters", "2", "--log-interval", "1",
        "--eval-interval", "0", "--eval-iters", "2", "--final-eval-iters", "2", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def single_rank():
    """A one-rank gloo group with megatron's parallel state (in-process: no launcher needed)."""
    import patches
    from wider import parallel

    patches.apply_defaults()
    parallel.init_distributed(1)
    yield
    parallel.destroy()


def assert_ep2_equals_ep1(args: list, recipe: str, run_root, expert_files: list, steps: int) -> None:
    """Train the same run at moe.ep_size 1 and 2 on two CPU ranks: equal losses at every step (1e-5 relative), it
    trains, and the ep 2 checkpoint holds exactly `expert_files` (one file per (layer, global expert)), each
    written by the rank that holds that expert."""
    def run(name, *extra):
        p = run_recipe([*args, "--run-dir", str(run_root / name), *extra], ranks=2, recipe=recipe)
        assert p.returncode == 0, explain(p)
        return train_losses(run_root / name), p.stdout

    ep1, _ = run("ep1")
    ep2, out = run("ep2", "--ds-set", "moe.ep_size=2")
    assert "ep_size 2" in out
    assert sorted(ep1) == sorted(ep2) == list(range(1, steps + 1))
    for step in ep1:
        assert abs(ep1[step] - ep2[step]) <= 1e-5 * max(1.0, abs(ep1[step])), (step, ep1[step], ep2[step])
    assert ep1[steps] < ep1[1]  # it trains
    ckpt = run_root / "ep2" / "checkpoints" / f"step_{steps:08d}"
    assert sorted(p.name for p in ckpt.glob("layer_*_expert_*_model_states.pt")) == sorted(expert_files)
