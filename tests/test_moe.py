"""wider's MoE layer: against DeepSpeed's stock MoE, capacity priority, checkpoint key layout, the "moe" block,
and the WideNet / gpt_moe models built from it (one rank, in-process)."""

from __future__ import annotations

import json

import pytest
import torch

from wider import presets
from wider.models import validate
from wider.config import ConfigError
from wider.moe import dispatch
from wider.moe.config import MoEConfig, MoERuntime
from wider.moe.settings import MoESettings

D, F, E = 16, 32, 4


def _ours(k: int, settings: MoESettings, renormalize: bool, **kw):
    from wider.moe.layer import MoE

    # Large init so that outputs are O(1) and the tolerances below mean something.
    return MoE(MoEConfig(hidden_size=D, num_experts=E, top_k=k, ffn_size=F, settings=settings, renormalize=renormalize,
                         init_std=0.5, output_std=0.3, **kw))


def _deepspeed_like(ours, k: int, capacity_factor: float, drop_tokens: bool):
    """The stock deepspeed.moe.layer.MoE with our weights: deterministic gate (no RTS, no second-expert
    sampling, no noise) and experts Linear -> GELU -> Linear without biases."""
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    expert = torch.nn.Sequential(torch.nn.Linear(D, F, bias=False), torch.nn.GELU(), torch.nn.Linear(F, D, bias=False))
    ref = DeepSpeedMoE(D, expert, num_experts=E, k=k, capacity_factor=capacity_factor,
                       eval_capacity_factor=capacity_factor, min_capacity=0, noisy_gate_policy=None,
                       drop_tokens=drop_tokens, use_rts=False, top2_2nd_expert_sampling=False)
    ref.set_deepspeed_parallelism()
    with torch.no_grad():
        ref.deepspeed_moe.gate.wg.weight.copy_(ours.deepspeed_moe.gate.wg.weight)
        for i, e in enumerate(ref.deepspeed_moe.experts.deepspeed_experts):
            e[0].weight.copy_(ours.deepspeed_moe.experts.w1_LDF[i].t())
            e[2].weight.copy_(ours.deepspeed_moe.experts.w2_LFD[i].t())
    return ref


