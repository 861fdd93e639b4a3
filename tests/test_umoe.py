"""UMoE (Yang et al. 2025) against plain float64 references written here with loops: pre-mixing attention (expert
queries, one key head, the normed tokens as values, RoPE, causal softmax, the shared expert with its own query) and the
FFN sublayer over the same experts; sharing (one set of expert parameters whose gradients add up) and its switch;
the sequence-level balance loss; preset counts against the official configurations; ep_size 2 = ep_size 1 through the
launcher."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import TINY, assert_ep2_equals_ep1
from wider.moe import stats
from wider.models import validate
from wider.moe.config import MoERuntime
from wider.moe.settings import MoESettings

S, B = 6, 2  # sequence length, sequences (megatron layout [s, b, d])
SETTINGS = MoESettings(capacity_factor=None, eval_capacity_factor=None, aux_loss_weight=0.5, aux_loss_scope="sequence",
                       z_loss_weight=0.0)


def _cfg(mode: str = "shared", **model):
    from wider import presets

    cfg = presets.get("umoe_smoke")
    # Small and uneven: 6 experts for 12 tokens x 2 (attention) or 3 (FFN) choices; d_qk 8, rank 4.
    defaults = dict(umoe_mode=mode, num_layers=1, hidden_size=16, num_attention_heads=2, head_dim=8, num_experts=6,
                    moe_ffn_hidden_size=8, moe_top_k=3, attention_top_k=2, query_rank=4, shared_experts=1,
                    seq_length=S, init_method_std=0.4)
    for k, v in {**defaults, **model}.items():
        setattr(cfg.model, k, v)
    return validate(cfg)


def _build(cfg, vocab: int = 64):
    from wider.models import ARCHITECTURES

    torch.manual_seed(0)
    model = ARCHITECTURES["umoe"].build(cfg, vocab, False, MoERuntime(SETTINGS))
    with torch.no_grad():  # non-trivial norms (their init is the identity)
        for name, p in model.named_parameters():
            if "layernorm" in name or "q_norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _rope(v: torch.Tensor, pos: int, base: float = 10000.0) -> torch.Tensor:
    """Rotate-half RoPE on all C channels: channel i pairs with i + C/2, angle pos * base^(-2i/C)."""
    C = v.shape[0]
    half = C // 2
    out = v.clone()
    for i in range(half):
        theta = pos * base ** (-2 * i / C)
        a, b = v[i], v[i + half]
        out[i] = a * math.cos(theta) - b * math.sin(theta)
        out[i + half] = b * math.cos(theta) + a * math.sin(theta)
    return out


def _ffn(v, w1, w2):
    """A two-matrix SiLU FFN, v @ w1 then w2 (w1 [D, F], w2 [F, D])."""
    return torch.nn.functional.silu(v @ w1) @ w2


def _topk(probs, k):
    return sorted(range(len(probs)), key=lambda e: -float(probs[e]))[:k]


def _attention_reference(z, p: dict, K: int, C: int, eps: float):
    """Pre-mixing attention in float64, token by token and expert by expert. z: the normed input [S, B, D]."""
    Sq, Bs, D = z.shape
    out = torch.zeros_like(z)
    for b in range(Bs):
        keys = [_rope(p["w_k"] @ z[s, b], s) for s in range(Sq)]
        for t in range(Sq):
            logits = p["router"] @ z[t, b]
            probs = torch.softmax(logits, 0)

            def mix(q):  # causal softmax over the keys 0..t, values = the normed tokens themselves
                q = _rope(q, t)
                scores = torch.stack([torch.dot(q, keys[s]) / math.sqrt(C) for s in range(t + 1)])
                w = torch.softmax(scores, 0)
                return sum(w[s] * z[s, b] for s in range(t + 1))

            for e in _topk(probs, K):
                h = p["q_down"][e].t() @ z[t, b]  # A_e z   [R]
                h = h / torch.sqrt((h * h).mean() + eps) * p["q_norm"]
                q = p["w_res"] @ z[t, b] + p["q_up"][e].t() @ h  # z W_res + B_e RMSNorm(A_e z)
                out[t, b] = out[t, b] + probs[e] * _ffn(mix(q), p["w1"][e], p["w2"][e])
            out[t, b] = out[t, b] + _ffn(mix(p["w_shared_q"] @ z[t, b]), p["shared_w1"], p["shared_w2"])
    return out


def _ffn_reference(y, p: dict, k: int):
    """The FFN sublayer over the same experts, no mixing, its own router and shared expert."""
    out = torch.zeros_like(y)
    for s in range(y.shape[0]):
        for b in range(y.shape[1]):
            probs = torch.softmax(p["ffn_router"] @ y[s, b], 0)
            for e in _topk(probs, k):
                out[s, b] = out[s, b] + probs[e] * _ffn(y[s, b], p["w1"][e], p["w2"][e])
            out[s, b] = out[s, b] + _ffn(y[s, b], p["ffn_shared_w1"], p["ffn_shared_w2"])
    return out


def _seq_balance_reference(x, router, k: int, E: int):
    """E * sum_i f_i P_i per sequence, then the mean over sequences (float64 loops)."""
    total = 0.0
    for b in range(x.shape[1]):
        counts, psum = [0.0] * E, [0.0] * E
        for s in range(x.shape[0]):
            probs = torch.softmax(router @ x[s, b], 0)
            for e in _topk(probs, k):
                counts[e] += 1.0
            for e in range(E):
                psum[e] = psum[e] + probs[e]
        total = total + E * sum(counts[e] / (x.shape[0] * k) * psum[e] / x.shape[0] for e in range(E))
    return total / x.shape[1]


def _params64(layer) -> dict:
    att, ffn = layer.self_attention, layer.mlp
    C = att.qk_dim
    w = att.linear_qk.weight.detach()
    ex = ffn.moe.deepspeed_moe.experts
    raw = {"w_res": w[:C], "w_k": w[C:2 * C], "w_shared_q": w[2 * C:], "router": att.router.wg.weight,
           "q_down": att.q_down_EDR, "q_norm": att.q_norm_R, "q_up": att.q_up_ERC, "w1": ex.w1_LDF, "w2": ex.w2_LFD,
           "shared_w1": att.shared_ffn.linear_fc1.weight.t(), "shared_w2": att.shared_ffn.linear_fc2.weight.t(),
           "ffn_router": ffn.moe.deepspeed_moe.gate.wg.weight, "ffn_shared_w1": ffn.shared_ffn.linear_fc1.weight.t(),
           "ffn_shared_w2": ffn.shared_ffn.linear_fc2.weight.t()}
    return {n: t.detach().double().clone().requires_grad_() for n, t in raw.items()}


def test_premixing_attention_and_shared_ffn_equal_float64_loop_reference(single_rank):
    """Outputs, the input gradient and every parameter gradient of both sublayers of one UMoE layer, and the
    sequence-level balance losses of both routers (the attention's and the FFN's: aux_loss_weight 0.5)."""
    cfg = _cfg()
    model = _build(cfg)
    layer = model.decoder.layers[0]
    att, ffn = layer.self_attention, layer.mlp
    assert att.bank.module is ffn.moe  # 'shared': the attention calls the FFN's experts
    torch.manual_seed(1)
    z = torch.randn(S, B, 16)
    y = torch.randn(S, B, 16)
    g_att, g_ffn = torch.randn(S, B, 16), torch.randn(S, B, 16)
    rope = model.rotary_pos_emb(S)

    z32, y32 = z.clone().requires_grad_(), y.clone().requires_grad_()
    stats.clear(model)
    out_att, _ = att(z32, None, rotary_pos_emb=rope)
    out_ffn, _ = ffn(y32)
    aux, records = stats.take(model)
    ((out_att * g_att).sum() + (out_ffn * g_ffn).sum() + aux).backward()

    p = _params64(layer)
    z64, y64 = z.double().requires_grad_(), y.double().requires_grad_()
    ref_att = _attention_reference(z64, p, K=2, C=8, eps=att.config.layernorm_epsilon)
    ref_ffn = _ffn_reference(y64, p, k=3)
    ref_aux = 0.5 * (_seq_balance_reference(z64, p["router"], 2, 6) + _seq_balance_reference(y64, p["ffn_router"], 3, 6))
    ((ref_att * g_att.double()).sum() + (ref_ffn * g_ffn.double()).sum() + ref_aux).backward()

    assert [label for label, _ in records] == ["layer01.attention", "layer01.ffn"]
    assert ref_att.abs().mean() > 0.1 and ref_ffn.abs().mean() > 0.1  # not a vacuous comparison
    torch.testing.assert_close(out_att.double(), ref_att.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_ffn.double(), ref_ffn.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(aux.double(), ref_aux.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z32.grad.double(), z64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y32.grad.double(), y64.grad, rtol=1e-4, atol=1e-5)
    ours = {"router": att.router.wg.weight, "q_down": att.q_down_EDR, "q_norm": att.q_norm_R, "q_up": att.q_up_ERC,
            "w1": ffn.moe.deepspeed_moe.experts.w1_LDF, "w2": ffn.moe.deepspeed_moe.experts.w2_LFD,
            "ffn_router": ffn.moe.deepspeed_moe.gate.wg.weight}
    for name, t in ours.items():
        torch.testing.assert_close(t.grad.double(), p[name].grad, rtol=1e-4, atol=1e-5, msg=name)
    C = 8
    grad_qk = torch.cat([p["w_res"].grad, p["w_k"].grad, p["w_shared_q"].grad])
    torch.testing.assert_close(att.linear_qk.weight.grad.double(), grad_qk, rtol=1e-4, atol=1e-5)
    for mod, pre in ((att, ""), (ffn, "ffn_")):
        torch.testing.assert_close(mod.shared_ffn.linear_fc1.weight.grad.double(), p[pre + "shared_w1"].grad.t(),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mod.shared_ffn.linear_fc2.weight.grad.double(), p[pre + "shared_w2"].grad.t(),
                                   rtol=1e-4, atol=1e-5)
    assert C == att.qk_dim


def test_premixing_attention_is_causal(single_rank):
    model = _build(_cfg())
    att = model.decoder.layers[0].self_attention
    rope = model.rotary_pos_emb(S)
    z = torch.randn(S, B, 16)
    with torch.no_grad():
        before, _ = att(z, None, rotary_pos_emb=rope)
        z2 = z.clone()
        z2[4:] = torch.randn(S - 4, B, 16)  # change the later tokens only
        after, _ = att(z2, None, rotary_pos_emb=rope)
    torch.testing.assert_close(after[:4], before[:4])
    assert not torch.allclose(after[4:], before[4:])


def test_shared_experts_are_one_set_of_parameters_whose_gradients_add_up(single_rank):
    """With sharing on, both sublayers hold the same expert parameter objects and a joint backward gives the sum of
    the two sublayers' gradients; with sharing off the model has exactly one more expert bank per layer."""
    cfg = _cfg(num_layers=2)
    model = _build(cfg)
    layer = model.decoder.layers[1]
    bank = layer.mlp.moe
    assert layer.self_attention.bank.module is bank
    expert_ids = {id(p) for p in bank.deepspeed_moe.experts.parameters()}
    assert {id(p) for n, p in model.named_parameters() if "deepspeed_experts" in n or "_LDF" in n or "_LFD" in n} \
        >= expert_ids  # the experts appear once in the model's parameters
    assert sum(1 for p in model.parameters() if id(p) in expert_ids) == 2  # w1 and w2, once each
    rope = model.rotary_pos_emb(S)
    z, y = torch.randn(S, B, 16), torch.randn(S, B, 16)

    def grads(use_att: bool, use_ffn: bool):
        model.zero_grad()
        stats.clear(model)
        total = 0.0
        if use_att:
            total = total + layer.self_attention(z, None, rotary_pos_emb=rope)[0].square().sum()
        if use_ffn:
            total = total + layer.mlp(y)[0].square().sum()
        total.backward()
        stats.clear(model)
        return [p.grad.clone() for p in bank.deepspeed_moe.experts.parameters()]

    only_att, only_ffn, both = grads(True, False), grads(False, True), grads(True, True)
    for a, f, j in zip(only_att, only_ffn, both):
        assert a.abs().sum() > 0 and f.abs().sum() > 0
        torch.testing.assert_close(j, a + f)

    from wider.models import ARCHITECTURES
    from wider.models.gpt_moe import expert_params

    separate = _build(_cfg("separate", num_layers=2))
    bank_size = cfg.model.num_experts * expert_params(cfg.model)
    n_shared = sum(p.numel() for p in model.parameters())
    n_separate = sum(p.numel() for p in separate.parameters())
    assert n_separate - n_shared == cfg.model.num_layers * bank_size
    assert ARCHITECTURES["umoe"].count(_cfg("separate", num_layers=2), 64).total == n_separate
    assert separate.decoder.layers[0].self_attention.bank is not separate.decoder.layers[0].mlp.moe


