"""The default run, as a newcomer starts it: ./run.sh (fewer steps under test) learns something real."""

from __future__ import annotations

import json
import os
import subprocess

from conftest import REPO, child_env, explain

STEPS = 150


def test_default_run_learns(embedded, tmp_path):
    run_dir = tmp_path / "default"
    env = child_env(WIDER_CPU_RANKS=2)
    p = subprocess.run(["./run.sh", "--train-iters", str(STEPS), "--eval-interval", "0", "--run-dir", str(run_dir)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, explain(p)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["preset"] == "gpt_smoke" and summary["steps"] == STEPS
    assert summary["valid_tokens"] >= 50_000
    # A tenth of the default schedule already puts the model well below the unigram entropy; the full
    # default run reaches more than 1 nat (README, benchmarks/RESULTS.md).
    assert summary["nats_below_unigram"] > 0.5, summary
    for key in ("checkpoint", "tensorboard", "metrics"):
        assert os.path.exists(summary[key]), key
    assert "nats below it" in p.stdout and str(run_dir) in p.stdout