@pytest.mark.parametrize("k", [1, 2])
def test_equals_deepspeed_stock_moe_when_nothing_is_dropped(single_rank, k):
    torch.manual_seed(k)
    ours = _ours(k, MoESettings(capacity_factor=None, eval_capacity_factor=None), renormalize=(k == 2))
    ref = _deepspeed_like(ours, k, capacity_factor=1.0, drop_tokens=False)
    x = torch.randn(8, 6, D)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out1, aux1, _ = ours(x1)
    out2, l_aux, _ = ref(x2)
    g = torch.randn_like(out1)
    (out1 * g).sum().backward()
    (out2 * g).sum().backward()

    assert out1.abs().mean() > 0.1  # not a vacuous comparison
    torch.testing.assert_close(out1, out2, rtol=1e-5, atol=1e-6)
    # The router's gradients (x through the gate, and the gate's weight) at fp32 rounding of their largest entries:
    # the combine weights' gradient is summed as <g W2^T, act(h)> (dispatch.mm_combine), DeepSpeed's as <g, y>, the
    # same sum in another order, and the gate weight's gradient then adds 48 tokens' terms of up to ~30 (seen: both
    # are 5e-6 from a float64 run of ours, and 6e-6 apart, on one CPU; a wrong term would be O(1) off).
    for a, b in ((x1.grad, x2.grad), (ours.deepspeed_moe.gate.wg.weight.grad, ref.deepspeed_moe.gate.wg.weight.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())
    for i, e in enumerate(ref.deepspeed_moe.experts.deepspeed_experts):
        torch.testing.assert_close(ours.deepspeed_moe.experts.w1_LDF.grad[i].t(), e[0].weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.deepspeed_moe.experts.w2_LFD.grad[i].t(), e[2].weight.grad, rtol=1e-5, atol=1e-6)

    # Aux losses, compared separately: both are E * sum_i f_i * P_i, but DeepSpeed's top-2 gate counts only
    # first choices in f, wider counts every routed assignment (DESIGN 5.3).
    with torch.no_grad():
        probs = torch.softmax(x.reshape(-1, D) @ ours.deepspeed_moe.gate.wg.weight.t(), dim=-1)
        top = probs.topk(k, dim=-1).indices
        P = probs.mean(0)
        f_all = torch.bincount(top.reshape(-1), minlength=E).float() / top.numel()
        f_first = torch.bincount(top[:, 0], minlength=E).float() / top.shape[0]
    balance = ours.records[-1].balance
    torch.testing.assert_close(balance, E * (f_all * P).sum())
    torch.testing.assert_close(l_aux.detach(), E * (f_first * P).sum())
    if k == 1:
        torch.testing.assert_close(balance, l_aux.detach())
    else:
        assert abs(float(balance) - float(l_aux)) > 1e-4


def test_top2_drops_the_same_assignments_as_deepspeed(single_rank):
    """With a binding capacity, DeepSpeed's top-2 gate and ours keep exactly the same (token, expert) pairs:
    both give all first choices priority over second choices, then token order. What differs: DeepSpeed
    renormalises the surviving weight after the drop (a token whose second choice was dropped gets weight 1
    on its first), wider renormalises before (it keeps g1 / (g1 + g2), as GShard does). (DeepSpeed's top-1
    gate with use_rts=False picks the kept tokens with torch.topk over a 0/1 mask, whose tie order is
    unspecified, so no top-1 drop-set comparison is made; wider's top-1 keeps token order.)"""
    torch.manual_seed(7)
    cf = 0.6
    ours = _ours(2, MoESettings(capacity_factor=cf, eval_capacity_factor=cf, min_capacity=0), renormalize=True)
    ref = _deepspeed_like(ours, 2, capacity_factor=cf, drop_tokens=True)
    x_TD = torch.randn(64, D)
    with torch.no_grad():
        routing = ours.deepspeed_moe.gate(x_TD)
        cap = dispatch.capacity(64, 2, E, cf, 0)
        p = dispatch.plan(routing.expert_ids_TK, routing.weights_TK, E, cap)
        token_A, weight_A, expert_A = p.kept()
        ours_kept = set(zip(token_A.tolist(), expert_A.tolist()))
        _, combine_TEC, dispatch_TEC, _ = ref.deepspeed_moe.gate(x_TD)
        ref_kept = set(map(tuple, dispatch_TEC.any(-1).nonzero().tolist()))
        assert cap == combine_TEC.shape[-1]
    assert 64 < len(ours_kept) < 128  # some assignments were dropped
    assert ours_kept == ref_kept

    with torch.no_grad():
        out_ours, _, _ = ours(x_TD)
        out_ref, _, _ = ref(x_TD)
    kept_per_token = torch.bincount(token_A, minlength=64)
    both = kept_per_token == 2
    torch.testing.assert_close(out_ours[both], out_ref[both], rtol=1e-5, atol=1e-6)
    one = (kept_per_token == 1).nonzero().flatten()
    assert len(one) > 0
    w_kept = torch.zeros(64).index_add(0, token_A, weight_A)
    torch.testing.assert_close(out_ours[one] / w_kept[one, None], out_ref[one], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("per_assignment", [False, True])
@pytest.mark.parametrize("kernel", ["grouped_mm", "loop"])
@pytest.mark.parametrize("cap", [None, 3])
def test_fused_expert_path_equals_the_composable_one_and_keeps_less(single_rank, kernel, cap, per_assignment):
    """GroupedExperts.forward_plan (gather fused into the first GEMM's autograd node, combine into the second's:
    the ep_size-1 path) against combine(experts(gather_tokens(...))) (the expert-parallel path's pieces): the same
    output and gradients (x, both expert weights, the combine weights), with drops (cap 3: rows past n_kept are
    left unwritten by the GEMMs) and an expert nobody chose, and fewer bytes saved for the backward by at least
    the two R x D tensors. per_assignment: one input per (token, choice), x_XD (UMoE's mixed tokens)."""
    from wider import memory_plan as plan
    from wider.moe.experts import GroupedExperts

    torch.manual_seed(3)
    T, K, L = 12, 2, 4
    ex = GroupedExperts(L, D, F, "gelu")
    with torch.no_grad():
        ex.w1_LDF.normal_(0, 0.5), ex.w2_LFD.normal_(0, 0.3)
    ids = torch.randint(0, L - 1, (T, K))  # expert L - 1 gets nothing
    ids[:, 1] = (ids[:, 0] + 1) % (L - 1)
    logits = torch.randn(T, K, requires_grad=True)
    x = torch.randn(T * K if per_assignment else T, D, requires_grad=True)
    g = torch.randn(T, D)
    results, saved = [], []
    for fused in (True, False):
        ex.zero_grad(), x.grad.zero_() if x.grad is not None else None
        logits.grad = None
        p = dispatch.plan(ids, torch.sigmoid(logits), L, cap)
        # Activation memory kept for the backward: not counting the weights and the input (which live anyway).
        with plan.kept_for_backward((x, ex.w1_LDF, ex.w2_LFD)) as sizes:
            if fused:
                out = ex.forward_plan(None, p, x_XD=x, kernel=kernel) if per_assignment else \
                    ex.forward_plan(x, p, kernel=kernel)
            else:
                rows = dispatch.gather_assignments(x, p) if per_assignment else dispatch.gather_tokens(x, p)
                out = dispatch.combine(ex(rows, p.counts_E, kernel), p)
        (out * g).sum().backward()
        results.append([out, x.grad, ex.w1_LDF.grad, ex.w2_LFD.grad, logits.grad])
        saved.append(sum(sizes.values()))
    if cap is not None:
        assert int(p.counts_E.sum()) < T * K  # something was dropped
    for a, b in zip(*results):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # Both R x D fp32 tensors (x gathered, expert outputs) are gone, up to a few int64 index rows saved instead.
    assert saved[1] - saved[0] >= 0.9 * 2 * T * K * D * 4, saved


def test_capacity_priority_first_choices_then_token_order():
    ids_TK = torch.tensor([[0, 1], [0, 1], [1, 0], [1, 0], [0, 1], [0, 1]])
    weights_TK = torch.full((6, 2), 0.5)
    p = dispatch.plan(ids_TK, weights_TK, num_experts=2, cap=3)
    token_A, _, expert_A = p.kept()
    kept = sorted(zip(expert_A.tolist(), token_A.tolist()))
    # Expert 0: first choices of tokens 0, 1, 4 fill it; token 5's first choice and tokens 2, 3's second
    # choices are dropped. Expert 1: first choices of 2, 3, then the second choice of token 0.
    assert kept == [(0, 0), (0, 1), (0, 4), (1, 0), (1, 2), (1, 3)]
    assert p.routed_E.tolist() == [6, 6] and p.counts_E.tolist() == [3, 3]
    # Within an expert the rows come in priority order (first choices, then token order).
    assert token_A.tolist() == [0, 1, 4, 2, 3, 0]
    # The plan keeps all 12 rows (fixed shapes): the six dropped ones last, in priority order, weight 0.
    assert p.token_A.tolist() == [0, 1, 4, 2, 3, 0, 5, 2, 3, 1, 4, 5]
    assert p.live_A.tolist() == [True] * 6 + [False] * 6 and p.weight_A[6:].abs().sum() == 0

    assert dispatch.capacity(10, 2, 4, 1.25, 4) == 7  # ceil(2 * 1.25 * 10 / 4)
    assert dispatch.capacity(10, 1, 4, 1.0, 4) == 4  # min_capacity
    assert dispatch.capacity(10, 2, 4, None, 4) is None  # dropless
    full = dispatch.plan(ids_TK, weights_TK, num_experts=2, cap=None)
    assert full.counts_E.tolist() == [6, 6] and len(full.token_A) == 12


def test_train_and_eval_capacity_and_router_noise(single_rank):
    torch.manual_seed(0)
    s = MoESettings(capacity_factor=0.25, eval_capacity_factor=None, min_capacity=0)
    moe = _ours(2, s, renormalize=False, noise_std=1.0 / E)
    x = torch.randn(40, D)
    moe.train()
    a, _, _ = moe(x)
    b, _, _ = moe(x)
    r = moe.records[-1]
    assert int(r.kept_E.sum()) < int(r.routed_E.sum())  # training factor 0.25 drops
    assert not torch.equal(a, b)  # fresh noise each training call
    moe.eval()
    c, _, _ = moe(x)
    d, _, _ = moe(x)
    r = moe.records[-1]
    assert torch.equal(r.kept_E, r.routed_E)  # eval factor None: dropless
    assert torch.equal(c, d)  # no noise in eval
    # WideNet's router does not renormalise: the two weights sum to less than one.
    w = moe.deepspeed_moe.gate(x).weights_TK
    assert float(w.sum(-1).max()) < 1.0
    settings_off = MoESettings(drop_tokens=False, capacity_factor=0.1)
    assert settings_off.capacity_factor_for(True) is None


def test_checkpoint_key_layout_round_trip(single_rank):
    torch.manual_seed(0)
    moe = _ours(2, MoESettings(), renormalize=False)
    sd = moe.state_dict()
    assert set(sd) == {"deepspeed_moe.gate.wg.weight"} | {
        f"deepspeed_moe.experts.deepspeed_experts.{i}.{n}" for i in range(E) for n in ("w1", "w2")}
    assert sd["deepspeed_moe.experts.deepspeed_experts.2.w1"].shape == (D, F)
    torch.testing.assert_close(sd["deepspeed_moe.experts.deepspeed_experts.2.w2"], moe.deepspeed_moe.experts.w2_LFD[2])
    other = _ours(2, MoESettings(), renormalize=False)
    other.load_state_dict(sd)
    assert torch.equal(other.deepspeed_moe.experts.w1_LDF, moe.deepspeed_moe.experts.w1_LDF)
    sd.pop("deepspeed_moe.experts.deepspeed_experts.3.w2")
    with pytest.raises(RuntimeError, match="w2_LFD"):
        other.load_state_dict(sd)
    # Expert parameters carry DeepSpeed's tags: the engine reduces them over the expert-data-parallel group.
    for p in moe.deepspeed_moe.experts.parameters():
        assert p.allreduce is False and p.group_name == "ep_size_1"
    assert not hasattr(moe.deepspeed_moe.gate.wg.weight, "allreduce")


def _moe_cfg(name: str, **model):
    cfg = presets.get(name)
    shape = dict(num_layers=3, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=512)
    return presets.replace(cfg, model={**shape, **model})


def test_widenet_shares_one_attention_and_one_moe(single_rank):
    from wider import parallel
    from wider.info import describe
    from wider.models import ARCHITECTURES
    from wider.models.gpt_moe import MoEMLP

    cfg = _moe_cfg("widenet_smoke")
    parallel.set_seed(3)
    model = ARCHITECTURES["widenet"].build(cfg, 512, False, MoERuntime(MoESettings()))
    layers = model.decoder.layers
    attn, moe = model.decoder.shared_attention, model.decoder.shared_moe
    assert isinstance(moe, MoEMLP)
    for layer in layers:  # every block calls the same two modules ...
        assert layer.self_attention.module is attn and layer.mlp.module is moe
    norms = [id(m) for layer in layers for m in (layer.input_layernorm, layer.pre_mlp_layernorm)]
    assert len(set(norms)) == 2 * len(layers)  # ... and has its own two LayerNorms

    n = lambda mod: sum(p.numel() for p in mod.parameters())
    per_block_norms = sum(n(layer.input_layernorm) + n(layer.pre_mlp_layernorm) for layer in layers)
    unique = (model.embedding.word_embeddings.weight.numel() + n(attn) + n(moe) + per_block_norms
              + n(model.decoder.final_layernorm))
    built = sum(p.numel() for p in model.parameters())
    assert built == unique == describe(cfg)["params_total"]
    keys = list(model.state_dict())
    assert not any(".layers." in k and ("self_attention" in k or ".mlp." in k) for k in keys)
    assert sum("shared_moe.moe.deepspeed_moe.experts.deepspeed_experts.0.w1" in k for k in keys) == 1

    tokens = torch.randint(0, 512, (2, 32))
    pos = torch.arange(32).expand(2, 32)
    from wider.moe import stats

    stats.clear(model)
    model(tokens, pos, None, labels=tokens).mean().backward()
    aux, records = stats.take(model)
    assert [label for label, _ in records] == ["block00", "block01", "block02"]
    torch.testing.assert_close(aux, sum(r.aux for _, r in records))
    assert moe.moe.deepspeed_moe.experts.w1_LDF.grad.abs().sum() > 0


def test_gpt_moe_every_other_block_and_counts(single_rank):
    from wider import parallel
    from wider.info import describe
    from wider.models import ARCHITECTURES
    from wider.models.gpt_moe import MoEMLP

    for name in ("switch_smoke", "glam_smoke"):
        cfg = _moe_cfg(name, num_layers=4)
        parallel.set_seed(3)
        model = ARCHITECTURES["gpt_moe"].build(cfg, 512, False, MoERuntime(MoESettings()))
        kinds = [isinstance(layer.mlp, MoEMLP) for layer in model.decoder.layers]
        assert kinds == [False, True, False, True]
        assert sum(p.numel() for p in model.parameters()) == describe(cfg)["params_total"]
        moe = model.decoder.layers[1].mlp.moe
        assert moe.config.top_k == (1 if name == "switch_smoke" else 2)
        assert moe.deepspeed_moe.gate.renormalize == (name == "glam_smoke")


def _write(tmp_path, d: dict) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(d))
    return str(path)


BASE = {"zero_optimization": {"stage": 1}, "bf16": {"enabled": False}}


@pytest.mark.parametrize("block,dp,match", [
    ({"moe": {"capacity_facter": 1.0}}, 2, r"moe\.capacity_facter.*did you mean 'capacity_factor'"),
    ({"moe": {"ep_size": 3}}, 6, r"num_experts 4 is not divisible by moe\.ep_size 3"),
    ({"moe": {"ep_size": 4}}, 2, r"moe\.ep_size 4 does not divide the data-parallel size 2"),
    ({"moe": {"capacity_factor": 0}}, 2, r"moe\.capacity_factor must be a positive number or null"),
    ({"moe": {"eval_capacity_factor": -1.0}}, 2, r"moe\.eval_capacity_factor must be a positive"),
    ({"moe": {"aux_loss_weight": -0.1}}, 2, r"moe\.aux_loss_weight must be a number >= 0"),
    ({"moe": {"min_capacity": 1.5}}, 2, r"moe\.min_capacity must be an integer"),
    ({"zero_optimization": {"stage": 3}}, 2, r"stage 3 is not supported.*MoE refuses ZeRO-3"),
    ({"expert_parallel": {"ep_size": 2}}, 2, r"'expert_parallel'.*ep_size 2.*moe\.ep_size"),
])
def test_moe_block_errors_name_the_key(tmp_path, block, dp, match):
    from wider import ds_config

    cfg = presets.get("widenet_smoke")
    cfg.train.global_batch_size = cfg.train.micro_batch_size * dp
    cfg.train.ds_set = []
    with pytest.raises(ConfigError, match=match):
        ds_config.build(cfg, dp, _write(tmp_path, {**BASE, **block}))


def test_top_k_above_expert_count_and_ds_set(tmp_path):
    from wider import ds_config

    cfg = presets.get("widenet_smoke")
    cfg.model.moe_top_k = 5
    with pytest.raises(ConfigError, match=r"moe_top_k 5 must be in \[1, num_experts=4\]"):
        validate(cfg)
    cfg = presets.get("widenet_smoke")
    cfg.train.ds_set = ["moe.ep_size=2", "moe.capacity_factor=null", "zero_optimization.stage=2"]
    d = ds_config.build(cfg, 2, _write(tmp_path, BASE))
    assert d["moe"]["ep_size"] == 2 and d["moe"]["capacity_factor"] is None
    assert d["zero_optimization"]["stage"] == 2
    assert ds_config.moe_settings(d).capacity_factor_for(True) is None
    cfg.train.ds_set = ["moe.ep_size"]
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        ds_config.build(cfg, 2, _write(tmp_path, BASE))
    cfg = presets.get("widenet_smoke")
    cfg.train.tensor_parallel = 2
    with pytest.raises(ConfigError, match="not tensor-parallel"):
        validate(cfg)


@pytest.mark.parametrize("G,E_rate,k,experts,top_k,width", [
    (1, 64, 1, 64, 1, 2048),
    (8, 64, 1, 512, 8, 256),
    (16, 8, 1, 128, 16, 128),
    (4, 8, 2, 32, 8, 512),
])
def test_fine_grained_config_algebra(G, E_rate, k, experts, top_k, width):
    """Granularity and expansion rate (Krajewski et al. 2024) -> experts, top-k, expert width; the active
    parameters equal the dense model's plus only the routers."""
    from wider.info import describe

    cfg = presets.get("fine_512x8")
    cfg.model.granularity, cfg.model.expansion_rate, cfg.model.base_top_k = G, E_rate, k
    cfg.model.num_experts, cfg.model.moe_top_k, cfg.model.moe_ffn_hidden_size = 0, 2, None
    cfg.model.add_bias_linear = False
    validate(cfg)
    m = cfg.model
    assert (m.num_experts, m.moe_top_k, m.moe_ffn_hidden_size) == (experts, top_k, width)
    info = describe(cfg)
    dense = presets.replace(cfg, model=dict(arch="gpt", granularity=None, expansion_rate=None, num_experts=0))
    routers = m.num_layers * m.hidden_size * experts
    assert info["params_active"] == describe(dense)["params_active"] + routers + (k - 1) * m.num_layers * 2 * 512 * 2048
    assert info["extra_granularity"] == G and info["extra_expansion_rate"] == E_rate
    # The law's N: attention + every expert (+ routers and norms); E times the dense FFN's parameters.
    ffn_total = m.num_layers * E_rate * 2 * 512 * 2048
    assert info["params_non_embedding"] == describe(dense)["params_non_embedding"] - m.num_layers * 2 * 512 * 2048 \
        + ffn_total + routers


@pytest.mark.parametrize("change,match", [
    (dict(granularity=3), r"d_ff 2048 is not divisible by granularity 3"),
    (dict(ffn_hidden_size=100, granularity=2), r"d_ff / G = 100 / 2 = 50 is not a multiple of 8"),
    (dict(expansion_rate=None), r"needs both"),
    (dict(num_experts=7), r"num_experts 7 conflicts with granularity 8 x expansion_rate 64"),
])
def test_fine_grained_impossible_combinations(change, match):
    cfg = presets.get("fine_512x8")
    for key, value in change.items():
        setattr(cfg.model, key, value)
    with pytest.raises(ConfigError, match=match):
        validate(cfg)
