"""The per-rank memory plan (wider/memory_plan.py, `python -m wider.info --plan`): arithmetic, layouts, and the
estimate against the measured peak memory of real CPU training runs.

What the measured test compares, and why this way: two short WideNet runs (ZeRO-1, fp32, one rank; one with
recompute, one without) go through the real recipe (`wider.recipe.main`: DeepSpeed engine, megatron data,
the training loop) in child processes. A small wrapper in the child reads the resident set size (VmRSS) right
before the model is built, i.e. after the Python / torch / DeepSpeed / megatron imports, the process group and
the tokenizer, which the plan does not count, and resets the kernel's high-water mark there (/proc/self/clear_refs
"5"); at the first checkpoint save, after the last training step, it reads the high-water mark (VmHWM) and exits.
measured = VmHWM - baseline: everything the model, DeepSpeed's optimizer and the training steps added, including
the optimizer step's temporaries. The child runs with glibc's mmap threshold fixed at 64 KiB
(MALLOC_MMAP_THRESHOLD_): otherwise glibc raises it dynamically up to 32 MiB, keeps freed tensors of up to that
size in its heap, and the RSS peak then measures the allocator's retention (about +50% in this configuration)
rather than the live tensors the plan estimates. Two steps suffice: the first creates Adam's states (the
optimizer-step peak), the second runs forward and backward with them present (the backward peak).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import PY, REPO, child_env, explain

GiB = 2**30

# The measured model: big enough that model states (22M params: 16 experts x 512 x 1024 shared by 6 blocks)
# and activations (6 blocks x 1024 tokens, dropless so that every routed row is computed) dwarf what the
# baseline leaves uncounted, small enough for ~10 s of training on one core.
MEASURED = ["--preset", "widenet_smoke", "--num-layers", "6", "--hidden-size", "512", "--num-attention-heads", "8",
            "--num-experts", "16", "--moe-top-k", "2", "--moe-ffn-hidden-size", "1024", "--seq-length", "256",
            "--micro-batch-size", "4", "--global-batch-size", "4", "--train-iters", "2", "--warmup-iters", "1",
            "--log-interval", "1", "--eval-interval", "0", "--ds-set", "moe.capacity_factor=null"]

# Runs in the child: the real recipe, with the two memory readings described in the module docstring.
CHILD = r"""
import dataclasses, json, os, sys
arch, out, argv = sys.argv[1], sys.argv[2], sys.argv[3:]

def status():
    with open("/proc/self/status") as f:
        pairs = (line.split(":", 1) for line in f)
        return {k: int(v.split()[0]) * 1024 for k, v in pairs if k in ("VmRSS", "VmHWM", "RssFile")}

from wider.recipe import main, quiet_libraries
quiet_libraries()
import wider.models
from wider.checkpoint import store as checkpoint

record = {}
entry = wider.models.ARCHITECTURES[arch]

def build(*args, **kwargs):
    now = status()
    record["baseline"], record["file_baseline"] = now["VmRSS"], now["RssFile"]
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS, so import-time transients do not count
        record["hwm_reset"] = status()["VmHWM"] <= record["baseline"] + 2**20
    except OSError:
        record["hwm_reset"] = False
    return entry.build(*args, **kwargs)

def save(*args, **kwargs):
    now = status()
    record["peak"], record["file_peak"] = now["VmHWM"], now["RssFile"]
    with open(out, "w") as f:
        json.dump(record, f)
    os._exit(0)

