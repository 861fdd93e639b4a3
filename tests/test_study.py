"""Equal-budget studies (wider/studies.py, python -m wider.study): the statistics against scipy and the textbook
formulas, the table and plots on synthetic run outputs (a failed seed reported, a skipped arm listed), each study's
matching rule from wider.info's counters at both scales, the learning-rate grid's bookkeeping, the command line's
errors, and through the real recipes: the smoke study end to end with an interrupted arm that resumes, and a failed
arm reported as failed."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess

import numpy as np
import pytest

from conftest import PY, REPO, child_env, explain, train_losses

from wider import studies
from wider.study import report as R
from wider.study import runner
from wider.study.__main__ import main as study_main


# ----------------------------------------------------------------------------------------------------------
# Statistics


def test_mean_std_and_welch_interval_against_scipy_and_the_formula():
    from scipy import stats

    a, r = [3.91, 3.87, 3.95], [4.02, 4.10, 3.99, 4.05]
    s = R.summarize(a)
    assert s.n == 3 and s.mean == pytest.approx(np.mean(a), abs=1e-12)
    assert s.std == pytest.approx(math.sqrt(sum((x - np.mean(a)) ** 2 for x in a) / 2), rel=1e-12)  # ddof 1
    d = R.welch(a, r)
    # Welch's interval from its definition: se^2 = s_a^2 / n_a + s_r^2 / n_r, Welch-Satterthwaite df, t quantile.
    va, vr = np.var(a, ddof=1) / len(a), np.var(r, ddof=1) / len(r)
    df = (va + vr) ** 2 / (va ** 2 / (len(a) - 1) + vr ** 2 / (len(r) - 1))
    half = stats.t.ppf(0.975, df) * math.sqrt(va + vr)
    diff = np.mean(a) - np.mean(r)
    assert d.diff == pytest.approx(diff, abs=1e-12) and d.df == pytest.approx(df, rel=1e-9)
    assert (d.low, d.high) == pytest.approx((diff - half, diff + half), rel=1e-9)
    assert d.outside_noise is True  # the interval is below 0
    assert R.welch([1.0, 2.0], [1.5, 1.6]).outside_noise is False
    one = R.welch([3.9], r)
    assert math.isnan(one.low) and one.note == "needs 2 seeds per arm" and one.outside_noise is None
    assert R.welch([2.0, 2.0], [2.0, 2.0]).note == "no spread over seeds"
    assert R.summarize([]).n == 0 and math.isnan(R.summarize([4.0]).std)


# ----------------------------------------------------------------------------------------------------------
# Plans, matching rules, the table on synthetic outputs


def _tiny_study(name="tiny", arms=None, reference="a", **scale) -> studies.Study:
    """A study over tiny dense GPTs (planning only, nothing trained unless a test trains it)."""
    tiny = ("model.num_layers=2", "model.hidden_size=64")
    arms = arms or (studies.Arm("a", "gpt_smoke", tiny, label="reference"),
                    studies.Arm("b", "gpt_smoke", (*tiny, "model.num_attention_heads=2"), label="two heads"),
                    studies.Arm("c", "gpt_smoke", (*tiny, "model.activation=relu"), label="relu"),
                    studies.Arm("ghost", "gpt_smoke", tiny, requires=("model.no_such_field",), label="future"))
    flags = ("--seq-length", "64", "--global-batch-size", "8", "--micro-batch-size", "8", "--eval-iters", "1",
             "--final-eval-iters", "1", "--log-interval", "1")
    kw = dict(arms=arms, tokens=4 * 8 * 64, seeds=3, flags=flags, evals=4, saves=2)
    kw.update(scale)
    return studies.Study(name=name, claim="test", reference=reference, matched="shape",
                         matches=(studies.Match("num_layers", "depth"),), scales={"cpu": studies.Scale(**kw)})


def _fake_run(run, loss: float, curve: dict) -> None:
    os.makedirs(run.run_dir, exist_ok=True)
    with open(os.path.join(run.run_dir, "config.json"), "w") as f:
        f.write(run.cfg.to_json())
    with open(os.path.join(run.run_dir, "metrics.jsonl"), "w") as f:
        for step, v in curve.items():
            f.write(json.dumps({"kind": "eval", "step": step, "loss": v, "tokens": 64}) + "\n")
    if loss is not None:
        with open(os.path.join(run.run_dir, "summary.json"), "w") as f:
            json.dump({"final_valid_loss": loss, "steps": run.cfg.train.train_iters}, f)


def test_table_and_plots_from_synthetic_run_outputs(tmp_path, data_args):
    """Three arms x three seeds of synthetic outputs: the table's means, standard deviations and Welch intervals
    equal scipy's; a seed that failed and one never started mark their arm, which stays in the table; an arm needing
    a field this version lacks is listed as skipped; both PNGs are written."""
    import matplotlib.image

    p = runner.plan(_tiny_study(), "cpu", str(tmp_path / "out"), data_args)
    assert p.steps == 4 and [a.arm.name for a in p.arms] == ["a", "b", "c", "ghost"]
    assert p.arm("ghost").runs == [] and "model.no_such_field" in p.arm("ghost").skipped
    assert [r.name for r in p.runs()][:3] == ["a-s1", "b-s1", "c-s1"]  # seed-major
    args = p.arm("b").runs[1].args
    assert args[args.index("--seed") + 1] == "2" and args[args.index("--train-iters") + 1] == "4"
    assert args[args.index("--min-lr") + 1] == f"{0.1 * float(args[args.index('--lr') + 1]):g}"
    losses = {"a": [4.00, 4.04, 3.98], "b": [3.90, 3.93, 3.88], "c": [4.10]}
    for arm, values in losses.items():
        for run, v in zip(p.arm(arm).runs, values):
            _fake_run(run, v, {1: 6.0 + v, 2: 5.0 + v, 3: 4.5 + v})
    _fake_run(p.arm("c").runs[1], None, {1: 9.0})  # c-s2 failed (no summary.json); c-s3 never started
    failures = {"c-s2": "run c-s2 exited with status 1; its log is .../train.log\n--- last lines ---"}
    md, arms = R.write(p, failures, runner.check_matches(p), None)
    out = json.loads((tmp_path / "out" / "results.json").read_text())
    by = {x["arm"]: x for x in out["arms"]}
    from scipy import stats

    for arm in ("a", "b"):
        assert by[arm]["mean"] == pytest.approx(np.mean(losses[arm]), abs=1e-12)
        assert by[arm]["std"] == pytest.approx(np.std(losses[arm], ddof=1), abs=1e-12)
    ci = stats.ttest_ind(losses["b"], losses["a"], equal_var=False).confidence_interval(0.95)
    assert by["b"]["ci"] == pytest.approx([ci.low, ci.high], rel=1e-9)
    assert by["b"]["diff"] == pytest.approx(np.mean(losses["b"]) - np.mean(losses["a"]), abs=1e-12)
    assert by["c"]["n"] == 1 and by["c"]["ci"][0] is None  # one finished seed: no interval, but the arm is there
    assert by["c"]["status"].startswith("FAILED: 1 finished, 1 failed, 1 not started of 3 seeds; s2: run c-s2 exited")
    assert by["ghost"]["skipped"] and by["ghost"]["status"].startswith("skipped: needs model.no_such_field")
    text = (tmp_path / "out" / "results.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"a", "b", "c", "ghost"}
    assert f"{np.mean(losses['b']):.4f} ± {np.std(losses['b'], ddof=1):.4f} (n 3)" in rows["b"]
    assert f"[{ci.low:+.4f}, {ci.high:+.4f}]" in rows["b"] and "| yes |" in rows["b"]  # b beats a beyond the noise
    assert "FAILED" in rows["c"] and "skipped" in rows["ghost"] and "reference" in rows["a"]
    assert "depth (equal): yes" in text
    for name in ("loss_vs_tokens.png", "loss_vs_flops.png"):
        img = matplotlib.image.imread(tmp_path / "out" / name)
        assert img.shape[0] > 300 and img.shape[1] > 500 and img.std() > 0.01
    # The last-quarter drop: loss at the evaluation nearest 75% of the steps (3 of 4) minus the last one.
    assert R.last_quarter_drop([(1, 6.0), (2, 5.0), (3, 4.6), (4, 4.5)], 4) == pytest.approx(0.1)
    assert R.last_quarter_drop([(3, 4.6)], 4) is None


def test_lr_grid_runs_and_choice(tmp_path, data_args):
    p = runner.plan(_tiny_study(), "cpu", str(tmp_path / "out"), data_args)
    grid = runner.parse_lr_grid("3e-3,1e-3,1e-2")
    assert grid == [1e-3, 3e-3, 1e-2]
    grids = runner.grid_plans(p, grid)
    assert list(grids) == ["gpt"]  # one family (the arch): tuned on its first arm, seed 1
    arm, runs = grids["gpt"]
    assert arm == "a" and [lr for lr, _ in runs] == grid
    for lr, r in runs:
        assert r.args[r.args.index("--lr") + 1] == f"{lr:g}" and r.args[r.args.index("--seed") + 1] == "1"
        assert r.args[r.args.index("--min-lr") + 1] == f"{0.1 * lr:g}" and "lr_grid" in r.run_dir
    for (lr, r), loss in zip(runs, (4.2, 4.0, None)):
        _fake_run(r, loss, {1: 5.0})
    rec = runner.choose_lrs(grids, grid)
    assert rec["families"]["gpt"]["chosen"] == 3e-3 and rec["families"]["gpt"]["losses"]["0.01"] is None
    assert not rec["families"]["gpt"]["at_edge"]
    again = runner.plan(_tiny_study(), "cpu", str(tmp_path / "out"), data_args, lrs={"gpt": 3e-3})
    assert all(a.lr == 3e-3 for a in again.arms if a.runs)
    with pytest.raises(runner.StudyError, match="at least two"):
        runner.parse_lr_grid("1e-3")


@pytest.mark.parametrize("scale", ["cpu", "gpu"])
def test_every_study_matches_its_arms_as_its_paper_did(scale):
    """Each study's matching rules hold under wider.info's counters (equal where it says equal, within the stated
    tolerance), the rules have teeth, and the figures the study definitions quote are the counters'."""
    plans = {name: runner.plan(s, scale, f"/nonexistent/{name}", echo=lambda *_: None)
             for name, s in studies.STUDIES.items() if name != "smoke"}
    for name, p in plans.items():
        for m in runner.check_matches(p):
            assert m.ok, (name, scale, m.match.what, m.values)
            assert len(m.values) >= 2
    g = plans["granularity"]
    dense_active = g.arm("dense").info["params_active"]
    for a in g.arms[1:]:
        if a.runs:  # active = dense + the routing parameters (a router of D x G E per block, E C's LayerNorm)
            i = a.info
            routing = i["extra_moe_layers"] * (i["extra_moe_layer_params"] - a.cfg.model.num_experts
                                               * i["extra_expert_params"])
            assert i["params_active"] == dense_active + routing
            assert routing >= a.cfg.model.num_layers * a.cfg.model.hidden_size * a.cfg.model.num_experts
    w = {a.arm.name: a.info["params_total"] for a in plans["widenet"].arms}
    assert w["albert"] < w["widenet_e4"] < w["widenet_e8"] and w["widenet_e4"] < w["dense"]
    mo = plans["moeut"]
    assert abs(mo.arm("dense").info["params_total"] / mo.arm("moeut").info["params_total"] - 1) < (
        0.0005 if scale == "cpu" else 0.002)
    if scale == "cpu":  # the numbers wider/studies.py quotes
        assert (mo.arm("dense").info["params_total"], mo.arm("moeut").info["params_total"]) == (2967808, 2966784)
        u = {a.arm.name: a.info["params_total"] for a in plans["umoe"].arms}
        assert u["umoe_att"] / u["umoe"] - 1 == pytest.approx(-0.017, abs=0.001)
    # Teeth: a UMoE-Att with twice its experts beside its dense FFN breaks the equal-total rule.
    umoe = studies.STUDIES["umoe"]
    n = plans["umoe"].arm("umoe_att").cfg.model.num_experts
    arms = tuple(dataclasses.replace(a, overrides=(*a.overrides, f"model.num_experts={2 * n}"))
                 if a.name == "umoe_att" else a for a in umoe.scales[scale].arms)
    bad = dataclasses.replace(umoe, scales={scale: dataclasses.replace(umoe.scales[scale], arms=arms)})
    rule = runner.check_matches(runner.plan(bad, scale, "/nonexistent/bad", echo=lambda *_: None))[0]
    assert not rule.ok and rule.deviation > 0.05


