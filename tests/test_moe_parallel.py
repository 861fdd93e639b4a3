"""Expert parallelism on DeepSpeed's machinery, and MoE training through the real launcher.

- 4 ranks, ep_size 2 (in-process gloo group, no launcher): each expert's gradient equals the full-batch
  gradient, i.e. it was averaged over exactly the ranks holding that expert (ranks {0, 2} hold experts 0-1,
  ranks {1, 3} experts 2-3), never mixed with another expert's.
- Through `deepspeed --num_gpus 2`: ep_size 2 = ep_size 1 = one rank accumulating, ZeRO-2 with activation
  recompute = no ZeRO without recompute (shared WideNet parameters), checkpoint with expert shards and resume.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import TINY, explain, free_port, run_recipe, train_losses

D, F, E, T = 16, 24, 4, 12
WORLD, EP = 4, 2


def _net(ep_size: int):
    from wider import parallel
    from wider.moe.config import MoEConfig
    from wider.moe.layer import MoE
    from wider.moe.settings import MoESettings

    class Net(torch.nn.Module):
        """An MoE (experts: expert parameters; router: not) followed by a dense head."""

        def __init__(self):
            super().__init__()
            settings = MoESettings(capacity_factor=None, ep_size=ep_size, aux_loss_weight=0.01)
            self.moe = MoE(MoEConfig(hidden_size=D, num_experts=E, top_k=2, ffn_size=F, settings=settings, init_std=0.3,
                                     output_std=0.3, groups=parallel.expert_groups(ep_size)))
            self.head = torch.nn.Linear(D, 1)

        def forward(self, x):
            y, aux, _ = self.moe(x)
            return self.head(y).pow(2).mean() + aux

    torch.manual_seed(0)
    return Net()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(WORLD, T, D, generator=g)


def _grad_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    import deepspeed
    from deepspeed.utils import groups

    import patches
    from wider import parallel
    from wider.optim import make_optimizer

    torch.set_num_threads(1)
    patches.apply_defaults()
    parallel.init_distributed(1)
    net = _net(EP)

    class _T:  # the optimizer settings make_optimizer reads
        weight_decay, lr, adam_beta1, adam_beta2, adam_eps = 0.0, 1e-3, 0.9, 0.95, 1e-8

    engine, _, _, _ = deepspeed.initialize(
        model=net, optimizer=make_optimizer(net, _T), mpu=parallel.MegatronMPU(), dist_init_required=False,
        config={"train_batch_size": WORLD, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                "zero_optimization": {"stage": 0}, "steps_per_print": 10**9})
    loss = engine(_data()[rank])
    engine.backward(loss)  # ZeRO-0: gradients are all-reduced here, experts over their own group
    experts = net.moe.deepspeed_moe.experts
    torch.save({"has_moe_layers": engine.has_moe_layers,
                "ep_ranks": list(groups._get_expert_parallel_group_ranks("ep_size_2")),
                "edp_ranks": list(groups._get_expert_data_parallel_group_ranks("ep_size_2")),
                "w1": experts.w1_LDF.grad.clone(), "w2": experts.w2_LFD.grad.clone(),
                "router": net.moe.deepspeed_moe.gate.wg.weight.grad.clone(),
                "head": net.head.weight.grad.clone()}, os.path.join(out_dir, f"rank{rank}.pt"))
    parallel.destroy()


def test_expert_gradients_are_averaged_over_their_holders_only(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_grad_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)

    # Reference: one process, all experts, the mean of the four ranks' losses.
    ref = _net(1)
    x = _data()
    (sum(ref(x[r]) for r in range(WORLD)) / WORLD).backward()
    L = E // EP
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["has_moe_layers"]  # DeepSpeed recognised wider's MoE as its own
        ep_rank = rank % EP
        assert got["ep_ranks"] == [rank - ep_rank + i for i in range(EP)]
        assert got["edp_ranks"] == list(range(ep_rank, WORLD, EP))
        experts = slice(ep_rank * L, (ep_rank + 1) * L)
        torch.testing.assert_close(got["w1"], ref.moe.deepspeed_moe.experts.w1_LDF.grad[experts], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got["w2"], ref.moe.deepspeed_moe.experts.w2_LFD.grad[experts], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got["router"], ref.moe.deepspeed_moe.gate.wg.weight.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got["head"], ref.head.weight.grad, rtol=1e-5, atol=1e-7)
    # The check has teeth: experts 0-1 and 2-3 have different gradients, so averaging over all four ranks
    # (what DeepSpeed does to a module it does not recognise) would not match.
    g = ref.moe.deepspeed_moe.experts.w1_LDF.grad
    assert (g[:L] - g[L:]).abs().max() > 1e-4


# --- through the launcher ----------------------------------------------------------------------------------

STEPS = 6
MOE = ["--preset", "widenet_smoke", *TINY, "--train-iters", str(STEPS), "--num-layers", "3",
       "--router-noise", "none",  # noise draws differ between rank layouts; everything else must not
       "--moe-ffn-hidden-size", "96"]


def _run(data_args, run_dir, *extra, ranks=2, env=None):
    p = run_recipe([*MOE, *data_args, "--run-dir", str(run_dir), *extra], ranks=ranks, env=env,
                   recipe="recipes/pretrain_widenet.py")
    assert p.returncode == 0, explain(p)
    return train_losses(run_dir)


@pytest.fixture(scope="module")
def reference(data_args, tmp_path_factory):
    """Two ranks, ep_size 1, no ZeRO, no recompute."""
    d = tmp_path_factory.mktemp("moe_ref") / "run"
    return _run(data_args, d, "--ds-set", "zero_optimization.stage=0"), d


def _close(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for s in a:
        assert abs(a[s] - b[s]) <= tol * max(1.0, abs(b[s])), (s, a[s], b[s])


def test_ep2_equals_ep1_and_resumes_with_expert_shards(data_args, reference, tmp_path):
    """ep_size 2 (experts split over the two ranks, ZeRO-1) gives the reference losses; interrupted at
    step 3 and resumed from a checkpoint with one file per expert, it continues identically."""
    full = _run(data_args, tmp_path / "ep2", "--ds-set", "moe.ep_size=2")
    _close(full, reference[0])
    # ep_size 2 took effect: the engine's MoE layers were built at ep_size 2 (each rank holding 2 of the 4 experts:
    # complete.json records the layout of the running engine), the reference at ep_size 1.
    def layout(run_dir):
        return json.loads((run_dir / "checkpoints" / f"step_{STEPS:08d}" / "complete.json").read_text())["ep_size"]

    assert (layout(tmp_path / "ep2"), layout(reference[1])) == (2, 1)
    run = tmp_path / "ep2_resume"
    _run(data_args, run, "--ds-set", "moe.ep_size=2", "--exit-at-iter", "3")
    ckpt = run / "checkpoints" / "step_00000003"
    assert sorted(p.name for p in ckpt.glob("layer_0_expert_*_mp_rank_00_model_states.pt")) == [
        f"layer_0_expert_{i}_mp_rank_00_model_states.pt" for i in range(4)]
    expert0 = torch.load(ckpt / "layer_0_expert_0_mp_rank_00_model_states.pt", weights_only=False)
    assert any(k.endswith("deepspeed_experts.0.w1") for k in expert0)
    resumed = _run(data_args, run, "--ds-set", "moe.ep_size=2", "--resume", "auto")
    _close(resumed, full, tol=1e-7)


def test_one_rank_accumulating_equals_two_ranks(data_args, reference, tmp_path):
    _close(_run(data_args, tmp_path / "one", ranks=1), reference[0])


@pytest.mark.parametrize("recompute", ["full", "none"])
def test_zero2_equals_no_zero_on_shared_parameters(data_args, reference, tmp_path, recompute):
    """WideNet's shared attention and MoE get one gradient contribution per block; under ZeRO-2, with and
    without (non-reentrant) activation recompute, the losses and gradient norms match the plain run."""
    run = tmp_path / "z2"
    got = _run(data_args, run, "--ds-config", "ds_configs/moe_cpu_zero2.json", "--recompute", recompute)
    _close(got, reference[0])
    import json

    def norms(d):
        with open(d / "metrics.jsonl") as f:
            return [r["grad_norm"] for r in map(json.loads, f) if r["kind"] == "train"]

    assert len(norms(run)) == STEPS
    for a, b in zip(norms(run), norms(reference[1])):
        assert abs(a - b) <= 1e-5 * max(1.0, b), (a, b)


@pytest.mark.parametrize("preset", ["switch_smoke", "glam_smoke"])
def test_switch_and_glam_presets_train(data_args, tmp_path, preset):
    """The gpt_moe recipe trains both baselines (one rank): MoE in blocks 2 and 4, the loss falls, and the
    console shows the MoE health columns."""
    args = ["--preset", preset, *TINY, "--num-layers", "4", "--train-iters", "8", *data_args, "--run-dir",
            str(tmp_path / "run")]
    p = run_recipe(args, ranks=1, recipe="recipes/pretrain_gpt_moe.py")
    assert p.returncode == 0, explain(p)
    losses = train_losses(tmp_path / "run")
    assert len(losses) == 8 and losses[8] < losses[1] - 0.3, losses
    assert "| drop " in p.stdout and f"top-{1 if preset == 'switch_smoke' else 2}" in p.stdout
    import json

    with open(tmp_path / "run" / "metrics.jsonl") as f:
        moe = [r for r in map(json.loads, f) if r["kind"] == "moe_valid"][-1]
    assert [k for k in moe if k.startswith("layer")] == ["layer02", "layer04"]