@pytest.mark.parametrize("mode", ["shared", "separate", "attention", "ffn"])
def test_every_mode_trains_a_step_and_its_count_equals_the_built_model(single_rank, mode):
    from wider.models import ARCHITECTURES

    cfg = _cfg(mode, num_layers=2, hidden_size=32, init_method_std=0.02, head_dim=None if mode == "ffn" else 8)
    model = _build(cfg, 128)
    assert ARCHITECTURES["umoe"].count(cfg, 128).total == sum(p.numel() for p in model.parameters())
    tokens = torch.randint(0, 128, (2, S))
    stats.clear(model)
    loss = model(tokens, None, None, labels=tokens).mean()
    aux, records = stats.take(model)
    (loss + aux).backward()
    assert all(p.grad is not None for p in model.parameters())
    kinds = {label.split(".")[1] for label, _ in records}
    assert kinds == {"shared": {"attention", "ffn"}, "separate": {"attention", "ffn"}, "attention": {"attention"},
                     "ffn": {"ffn"}}[mode]


def _official_count(D, L, E, f, R, C, V=32000):
    """The official UMoE models' parameters, module by module (github.com/ysngki/UMoE modeling_deepseek.py with
    model_libs/configs *-UMoE-1024: PreMixMoEAttention and CorePreMixMoE, one shared expert each side)."""
    shapes = {"input_layernorm": D, "post_attention_layernorm": D, "q_res_proj": D * C, "k_proj": D * C,
              "shared_q_proj": D * C, "q_a_proj": D * E * R, "q_a_layernorm": R, "q_b_proj": E * R * C,
              "gate": E * D, "gate_ffn": E * D, "experts": E * 2 * D * f, "shared_experts": 2 * D * f,
              "ffn_shared_experts": 2 * D * f}
    return 2 * V * D + L * sum(shapes.values()) + D  # embed_tokens, lm_head, layers, final norm