def test_command_line_refuses_bad_input_before_anything(tmp_path, capsys):
    out = tmp_path / "out"
    cases = [(["run", "widnet", "--out", str(out)], "did you mean 'widenet'"),
             (["run", "widenet", "--scale", "tpu", "--out", str(out)], "no scale 'tpu'"),
             (["run", "widenet", "--scale", "gpu", "--out", str(out)], "give your corpus after --"),
             (["run", "smoke", "--out", str(out), "--", "--train-iters", "5"], "--train-iters after -- is set by"),
             (["run", "smoke", "--out", str(out), "--jobs", "0"], "--jobs 0"),
             (["run", "smoke", "--out", str(out), "--lr-grid", "1e-3,x"], "--lr-grid"),
             (["run", "smoke", "--out", str(out), "--", "--hidden-size", "63"], "hidden_size 63"),
             (["report", "smoke", "--out", str(out)], "holds no study")]
    for argv, message in cases:
        assert study_main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not out.exists()  # nothing written


# ----------------------------------------------------------------------------------------------------------
# Through the real recipes


def test_smoke_study_end_to_end_resumes_an_interrupted_arm(tmp_path):
    """`python -m wider.study run smoke --jobs 2` after seed 2 was interrupted at step 10 (its checkpoint kept, no
    summary): seed 2 resumes from it, seed 1 trains, the table holds their real losses and the PNGs are drawn; run
    again, everything is skipped."""
    import matplotlib.image

    out = tmp_path / "smoke"
    p = runner.plan(studies.STUDIES["smoke"], "cpu", str(out))
    assert p.steps == 20
    s2 = p.arm("dense").runs[1]
    cut = subprocess.run(s2.command([PY]) + ["--exit-at-iter", "10"], cwd=REPO, env=child_env(),
                         capture_output=True, text=True, timeout=300)
    assert cut.returncode == 0 and not (out / "dense-s2" / "summary.json").exists(), explain(cut)
    assert s2.status() == "partial"
    cmd = [PY, "-m", "wider.study", "run", "smoke", "--jobs", "2", "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, explain(done)
    assert "dense-s2: training (resuming)" in done.stdout
    log = (out / "dense-s2" / "train.log").read_text()
    assert "resumed from" in log and "at step 10" in log
    assert sorted(train_losses(out / "dense-s2")) == list(range(1, 21))  # every step once
    finals = [json.loads((out / f"dense-s{s}" / "summary.json").read_text())["final_valid_loss"] for s in (1, 2)]
    res = json.loads((out / "results.json").read_text())
    arm = res["arms"][0]
    assert arm["status"] == "ok (2 seeds)" and arm["final_losses"] == {"s1": finals[0], "s2": finals[1]}
    assert arm["mean"] == pytest.approx(np.mean(finals)) and arm["std"] == pytest.approx(np.std(finals, ddof=1))
    assert arm["tokens"] == 20 * 8 * 64 and arm["params_total"] > 0 and arm["train_flops_per_token"] > 0
    assert "| dense | dense GPT 2 x 64 |" in (out / "results.md").read_text()
    for name in ("loss_vs_tokens.png", "loss_vs_flops.png"):
        assert matplotlib.image.imread(out / name).std() > 0.01
    again = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, explain(again)
    assert again.stdout.count("skipped") == 2 and ": training" not in again.stdout, again.stdout


def test_a_failed_arm_is_reported_as_failed(tmp_path, data_args):
    """An arm whose recipe fails (a misspelt "moe" key: the recipe's own check, exit 2) is recorded, the other arm
    trains, and the table marks the arm FAILED with the reason."""
    tiny = ("model.num_layers=2", "model.hidden_size=64")
    study = _tiny_study(arms=(studies.Arm("a", "gpt_smoke", tiny, label="fine"),
                              studies.Arm("broken", "gpt_smoke", (*tiny, "moe.capacity_facter=1"), label="typo")),
                        seeds=1, tokens=2 * 8 * 64)
    p = runner.plan(study, "cpu", str(tmp_path / "out"), data_args)
    runner.record_study(p, None)
    failed = runner.train(p.runs(), [PY], jobs=1, out=p.out, echo=lambda *_: None)
    assert list(failed) == ["broken-s1"] and "exited with status 2" in failed["broken-s1"], failed
    assert "capacity_facter" in failed["broken-s1"]  # the log's tail names the cause
    assert runner.read_failures(p.out) == failed
    _, arms = R.write(p, runner.read_failures(p.out), runner.check_matches(p), None)
    by = {x.name: x for x in arms}
    assert by["a"].status() == "ok (1 seeds)" and by["broken"].status().startswith("FAILED: 1 failed of 1 seeds")
    row = next(line for line in (tmp_path / "out" / "results.md").read_text().splitlines()
               if line.startswith("| broken |"))
    assert "FAILED" in row and "exited with status 2" in row
