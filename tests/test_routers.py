"""Expert Choice routing, auxiliary-loss-free balancing and shared experts, against float64 loop references written
from the papers' definitions (Zhou et al. 2022 as llm-random trains it; DeepSeek-V3 section 2.1.2; DeepSeekMoE),
expert parallelism (ep 2 = ep 1 on two in-process CPU ranks) and, through the real launcher, a run with a selection
bias and a shared expert that is interrupted at ep_size 2 and resumed at ep_size 1 with its biases intact."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, explain, free_port, run_recipe, train_losses

D, FF, E, K = 16, 24, 8, 2


def _layer(selection="token_choice", ep_size=1, groups=None, **kw):
    from wider.moe.config import MoEConfig
    from wider.moe.layer import MoE
    from wider.moe.settings import MoESettings

    settings = {"capacity_factor": 1.0, "ec_group": "position", "aux_loss_weight": 0.0, "ep_size": ep_size}
    settings.update(kw.pop("settings", {}))
    cfg = dict(hidden_size=D, num_experts=E, top_k=K, ffn_size=FF, selection=selection, init_std=0.3, output_std=0.3,
               settings=MoESettings(**settings), **kw)
    if groups is not None:
        cfg["groups"] = groups
    torch.manual_seed(0)
    return MoE(MoEConfig(**cfg))


def _weights64(m):
    """The layer's router, experts and output norm in float64 (every expert: one rank)."""
    core = m.deepspeed_moe
    w = {"router": core.gate.wg.weight.detach().double(), "w1": core.experts.w1_LDF.detach().double(),
         "w2": core.experts.w2_LFD.detach().double()}
    if hasattr(core, "output_norm"):
        w["ln_w"], w["ln_b"] = core.output_norm.weight.detach().double(), core.output_norm.bias.detach().double()
    return w


def _expert64(w, e, x_D):
    return F.gelu(x_D @ w["w1"][e]) @ w["w2"][e]


def expert_choice_reference(x_TD, w, group, factor=1.0, softmax_over="experts"):
    """Expert Choice by loops, in float64: for each group of `group` consecutive tokens (the last may be smaller),
    scores = softmax of the logits over each token's experts (or over the group's tokens for each expert); expert e
    takes the round(factor x n x k / E) tokens (at least 1) with the highest score, the earlier token first among
    equals; out[t] = LayerNorm(sum over the experts that took t of score x FFN_e(x_t)). Returns (output, the set of
    (token, expert) pairs)."""
    x = x_TD.double()
    T = x.shape[0]
    logits = x @ w["router"].T
    out = torch.zeros_like(x)
    chosen = set()
    for start in range(0, T, group):
        idx = list(range(start, min(T, start + group)))
        n = len(idx)
        lg = logits[idx]
        scores = torch.softmax(lg, dim=0 if softmax_over == "tokens" else 1)
        C = min(n, max(1, round(factor * n * K / E)))
        for e in range(E):
            ranked = sorted(range(n), key=lambda i: (-float(scores[i, e]), i))[:C]
            for i in ranked:
                t = idx[i]
                chosen.add((t, e))
                out[t] += scores[i, e] * _expert64(w, e, x[t])
    out = F.layer_norm(out, (D,), w["ln_w"], w["ln_b"], 1e-5)
    return out, chosen


def _ec_pairs(x_TD, m, group):
    from wider.moe.router import route_expert_choice

    r = route_expert_choice(x_TD, m.deepspeed_moe.gate.wg.weight, K, 1.0, group, m.config.ec_softmax_over)
    t, s = torch.nonzero(r.live_TK, as_tuple=True)
    return {(int(a), int(r.expert_ids_TK[a, b])) for a, b in zip(t, s)}