OFFICIAL = {"umoe_small": _official_count(768, 12, 128, 192, 16, 192),
            "umoe_1b": _official_count(2048, 24, 64, 512, 36, 512)}


@pytest.mark.parametrize("name", ["umoe_small", "umoe_small_att", "umoe_small_ffn", "umoe_1b"])
def test_preset_counts_equal_the_meta_built_model(name):
    from wider import presets
    from wider.models import ARCHITECTURES

    cfg = validate(presets.get(name))
    pc = ARCHITECTURES["umoe"].count(cfg, 32000)
    if name in OFFICIAL:
        assert pc.total == OFFICIAL[name]
    small = validate(presets.get("umoe_small"))
    if name.startswith("umoe_small_"):  # the baselines are matched to UMoE's size (within 2%)
        assert abs(pc.total / ARCHITECTURES["umoe"].count(small, 32000).total - 1) < 0.02


def test_meta_build_of_the_small_preset(single_rank):
    from wider import presets
    from wider.models import ARCHITECTURES

    cfg = validate(presets.get("umoe_small"))
    with torch.device("meta"):
        model = ARCHITECTURES["umoe"].build(cfg, 32000, False, MoERuntime(SETTINGS))
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL["umoe_small"]


def test_umoe_config_errors_name_the_fix():
    from wider.config import ConfigError

    with pytest.raises(ConfigError, match="umoe_mode 'both' is invalid"):
        _cfg("both")
    with pytest.raises(ConfigError, match="attention_top_k 9 must be in"):
        _cfg(attention_top_k=9)
    with pytest.raises(ConfigError, match="query_rank must be a positive integer"):
        _cfg(query_rank=0)
    with pytest.raises(ConfigError, match="head_dim 4 with arch 'umoe'"):
        _cfg("ffn", head_dim=4)  # the 'ffn' baseline's ordinary attention has d / heads = 8 channels per head
    from wider.moe.settings import MoESettingsError

    with pytest.raises(MoESettingsError, match="aux_loss_scope must be 'batch' or 'sequence'"):
        MoESettings.from_block({"aux_loss_scope": "token"})


# --- expert parallelism through the launcher ---

EP_STEPS = 5
EP_ARGS = ["--preset", "umoe_smoke", *TINY, "--train-iters", str(EP_STEPS), "--num-experts", "8", "--moe-top-k", "2",
           "--moe-ffn-hidden-size", "32", "--head-dim", "16", "--attention-top-k", "2", "--query-rank", "4"]


def test_ep2_equals_ep1_on_two_ranks(data_args, tmp_path):
    """moe.ep_size 2 splits each layer's shared bank of 8 experts over the two ranks (the attention's and the FFN's
    assignments both travel by all-to-all) and gives the losses of ep_size 1 on the same two ranks and data."""
    files = [f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for layer in range(2) for e in range(8)]
    assert_ep2_equals_ep1([*EP_ARGS, *data_args], "recipes/pretrain_umoe.py", tmp_path, files, EP_STEPS)