wider.models.ARCHITECTURES[arch] = dataclasses.replace(entry, build=build)
checkpoint.save = save
sys.exit(main(arch, "", argv))
"""


def _cfg(argv, default_preset="gpt_smoke"):
    from wider import cli

    return cli.parse(argv, default_preset=default_preset)


def _plan(argv, world_size=1, vocab=1000):
    from wider import memory_plan as plan

    return plan.build(_cfg(argv), world_size, vocab)


# --- arithmetic of the model states -------------------------------------------------------------------------

DENSE = ["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "4", "--micro-batch-size", "2",
         "--global-batch-size", "8"]


def test_zero1_divides_optimizer_states_by_dp_and_zero2_the_gradients():
    p0 = _plan([*DENSE, "--ds-set", "zero_optimization.stage=0"], world_size=4)
    p1 = _plan([*DENSE, "--ds-set", "zero_optimization.stage=1"], world_size=4)
    p2 = _plan([*DENSE, "--ds-set", "zero_optimization.stage=2"], world_size=4)
    assert (p0["zero_stage"], p1["zero_stage"], p2["zero_stage"], p1["data_parallel"]) == (0, 1, 2, 4)
    n = p0["params_local"]
    s0, s1, s2 = (p["model_states"][f"zero{i}"] for i, p in enumerate((p0, p1, p2)))
    assert s0["adam_states"] == 8 * n and s0["gradients"] == 4 * n and s0["parameters"] == 4 * n
    assert s1["adam_states"] == 8 * n / 4 and s1["gradients"] == s0["gradients"]
    assert s2["gradients"] == 4 * n / 4 and s2["adam_states"] == s1["adam_states"]
    # fp32 without ZeRO steps the model's own weights; with ZeRO DeepSpeed keeps a flat fp32 copy of the partition.
    assert s0["master_weights"] == 0 and s1["master_weights"] == 4 * n / 4
    # The table of one plan already holds every stage, and the run's own stage decides its total.
    assert p1["model_states"] == p0["model_states"]
    assert p1["total"] == p1["totals"]["zero1"]["recompute_none"] != p0["total"]


def test_bf16_keeps_fp32_master_weights_at_every_stage():
    p = _plan([*DENSE, "--ds-config", "ds_configs/zero1_bf16.json"], world_size=4)
    n, st = p["params_local"], p["model_states"]
    assert p["dtype"] == "bf16" and st["zero1"]["parameters"] == 2 * n and st["zero1"]["gradients"] == 2 * n
    assert st["zero0"]["master_weights"] == 4 * n and st["zero1"]["master_weights"] == 4 * n / 4


def test_cuda_gradient_bucket_and_chunked_expert_groups():
    """bf16 (a CUDA run): ZeRO >= 1 holds DeepSpeed's whole reduce bucket in the backward, twice with
    overlap_comm; fp32 (a CPU run) only the gradients written. Expert tensors are stepped in groups of at
    most MOE_GROUP_MAX elements, so the step's temporaries follow the largest group, not all experts."""
    from wider import memory_plan as plan

    bf16 = _plan([*DENSE, "--ds-config", "ds_configs/zero1_bf16.json"], world_size=4)
    assert bf16["device"] == "cuda" and bf16["reduce_bucket_bytes"] == 2 * 500_000_000
    g = bf16["model_states"]
    assert bf16["backward_gradients"]["zero0"] == g["zero0"]["gradients"]
    assert bf16["backward_gradients"]["zero1"] == max(g["zero1"]["gradients"], 10**9)
    overlap = _plan([*DENSE, "--ds-config", "ds_configs/zero2_bf16.json"], world_size=4)
    assert overlap["backward_gradients"]["zero2"] == 2 * 10**9
    cpu = _plan(DENSE, world_size=4)
    assert cpu["device"] == "cpu" and cpu["backward_gradients"]["zero1"] == cpu["model_states"]["zero1"]["gradients"]

    big = ["--arch", "gpt_moe", "--num-layers", "6", "--hidden-size", "1024", "--num-attention-heads", "16",
           "--num-experts", "16", "--moe-top-k", "1", "--moe-ffn-hidden-size", "4096", "--micro-batch-size", "1",
           "--global-batch-size", "1"]
    cfg = _cfg(big)
    params = plan.local_params(cfg, 1000, 1, 1)
    groups = params.optimizer_groups()
    experts = [n for n, is_expert in groups if is_expert]
    per_layer = 2 * 16 * 1024 * 4096  # w1 and w2 of one MoE layer: 134M, so one layer per group
    assert experts == [per_layer] * 6 and max(experts) <= plan.MOE_GROUP_MAX
    assert sum(n for n, _ in groups) == params.total
    lay = plan.resolve_layout(cfg, 1)[0]
    # The first expert group is stepped while the other five still hold their (fp32) gradients.
    assert plan.optimizer_step_bytes(params, lay, 1) >= 4 * 5 * per_layer + 12 * per_layer


