"""The default run, as a newcomer starts it: ./run.sh (fewer steps under test) learns something real."""

from __future__ import annotations

import json
import os
import subprocess

from conftest import REPO, child_env, explain

STEPS = 80


def test_default_run_learns(embedded, tmp_path):
    run_dir = tmp_path / "default"
    env = child_env(WIDER_CPU_RANKS=2)
    p = subprocess.run(["./run.sh", "--train-iters", str(STEPS), "--run-dir", str(run_dir)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, explain(p)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["preset"] == "widenet_smoke" and summary["steps"] == STEPS
    assert summary["valid_tokens"] >= 50_000
    # A quarter of the default schedule already puts the model well below the unigram entropy; the full
    # default run reaches more than 1 nat (README, benchmarks/RESULTS.md).
    assert summary["nats_below_unigram"] > 0.5, summary
    for key in ("checkpoint", "tensorboard", "metrics"):
        assert os.path.exists(summary[key]), key
    assert "nats below it" in p.stdout and str(run_dir) in p.stdout
    assert "| drop " in p.stdout and "| bal " in p.stdout  # MoE health on the console line

    # MoE monitoring: per-call (per-block) statistics at the final evaluation, and the load heatmap.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final_moe = [r for r in records if r["kind"] == "moe_valid"][-1]
    blocks = [k for k in final_moe if k.startswith("block")]
    assert blocks == [f"block{i:02d}" for i in range(4)]
    for b in blocks:
        assert abs(sum(final_moe[b]["load"]) - 1.0) < 1e-6 and 0.0 <= final_moe[b]["dropped"] < 1.0
        assert 0.0 < final_moe[b]["entropy"] <= 1.3863  # log 4
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(summary["tensorboard"], size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert "moe/expert_load_blocks_x_experts" in acc.Tags()["images"]
    assert "train_moe/block03/dropped" in acc.Tags()["scalars"]
    assert "valid_moe_load/block00/expert03" in acc.Tags()["scalars"]
    # Validation every 50 steps (the preset's interval), not only at the end: step 50 and the final one.
    assert [e.step for e in acc.Scalars("valid/loss")] == [50, STEPS]
