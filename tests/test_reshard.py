"""Resuming at another parallel layout (issue 8): a dropless WideNet trained 10 steps on two ranks with experts
split over both (moe.ep_size 2, ZeRO-1), saving at step 5, continues from that checkpoint

- at ep_size 1 on one rank (gradient accumulation keeps the global batch; no ZeRO), and
- at ep_size 1 on two ranks (ZeRO-2: every partition laid out anew),

with the losses of steps 6-10 equal to the uninterrupted run's within 1e-5. Dropless (capacity factors null) and
without router noise, so that neither the capacity over a micro-batch nor per-rank RNG streams depend on the
layout. The run's checkpoints also record their layout; the two-rank continuation's own final checkpoint (experts
partitioned over two ZeRO ranks) serves tests/test_export.py too.
"""

from __future__ import annotations

import json

import pytest

from conftest import TINY, explain, run_recipe, train_losses

STEPS, SAVE = 10, 5
RECIPE = "recipes/pretrain_widenet.py"
MOE = ["--preset", "widenet_smoke", *TINY, "--train-iters", str(STEPS), "--router-noise", "none",
       "--moe-ffn-hidden-size", "96"]
DROPLESS = ["moe.capacity_factor=null", "moe.eval_capacity_factor=null"]


def _run(data_args, run_dir, *extra, ranks):
    p = run_recipe([*MOE, *data_args, "--run-dir", str(run_dir), *extra], ranks=ranks, recipe=RECIPE)
    assert p.returncode == 0, explain(p)
    return p


# tests/test_export.py imports the two fixtures below; pytest then holds one definition per module, so the runs
# are memoised here to run once per session whichever module asks first.
_RUNS: dict = {}


def _once(key: str, make):
    if key not in _RUNS:
        _RUNS[key] = make()
    return _RUNS[key]


@pytest.fixture(scope="session")
def ep2_run(data_args, tmp_path_factory):
    """Two ranks, ep_size 2, ZeRO-1, fp32, checkpoints at steps 5 and 10 (all kept)."""
    def make():
        d = tmp_path_factory.mktemp("ep2") / "run"
        _run(data_args, d, "--save-interval", str(SAVE), "--keep-checkpoints", "0", "--ds-set", *DROPLESS,
             "moe.ep_size=2", ranks=2)
        return d

    return _once("ep2", make)


@pytest.fixture(scope="session")
def resumed_two_ranks(data_args, ep2_run, tmp_path_factory):
    """ep2_run's step-5 checkpoint continued on two ranks at ep_size 1 under ZeRO-2."""
    def make():
        d = tmp_path_factory.mktemp("resumed2") / "run"
        p = _run(data_args, d, "--resume", str(ep2_run / "checkpoints" / f"step_{SAVE:08d}"), "--ds-config",
                 "ds_configs/moe_cpu_zero2.json", "--ds-set", *DROPLESS, ranks=2)
        return d, p.stdout

    return _once("resumed2", make)


def _equal_after_save(resumed: dict, full: dict) -> None:
    assert sorted(resumed) == list(range(SAVE + 1, STEPS + 1)), sorted(resumed)
    for s in resumed:
        assert abs(resumed[s] - full[s]) <= 1e-5, (s, resumed[s], full[s])


def test_checkpoints_record_their_layout(ep2_run):
    import torch

    ckpt = ep2_run / "checkpoints" / f"step_{SAVE:08d}"
    marker = json.loads((ckpt / "complete.json").read_text())
    layout = {"world_size": 2, "tp": 1, "dp": 2, "ep_size": 2, "zero_stage": 1, "bf16": False}
    assert {k: marker[k] for k in layout} == layout and marker["step"] == SAVE
    client = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False, map_location="cpu")
    assert client["layout"] == layout


def test_ep2_two_ranks_resumes_at_ep1_on_one_rank(data_args, ep2_run, tmp_path):
    run = tmp_path / "one"
    p = _run(data_args, run, "--resume", str(ep2_run / "checkpoints" / f"step_{SAVE:08d}"), "--ds-set", *DROPLESS,
             "zero_optimization.stage=0", ranks=1)
    assert ("re-sharded from dp 2 x tp 1, ep_size 2, ZeRO 1, fp32 to dp 1 x tp 1, ep_size 1, ZeRO 0, fp32"
            in p.stdout), p.stdout[-3000:]
    assert "RNG streams are not restored" in p.stdout
    assert "micro 4 x gas 2 x dp 1" in p.stdout  # the global batch kept by accumulation
    _equal_after_save(train_losses(run), train_losses(ep2_run))


def test_ep2_two_ranks_resumes_at_ep1_on_two_ranks_zero2(ep2_run, resumed_two_ranks):
    run, out = resumed_two_ranks
    assert "re-sharded from dp 2 x tp 1, ep_size 2, ZeRO 1, fp32 to dp 2 x tp 1, ep_size 1, ZeRO 2, fp32" in out
    _equal_after_save(train_losses(run), train_losses(ep2_run))