@pytest.mark.parametrize("softmax_over", ["experts", "tokens"])
def test_expert_choice_matches_the_loop_reference_with_ties_and_a_short_group(softmax_over):
    """T = 14 tokens in groups of 4 (the last group has 2): the same (token, expert) choices as the loop, ties (three
    identical tokens) going to the earlier token, outputs and gradients equal to float64 autograd through the
    reference."""
    m = _layer("expert_choice", ec_softmax_over=softmax_over, settings={"ec_group": 4})
    g = torch.Generator().manual_seed(3)
    x = torch.randn(14, D, generator=g)
    x[5] = x[4]
    x[6] = x[4]  # a three-way tie inside the second group: every expert scores them equally
    x = x.requires_grad_(True)
    y, aux, _ = m(x)
    w = _weights64(m)
    ref, chosen = expert_choice_reference(x.detach(), w, 4, softmax_over=softmax_over)
    assert _ec_pairs(x.detach(), m, 4) == chosen
    # the ties went to the earlier token: an expert that took one of tokens 4-6 took 4 first
    for e in range(E):
        took = sorted(t for t, ee in chosen if ee == e and t in (4, 5, 6))
        assert took == [4, 5, 6][:len(took)], (e, took)
    # capacity: round(4 x 2 / 8) = 1 per expert per full group; the 2-token group: max(1, round(0.5)) = 1
    assert len(chosen) == E * 4
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    assert float(aux) == 0.0  # balanced by construction: no balance loss

    # Gradients: the reference with the same choices, by autograd in float64.
    probe = torch.randn(14, D, generator=g)
    (y * probe).sum().backward()
    xr = x.detach().double().requires_grad_(True)
    wr = {k: v.clone().requires_grad_(True) for k, v in w.items()}
    out = torch.zeros(14, D, dtype=torch.float64)
    logits = xr @ wr["router"].T
    for start in range(0, 14, 4):
        idx = list(range(start, min(14, start + 4)))
        sc = torch.softmax(logits[idx], dim=0 if softmax_over == "tokens" else 1)
        rows = []
        for i, t in enumerate(idx):
            acc = torch.zeros(D, dtype=torch.float64)
            for e in range(E):
                if (t, e) in chosen:
                    acc = acc + sc[i, e] * _expert64(wr, e, xr[t])
            rows.append(acc)
        out = out.index_put((torch.tensor(idx),), torch.stack(rows))
    out = F.layer_norm(out, (D,), wr["ln_w"], wr["ln_b"], 1e-5)
    (out * probe.double()).sum().backward()
    core = m.deepspeed_moe
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(core.gate.wg.weight.grad.double(), wr["router"].grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(core.experts.w1_LDF.grad.double(), wr["w1"].grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(core.output_norm.weight.grad.double(), wr["ln_w"].grad, rtol=1e-4, atol=1e-5)


def test_expert_choice_in_bf16_routes_as_fp32_and_matches_within_1e_2():
    """The router runs in fp32 whatever the layer's dtype, so a bf16 layer makes the fp32 layer's choices on the
    same (bf16-representable) input; its output and input gradient are within 1e-2 of the fp32 layer's, as relative
    error in norm (elementwise, a few near-zero entries differ by more, as bf16 rounding makes them)."""
    m32 = _layer("expert_choice", settings={"ec_group": 8})
    m16 = _layer("expert_choice", settings={"ec_group": 8}).to(torch.bfloat16)
    m16.deepspeed_moe.gate.wg.weight.data.copy_(m32.deepspeed_moe.gate.wg.weight.data.bfloat16())
    m32.load_state_dict({k: v.float() for k, v in m16.state_dict().items()})
    g = torch.Generator().manual_seed(7)
    x16 = torch.randn(32, D, generator=g).bfloat16().requires_grad_(True)
    x32 = x16.detach().float().requires_grad_(True)
    assert _ec_pairs(x16.detach(), m16, 8) == _ec_pairs(x32.detach(), m32, 8)
    y16, y32 = m16(x16)[0], m32(x32)[0]
    assert y16.dtype == torch.bfloat16
    def rel(a, b):
        return float((a.float() - b).norm() / b.norm())

    assert rel(y16, y32) <= 1e-2, rel(y16, y32)
    probe = torch.randn(32, D, generator=g)
    (y16.float() * probe).sum().backward()
    (y32 * probe).sum().backward()
    assert rel(x16.grad, x32.grad) <= 1e-2, rel(x16.grad, x32.grad)


def test_per_position_groups_use_no_future_token_and_whole_batch_groups_do():
    """[s, b] = [6, 4] tokens. With 'position' groups, changing the tokens of positions 3-5 leaves positions 0-2
    unchanged; with 'batch' groups (Zhou et al.), it changes them. Evaluation: 'token_choice' is each token's top-k
    of the same softmax with those weights (dropless), 'train' repeats the training routing, and the default
    evaluates with per-position groups."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, D, generator=g)
    x2 = x.clone()
    x2[3:] = torch.randn(3, 4, D, generator=g)
    pos = _layer("expert_choice", settings={"ec_group": "position"})
    a, b = pos(x)[0], pos(x2)[0]
    torch.testing.assert_close(a[:3], b[:3], rtol=0, atol=1e-6)  # summation order only
    whole = _layer("expert_choice", settings={"ec_group": "batch"})
    a, b = whole(x)[0], whole(x2)[0]
    assert (a[:3] - b[:3]).abs().max() > 1e-3

    # Evaluation routings of the whole-batch model.
    train_out = whole(x)[0]
    whole.eval()
    per_position = whole(x)[0]
    pos.eval()
    torch.testing.assert_close(per_position, pos(x)[0])  # same weights (seed), same routing: per position
    whole.config = whole.config.with_eval_routing("train")
    torch.testing.assert_close(whole(x)[0], train_out)
    whole.config = whole.config.with_eval_routing("token_choice")
    tc = whole(x)[0]
    w = _weights64(whole)
    x64 = x.reshape(-1, D).double()
    probs = torch.softmax(x64 @ w["router"].T, dim=-1)
    top = torch.topk(probs, K, dim=-1)
    ref = torch.stack([sum(top.values[t, j] * _expert64(w, int(top.indices[t, j]), x64[t]) for j in range(K))
                       for t in range(x64.shape[0])])
    ref = F.layer_norm(ref, (D,), w["ln_w"], w["ln_b"], 1e-5)
    torch.testing.assert_close(tc.reshape(-1, D).double(), ref, rtol=1e-5, atol=1e-5)


def test_selection_bias_chooses_but_never_weighs_and_moves_towards_equal_load():
    """DeepSeek-V3 section 2.1.2 with sigmoid scores: top-k of s + b, weights s of the chosen experts normalised over
    them, the bias absent from the weights; after a step, b_i += speed x sign(mean load - load_i)."""
    from wider.moe import stats

    m = _layer(score="sigmoid", renormalize=True, selection_bias=True, settings={"capacity_factor": None,
                                                                                "bias_update_speed": 0.01})
    g = torch.Generator().manual_seed(7)
    x = torch.randn(20, D, generator=g)
    bias = torch.linspace(-0.3, 0.4, E)
    m.deepspeed_moe.gate.selection_bias.copy_(bias)
    routing, p = m.route(x)
    w = _weights64(m)
    s = torch.sigmoid(x.double() @ w["router"].T)
    ids = torch.topk(s + bias.double(), K, dim=-1).indices
    assert torch.equal(routing.expert_ids_TK, ids)
    assert not torch.equal(ids, torch.topk(s, K, dim=-1).indices)  # the bias changed some choices
    chosen = s.gather(1, ids)
    torch.testing.assert_close(routing.weights_TK.double(), chosen / chosen.sum(-1, keepdim=True), rtol=1e-6, atol=1e-7)
    # The combine weights carry no bias: the router's gradient is the unbiased scores' (a bias shift that keeps the
    # choices changes nothing).
    m.deepspeed_moe.gate.selection_bias.add_(1e-4)
    torch.testing.assert_close(m.route(x)[0].weights_TK, routing.weights_TK, rtol=0, atol=0)
    m.deepspeed_moe.gate.selection_bias.copy_(bias)

    # Two training forward passes (a step of two micro-batches), then the update.
    stats.clear(m)
    loads = torch.zeros(E, dtype=torch.long)
    for part in (x[:12], x[12:]):
        m(part)
        ids = torch.topk(torch.sigmoid(part.double() @ w["router"].T) + bias.double(), K, dim=-1).indices
        loads += torch.bincount(ids.reshape(-1), minlength=E)
        stats.take(m)
    stats.update_selection_biases(m)
    expect = bias.double() + 0.01 * torch.sign(loads.double().mean() - loads.double())
    torch.testing.assert_close(m.deepspeed_moe.gate.selection_bias.double(), expect, rtol=0, atol=1e-7)
    assert m.pending_load_E is None
    # Evaluation passes do not count towards the load.
    m.eval()
    m(x)
    stats.take(m)
    assert m.pending_load_E is None


def test_shared_experts_outputs_gradients_and_the_granularity_budget(single_rank):
    """gpt_moe with one shared expert: the MLP slot's output is the routed MoE's plus a dense FFN of the expert's
    width applied to every token (its gradient that FFN's, by float64 autograd); with granularity the shared
    experts come out of the active budget, so `wider.info`'s active and total counts stay the dense-equal ones."""
    from wider import presets
    from wider.config import resolve_granularity
    from wider.models import ARCHITECTURES
    from wider.models.gpt_moe import MoEMLP

    cfg = presets.replace(presets.fine_smoke(), model=dict(shared_experts=1, num_layers=2))
    resolve_granularity(cfg.model)
    m = cfg.model
    assert (m.num_experts, m.moe_top_k, m.moe_ffn_hidden_size) == (15, 3, 128)  # G 4 x E 4 - 1, G 4 x k 1 - 1
    base = presets.replace(presets.fine_smoke(), model=dict(num_layers=2))
    resolve_granularity(base.model)
    count = ARCHITECTURES["gpt_moe"].count
    with_shared, without = count(cfg, 1000), count(base, 1000)
    # Equal but for the router's one column fewer per MoE layer (the shared expert is not routed).
    layers = with_shared.extra["moe_layers"]
    assert layers == 2
    assert with_shared.active == without.active - layers * m.hidden_size
    assert with_shared.total == without.total - layers * m.hidden_size

    torch.manual_seed(0)
    model = ARCHITECTURES["gpt_moe"].build(cfg, 1000)
    slot = model.decoder.layers[0].mlp
    assert isinstance(slot, MoEMLP) and slot.shared_ffn is not None
    x = torch.randn(5, 2, m.hidden_size, requires_grad=True)
    out, _ = slot(x)
    routed, _, _ = slot.moe(x)
    fc1, fc2 = slot.shared_ffn.linear_fc1, slot.shared_ffn.linear_fc2
    assert fc1.bias is None and fc2.bias is None  # an expert: bias-free, whatever add_bias_linear says
    w1 = fc1.weight.detach().double().requires_grad_(True)
    w2 = fc2.weight.detach().double().requires_grad_(True)
    assert w1.shape == (128, m.hidden_size)  # one expert's width
    ref = F.gelu(x.detach().double() @ w1.T) @ w2.T
    torch.testing.assert_close((out - routed).double(), ref, rtol=1e-5, atol=1e-6)
    probe = torch.randn_like(ref)
    (out.double() * probe).sum().backward()
    (ref * probe).sum().backward()
    torch.testing.assert_close(fc1.weight.grad.double(), w1.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fc2.weight.grad.double(), w2.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change,match", [
    (dict(moe_router="expert_choice", router_noise="inverse_experts"), "does not take --router-noise"),
    (dict(moe_router="expert_choice", router_bias=True), "does not take --router-bias"),
    (dict(moe_router="expert_choice", router_renormalize=True), "does not take --router-renormalize"),
    (dict(moe_router="expert_pick"), "model.moe_router 'expert_pick' is invalid"),
    (dict(shared_experts=4), "does not fit the active budget"),
    (dict(ec_softmax_over="tokens"), "applies to expert choice only"),
])
def test_bad_router_combinations_are_refused_before_any_process_starts(change, match):
    from wider import presets
    from wider.config import ConfigError
    from wider.models import validate

    cfg = presets.replace(presets.fine_smoke(), model=change)
    with pytest.raises(ConfigError, match=match):
        validate(cfg, 2)


@pytest.mark.parametrize("ds_set,match", [
    (["moe.bias_update_speed=-0.1"], "bias_update_speed must be a number >= 0"),
    (["moe.capacity_factor=null"], "expert choice .* needs a capacity"),
    (["moe.ec_group=0"], "ec_group must be 'position', 'batch' or a positive integer"),
    (["moe.ec_group=2"], "gives each of the 16 experts round"),
])
def test_bad_moe_block_values_for_the_routers(ds_set, match):
    from wider import ds_config, presets
    from wider.config import ConfigError
    from wider.models import validate

    cfg = presets.replace(presets.fine_smoke(), model=dict(moe_router="expert_choice"),
                          train=dict(ds_set=presets.fine_smoke().train.ds_set + ds_set))
    with pytest.raises(ConfigError, match=match):
        validate(cfg, 2)
        ds_config.build(cfg, 2)


# --- expert parallelism: two in-process ranks ------------------------------------------------------------------

ROUTERS = {"expert_choice": dict(selection="expert_choice", settings={"ec_group": "position"}),
           "aux_free": dict(score="sigmoid", renormalize=True, selection_bias=True,
                            settings={"capacity_factor": None, "bias_update_speed": 0.01})}


def _x(rank):
    return torch.randn(5, 4, D, generator=torch.Generator().manual_seed(11 + rank))


def _ep_worker(rank: int, port: int, out_dir: str, router: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_SIZE="2", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    import patches
    from wider import parallel
    from wider.moe import stats

    torch.set_num_threads(1)
    patches.apply_defaults()
    parallel.init_distributed(1)
    # DeepSpeed's CPU op mapped every rank's shared-memory buffer; wider unlinked this rank's name (no 66 MB left in
    # /dev/shm per rank and run) and the op still reduces through the mapping.
    import deepspeed.comm as ds_dist

    t = torch.full((4,), float(rank + 1))
    ds_dist.inference_all_reduce(t)
    shm_ok = not os.path.exists(parallel.shm_buffer_path(rank)) and torch.equal(t, torch.full((4,), 3.0))
    kw = dict(ROUTERS[router])
    m = _layer(ep_size=2, groups=parallel.expert_groups(2), **kw)
    m.deepspeed_moe.gate.selection_bias is not None and m.deepspeed_moe.gate.selection_bias.copy_(
        torch.linspace(-0.05, 0.05, E))
    y, _, _ = m(_x(rank))
    stats.take(m)
    (y * torch.ones_like(y)).sum().backward()
    stats.update_selection_biases(m)  # over the whole world: the data-parallel group here
    core = m.deepspeed_moe
    torch.save({"y": y.detach(), "w1": core.experts.w1_LDF.grad, "router": core.gate.wg.weight.grad,
                "bias": core.gate.selection_bias, "ep_rank": m.ep_rank, "shm_ok": shm_ok}, os.path.join(out_dir, f"rank{rank}.pt"))
    parallel.destroy()


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_ep2_equals_ep1_for_each_router(tmp_path, router):
    """Experts split over two ranks exchange tokens and give each rank the outputs, local expert gradients (summed
    over both ranks' tokens), router gradients and (aux-loss-free) updated biases of one process holding every
    expert; the split took effect (each rank holds half of the experts)."""
    import torch.multiprocessing as mp

    mp.spawn(_ep_worker, args=(free_port(), str(tmp_path), router), nprocs=2, join=True)
    from wider.moe import stats

    def fresh():
        m = _layer(**ROUTERS[router])
        if m.deepspeed_moe.gate.selection_bias is not None:
            m.deepspeed_moe.gate.selection_bias.copy_(torch.linspace(-0.05, 0.05, E))
        return m

    ref = fresh()  # one process, every expert: both ranks' tokens, then the bias update from both loads
    outs = [ref(_x(r))[0] for r in range(2)]
    stats.take(ref)
    sum(y.sum() for y in outs).backward()
    stats.update_selection_biases(ref)
    full_w1 = ref.deepspeed_moe.experts.w1_LDF.grad
    router_grads = []
    for r in range(2):  # each rank's router gradient is its own tokens'
        one = fresh()
        one(_x(r))[0].sum().backward()
        router_grads.append(one.deepspeed_moe.gate.wg.weight.grad)
    gate = ref.deepspeed_moe.gate
    L = E // 2
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert got["ep_rank"] == r and got["w1"].shape[0] == L
        assert got["shm_ok"]
        torch.testing.assert_close(got["y"], outs[r].detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["w1"], full_w1[r * L:(r + 1) * L], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["router"], router_grads[r], rtol=1e-5, atol=1e-6)
        if got["bias"] is not None:
            torch.testing.assert_close(got["bias"], gate.selection_bias, rtol=0, atol=0)
            assert not torch.equal(got["bias"], torch.linspace(-0.05, 0.05, E))  # the update happened


# --- through the launcher: a selection bias and a shared expert, interrupted at ep 2, resumed at ep 1 -------------

STEPS = 6
BIASED = ["--preset", "fine_smoke", *TINY, "--train-iters", str(STEPS), "--granularity", "4", "--expansion-rate", "4",
          "--base-top-k", "1", "--shared-experts", "2", "--router-score", "sigmoid", "--router-renormalize",
          "--router-bias", "--ds-set", "moe.aux_loss_weight=0", "moe.bias_update_speed=0.01"]


def _bias(run_dir, step):
    states = torch.load(run_dir / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt",
                        weights_only=False)["module"]
    return {k: v for k, v in states.items() if k.endswith("selection_bias")}


def test_biased_run_with_a_shared_expert_resumes_across_expert_layouts(data_args, tmp_path):
    """Two ranks: ep_size 1 for six steps; ep_size 2 stopped at step 3, then resumed at ep_size 1. Steps 1-3 at ep 2
    equal ep 1 (1e-5), the resumed steps 4-6 equal the uninterrupted run, and the final biases are equal bit for bit
    (they moved: the update ran, over both ranks' loads)."""
    def run(name, *extra):
        p = run_recipe([*BIASED, *data_args, "--run-dir", str(tmp_path / name), *extra], ranks=2,
                       recipe="recipes/pretrain_gpt_moe.py")
        assert p.returncode == 0, explain(p)
        return train_losses(tmp_path / name), p.stdout

    full, out = run("full")
    assert "aux-loss-free bias, speed 0.01" in out
    part, out2 = run("split", "--ds-set", "moe.aux_loss_weight=0", "moe.bias_update_speed=0.01", "moe.ep_size=2",
                     "--exit-at-iter", "3")
    assert "ep_size 2" in out2
    for s in (1, 2, 3):
        assert abs(part[s] - full[s]) <= 1e-5 * max(1.0, full[s]), (s, part[s], full[s])
    resumed, _ = run("split", "--resume", "auto")
    for s in (4, 5, 6):
        assert abs(resumed[s] - full[s]) <= 1e-5 * max(1.0, full[s]), (s, resumed[s], full[s])
    a, b = _bias(tmp_path / "full", STEPS), _bias(tmp_path / "split", STEPS)
    assert sorted(a) == sorted(b) and len(a) == 2  # both MoE blocks
    for k in a:
        assert torch.equal(a[k], b[k]), k
        assert a[k].abs().max() > 0
    with open(tmp_path / "full" / "metrics.jsonl") as f:
        recs = [json.loads(line) for line in f]
    assert any(r["kind"] == "moe_bias" for r in recs)
    moe = [r for r in recs if r["kind"] == "moe_train"][-1]
    assert all("experts_per_token" in v and "unrouted" in v for k, v in moe.items() if k not in ("kind", "step"))


def test_a_scaling_fit_refuses_runs_of_two_routings(tmp_path):
    """The paper's law describes expert-choice models: runs.csv records each run's router and a CSV that mixes
    routings is refused with the reason, while one routing reads."""
    from wider.scaling.law import ScalingError
    from wider.scaling.sweep import read_runs

    head = "run,N,D,G,loss,router\n"
    rows = ["a,1e7,1e9,1,3.2,token_choice\n", "b,2e7,1e9,2,3.1,expert_choice\n"]
    (tmp_path / "mixed.csv").write_text(head + "".join(rows))
    with pytest.raises(ScalingError, match="mix routings"):
        read_runs(str(tmp_path / "mixed.csv"))
    (tmp_path / "one.csv").write_text(head + rows[1] + "c,4e7,2e9,4,3.0,expert_choice\n")
    assert list(read_runs(str(tmp_path / "one.csv")).G) == [2.0, 4.0]


def test_generation_routes_expert_choice_layers_by_token_choice():
    """Generation has one new token per step and no group to choose from: its configuration routes expert-choice
    layers by token choice of the same scores, and a layer whose softmax runs over a group's tokens (no per-token
    score) is refused with the reason."""
    from wider.generation import generation_config
    from wider.moe.layer import routing_description

    m = _layer("expert_choice", settings={"ec_group": "batch"})
    assert routing_description(m.config) == "expert choice, per-position groups (no future token)"
    assert routing_description(m.config, training=True).startswith("expert choice, groups of the whole micro-batch")
    gen = generation_config(m.config)
    assert routing_description(gen).startswith("token choice")
    m.config = gen
    m.eval()
    x = torch.randn(3, 1, D)
    together = m(x)[0]
    alone = torch.cat([m(x[i:i + 1])[0] for i in range(3)])  # a token's output depends on itself only
    torch.testing.assert_close(together, alone, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="cannot route one token at a time"):
        generation_config(_layer("expert_choice", ec_softmax_over="tokens").config)