def test_tensor_parallel_splits_dense_parameters_and_logits():
    p1 = _plan(DENSE, world_size=4)
    p2 = _plan([*DENSE, "--tensor-parallel", "2"], world_size=4)
    assert (p2["tensor_parallel"], p2["data_parallel"]) == (2, 2)
    # Norms and row-parallel biases stay whole: a little more than half per rank.
    assert p1["params_local"] / 2 < p2["params_local"] < 0.52 * p1["params_local"]
    assert p2["logits_loss"] == p1["logits_loss"] // 2
    assert p2["activations"]["recompute_none"]["total"] < p1["activations"]["recompute_none"]["total"]


MOE = ["--arch", "gpt_moe", "--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "4",
       "--num-experts", "8", "--moe-layer-freq", "2", "--micro-batch-size", "2", "--global-batch-size", "8"]


def test_expert_parameters_divide_by_ep_and_their_states_by_dp_over_ep():
    from wider.models.gpt_moe import expert_params

    cfg = _cfg(MOE)
    one_expert = expert_params(cfg.model)
    plans = {ep: _plan([*MOE, "--ds-set", f"moe.ep_size={ep}"], world_size=4) for ep in (1, 2, 4)}
    dense = plans[1]["params_local_dense"]
    for ep, p in plans.items():
        assert p["expert_parallel"] == ep and p["expert_data_parallel"] == 4 // ep
        assert p["params_local_dense"] == dense  # replicated over data parallelism whatever ep is
        assert p["params_local_experts"] == 2 * (8 // ep) * one_expert  # 2 MoE blocks, E / ep local experts
        # ZeRO-1: dense states split over dp = 4 ranks, expert states over the dp / ep ranks holding the same experts.
        assert p["model_states"]["zero1"]["adam_states"] == 8 * (dense / 4 + p["params_local_experts"] / (4 // ep))
    assert plans[4]["params_local_experts"] * 4 == plans[1]["params_local_experts"]
    assert plans[1]["all_to_all"] == 0 < plans[2]["all_to_all"]


def test_capacity_bounds_the_rows_sent_with_expert_parallelism():
    from wider.moe.dispatch import capacity

    T = 2 * 128
    tight = _plan([*MOE, "--ds-set", "moe.ep_size=2", "moe.capacity_factor=0.5"], world_size=4)
    dropless = _plan([*MOE, "--ds-set", "moe.ep_size=2", "moe.capacity_factor=null"], world_size=4)
    assert tight["moe_rows_per_call"] == 8 * capacity(T, 2, 8, 0.5, 4) < dropless["moe_rows_per_call"] == 2 * T
    assert tight["all_to_all"] < dropless["all_to_all"]


def test_recompute_keeps_block_inputs_only():
    from wider import memory_plan as plan

    full = _plan([*MOE, "--recompute", "full"])
    none = _plan(MOE)
    assert full["recompute"] == "full"
    a_full, a_none = full["activations"]["recompute_full"], full["activations"]["recompute_none"]
    assert a_none == none["activations"]["recompute_none"]
    T, h = 2 * 128, 256
    assert a_full["block_inputs"] == 4 * 4 * T * h  # layers x fp32 x T x h
    assert a_full["one_block_recomputed"] == max(v["total"] for v in a_none["per_block"].values())
    assert a_full["total"] < a_none["total"] / 2
    # The backward-start peak falls; the total may not, when the optimizer step is the peak (it is here: a
    # small batch and 8 experts' worth of AdamW temporaries).
    assert full["peak_backward"]["zero1"]["recompute_full"] < none["peak_backward"]["zero1"]["recompute_none"]
    assert full["total"] == max(full["peak_backward"]["zero1"]["recompute_full"], full["peak_optimizer_step"]["zero1"])
    assert full["total"] <= none["total"]
    assert full["total"] == full["totals"]["zero1"]["recompute_full"]
    assert set(a_none["per_block"]) == {"moe", "dense"} and a_none["moe_blocks"] == 2
    text = plan.format_plan(full, _cfg([*MOE, "--recompute", "full"]))
    assert "activations, recompute full*" in text and "total (recompute full)" in text


# --- against built models ------------------------------------------------------------------------------------


def _saved_bytes(model, T_shape, V):
    """Bytes of the distinct storages autograd keeps for the backward of one forward (parameters excluded)."""
    import torch

    from wider import memory_plan as plan

    b, s = T_shape
    tokens, labels = torch.randint(0, V, (b, s)), torch.randint(0, V, (b, s))
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    with plan.kept_for_backward(model.parameters()) as kept:
        model(tokens, pos, None, labels=labels)
    return sum(kept.values())


BUILT = ["--num-layers", "3", "--hidden-size", "192", "--num-attention-heads", "4", "--ffn-hidden-size", "384",
         "--seq-length", "96", "--micro-batch-size", "2", "--global-batch-size", "2"]


@pytest.mark.parametrize("arch,extra", [("gpt", []), ("widenet", ["--num-experts", "8", "--moe-top-k", "2"]),
                                        ("gpt_moe", ["--num-experts", "8", "--moe-top-k", "1", "--moe-layer-freq", "2",
                                                     "--activation", "swiglu"])])
@pytest.mark.parametrize("recompute", ["none", "full"])
def test_activation_formula_matches_saved_tensors_of_built_model(single_rank, arch, extra, recompute):
    """The plan's activations + logits against what autograd really keeps after one forward. With recompute
    the forward keeps only the checkpointed blocks' inputs (the recomputed block's working set exists later,
    in the backward), so that case is compared with the kept part."""
    import torch

    from wider import memory_plan as plan
    from wider.models import ARCHITECTURES
    from wider.moe.config import MoERuntime
    from wider.moe.settings import MoESettings

    argv = ["--arch", arch, *BUILT, *extra, "--recompute", recompute,
            "--ds-set", "moe.capacity_factor=null"]
    cfg = _cfg(argv)
    p = plan.build(cfg, 1, 1000)
    torch.manual_seed(0)
    model = ARCHITECTURES[arch].build(cfg, 1000, False, MoERuntime(MoESettings(capacity_factor=None)) if extra else None)
    model.train()
    saved = _saved_bytes(model, (2, 96), 1000)
    acts = p["activations"][f"recompute_{recompute}"]
    estimate = acts["total"] - acts.get("one_block_recomputed", 0) + p["logits_loss"]
    assert abs(estimate - saved) <= 0.05 * saved, (estimate, saved)


def test_widenet_shared_layers_counted_once_as_built(single_rank):
    from wider import memory_plan as plan
    from wider.models import ARCHITECTURES
    from wider.moe.config import MoERuntime
    from wider.moe.settings import MoESettings

    argv = ["--arch", "widenet", *BUILT, "--num-experts", "4", "--moe-top-k", "2"]
    cfg = _cfg(argv)
    built = ARCHITECTURES["widenet"].build(cfg, 1000, False, MoERuntime(MoESettings()))
    n_built = sum(p.numel() for p in built.parameters())  # parameters() yields a shared module once
    p = plan.build(cfg, 1, 1000)
    assert p["params_local"] == p["params_unique"] == n_built
    from wider.models.gpt_moe import expert_params

    assert p["params_local_experts"] == 4 * expert_params(cfg.model)  # one MoE, not one per block
    assert p["model_states"]["zero0"]["parameters"] == 4 * n_built
    # The same shapes without sharing (gpt_moe, MoE in every block) hold 3 MoE layers' experts.
    unshared = plan.build(_cfg(["--arch", "gpt_moe", *BUILT, "--num-experts", "4", "--moe-top-k", "2"]), 1, 1000)
    assert unshared["params_local_experts"] == 3 * p["params_local_experts"]
    # Activations are per call: the shared layer runs in every block, so they do not shrink with sharing.
    assert abs(p["activations"]["recompute_none"]["total"] - unshared["activations"]["recompute_none"]["total"]) \
        <= 0.01 * p["activations"]["recompute_none"]["total"]


# --- command line ---------------------------------------------------------------------------------------------


def _info(argv, capsys):
    from wider.info import main

    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_info_plan_prints_table_and_json_holds_it(capsys):
    argv = ["--preset", "widenet_b", "--plan", "--world-size", "8", "--ds-set", "moe.ep_size=4"]
    rc, out, err = _info(argv, capsys)
    assert rc == 0, err
    assert "world 8 = tp 1 x dp 8 | ep 4 (expert-data-parallel 2)" in out
    assert "bf16 weights and activations" in out and "ZeRO stage 1" in out
    for label in ("parameters (bf16)", "gradients (bf16)", "fp32 master weights", "Adam m + v (fp32)",
                  "activations, recompute none*", "activations, recompute full", "logits + loss (fp32)",
                  "all-to-all buffers (EP)", "total (recompute none)", "ZeRO-1*"):
        assert label in out, label
    rc, out, err = _info([*argv, "--json"], capsys)
    assert rc == 0, err
    info = json.loads(out)
    p = info["plan"]
    assert (p["world_size"], p["expert_parallel"], p["zero_stage"], p["dtype"]) == (8, 4, 1, "bf16")
    assert p["local_experts"] == 1 and p["params_unique"] == info["params_total"]
    assert p["total"] == p["totals"]["zero1"]["recompute_none"] > p["model_states"]["zero1"]["total"]
    # Without --plan the JSON is unchanged.
    rc, out, _ = _info(["--preset", "widenet_b", "--json"], capsys)
    assert rc == 0 and "plan" not in json.loads(out)


@pytest.mark.parametrize("argv,message", [
    (["--preset", "gpt_smoke", "--tensor-parallel", "2", "--world-size", "3"], "does not divide the world size 3"),
    (["--preset", "widenet_b", "--world-size", "8", "--ds-set", "moe.ep_size=3"], "num_experts 4 is not divisible"),
    (["--preset", "widenet_b", "--world-size", "6", "--global-batch-size", "48", "--ds-set", "moe.ep_size=4"],
     "does not divide the data-parallel"),
    (["--preset", "widenet_b", "--world-size", "0"], "--world-size"),
    (["--preset", "gpt_smoke", "--world-size", "2"], "add --plan"),
])
def test_impossible_layouts_end_with_the_runs_own_error(capsys, argv, message):
    plan_flag = [] if "add --plan" in message else ["--plan"]
    rc, out, err = _info([*argv, *plan_flag], capsys)
    assert rc == 2 and message in err and "Traceback" not in err, (rc, err)


# --- against a real training run ------------------------------------------------------------------------------


def _launch(tmp: Path, name: str, argv: list, data_args: list) -> tuple[subprocess.Popen, Path]:
    out = tmp / f"{name}.json"
    args = [*MEASURED, *data_args, *argv, "--run-dir", str(tmp / name)]
    env = child_env(MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.Popen([PY, "-c", CHILD, "widenet", str(out), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, out


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")
def test_estimate_within_7_percent_of_measured_training_peak(data_args, tmp_path):
    from wider import memory_plan as plan

    # Both runs at once: each is one thread, and a process's memory does not depend on its neighbour.
    runs = {name: _launch(tmp_path, name, extra, data_args) for name, extra in
            (("none", []), ("full", ["--recompute", "full"]))}
    measured, estimate = {}, {}
    for name, (proc, out) in runs.items():
        stdout, stderr = proc.communicate(timeout=300)
        done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        assert proc.returncode == 0 and out.exists(), explain(done)
        rec = json.loads(out.read_text())
        if not rec["hwm_reset"]:
            pytest.skip("the kernel did not reset VmHWM through /proc/self/clear_refs")
        # The plan counts tensors. VmHWM also counts the shared libraries' code pages that the first
        # backward faults in (file-backed; 25-60 MB, more on a cold page cache), so their growth is taken out.
        measured[name] = rec["peak"] - rec["baseline"] - (rec["file_peak"] - rec["file_baseline"])
        cfg = _cfg([*MEASURED, *data_args] + (["--recompute", "full"] if name == "full" else []), "widenet_smoke")
        p = plan.build(cfg, 1)
        assert (p["zero_stage"], p["dtype"], p["recompute"]) == (1, "fp32", name)
        estimate[name] = p["total"]
    report = {k: f"estimate {estimate[k] / GiB:.3f} GiB, measured {measured[k] / GiB:.3f} GiB" for k in measured}
    print(report)  # shown with pytest -s
    for name in measured:
        assert abs(estimate[name] - measured[name]) <= 0.07 * measured[name], report
    # The behaviour the plan predicts: recompute lowers the real peak too.
    assert measured["full"] < measured["none"] and estimate["full"] < estimate["none"], report
