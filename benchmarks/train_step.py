"""A whole training step (forward + backward + AdamW) for the dense GPT, WideNet and a fine-grained MoE, each
beside "the obvious build" (the same model with DeepSpeed's stock MoE in the MLP slot), in one run.

    python benchmarks/train_step.py           # GPU: 24 x 1024, 16 heads, seq 2048, micro-batch 8, bf16
    python benchmarks/train_step.py --cpu     # these 2-core machines: 4 x 256, seq 256, micro-batch 2, fp32
    python benchmarks/train_step.py --groups moeut   # only MoEUT-244M beside its dense baseline (16 x 1024)
    python benchmarks/train_step.py --groups umoe    # only umoe_small beside its FFN-MoE and dense baselines

Models (DESIGN section 7, issue 4): dense megatron-core GPT; WideNet E 8, k 2 (one attention and one MoE shared
by every block, expert width 4 d); fine-grained E 64, k 8, d_expert = d / 2 (G 8: the dense model's active
FLOPs); MoEUT-244M (issue 5) beside its dense baseline of equal parameters (moeut_dense_244m), 16 x 1024 tokens
per step; umoe_small (issue 7) beside its FFN-MoE baseline (umoe_small_ffn) and its dense baseline
(umoe_small_dense), 8 x 1024 tokens per step, vocabulary 32000 (CPU: umoe_smoke and its two baselines at the smoke
shape). MoE layers are dropless for ours and capacity 1.25 for the stock layer (it has no dropless top-k path
that avoids its [tokens, experts, capacity] tensors). Tokens/s is the median over --iters steps after
--warmup; MFU = training FLOPs / (step time * peak) with the training FLOPs per token of
wider.models.training_flops_per_token (6 * N_active plus the attention products, 12 * layers * heads * d_head * seq
for ordinary attention: DESIGN 7; UMoE's pre-mixing heads count their D-wide values), with --peak-tflops (H100 bf16
dense: 989) and shown on GPU only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from common import start  # benchmarks/common.py (scripts run from this directory)


class StockMoEMLP(torch.nn.Module):
    """The obvious build: deepspeed.moe.layer.MoE in megatron's MLP slot."""

    def __init__(self, config, d: int, E: int, k: int, de: int):
        super().__init__()
        from deepspeed.moe.layer import MoE

        expert = torch.nn.Sequential(torch.nn.Linear(d, de, bias=False), torch.nn.GELU(),
                                     torch.nn.Linear(de, d, bias=False))
        self.moe = MoE(d, expert, num_experts=E, k=k, capacity_factor=1.25, eval_capacity_factor=1.25,
                       min_capacity=0, noisy_gate_policy=None, use_rts=False, top2_2nd_expert_sampling=False)
        self.moe.set_deepspeed_parallelism()

    def forward(self, hidden_states, padding_mask=None, **_):
        out, l_aux, _ = self.moe(hidden_states)
        return out, None


def build(kind: str, obvious: bool, cfg, vocab: int, bf16: bool):
    """(model, training FLOPs per token)."""
    from wider.models import ARCHITECTURES, training_flops_per_token
    from wider.moe.config import MoERuntime
    from wider.moe.settings import MoESettings

    m = cfg.model
    count = ARCHITECTURES[m.arch].count(cfg, vocab)
    model = ARCHITECTURES[m.arch].build(cfg, vocab, bf16,
                                        MoERuntime(MoESettings(capacity_factor=None, eval_capacity_factor=None)))
    if obvious:
        from wider.models.gpt_moe import MoEMLP
        from wider.models.widenet import point_at_shared

        stock = lambda: StockMoEMLP(None, m.hidden_size, m.num_experts, m.moe_top_k, m.expert_ffn_size)
        if kind == "widenet":  # one stock MoE, shared by every block like ours
            model.decoder.shared_moe = stock()
            for layer in model.decoder.layers:
                point_at_shared(layer, "mlp", model.decoder.shared_moe)
        else:
            for layer in model.decoder.layers:
                if isinstance(layer.mlp, MoEMLP):
                    layer.mlp = stock()
    return model, training_flops_per_token(cfg, count)


def configs(cpu: bool):
    """(group, label, arch, config, micro-batch or None for --micro-batch); "vs dense" compares within a group."""
    from wider import presets

    base = presets.get("gpt_350m")
    shape = (dict(num_layers=4, hidden_size=256, num_attention_heads=4, seq_length=256) if cpu
             else dict(num_layers=24, hidden_size=1024, num_attention_heads=16, seq_length=2048))
    shape.update(tie_embeddings=False, vocab_size=8000)
    d = shape["hidden_size"]
    dense = presets.replace(base, model=shape)
    wide = presets.replace(base, model=dict(**shape, arch="widenet", num_experts=8, moe_top_k=2,
                                            moe_ffn_hidden_size=4 * d))
    fine = presets.replace(base, model=dict(**shape, arch="gpt_moe", num_experts=64, moe_top_k=8,
                                            moe_ffn_hidden_size=d // 2, moe_layer_freq=1))
    # MoEUT-244M beside its dense baseline of equal parameters, 16 x 1024 tokens per step as in DESIGN 7's
    # measurement of the official code (CPU: the smoke sizes).
    moeut, moeut_dense = (("moeut_smoke", "gpt_smoke") if cpu else ("moeut_244m", "moeut_dense_244m"))
    mb_ut = 2 if cpu else 16
    # umoe_small beside the paper's FFN-MoE and dense baselines (CPU: the smoke shape in the three modes).
    if cpu:
        um = presets.get("umoe_smoke")
        um_ffn = presets.replace(um, model=dict(umoe_mode="ffn", head_dim=None))
        um_dense = presets.replace(presets.get("gpt_smoke"), model=dict(
            num_layers=um.model.num_layers, hidden_size=um.model.hidden_size, num_attention_heads=4, activation="silu",
            normalization="RMSNorm", add_bias_linear=False, tie_embeddings=False))
    else:
        um, um_ffn, um_dense = (presets.get(n) for n in ("umoe_small", "umoe_small_ffn", "umoe_small_dense"))
    mb_um = 2 if cpu else 8
    return [("gpt", "dense GPT", "gpt", dense, None), ("gpt", "WideNet E8 k2", "widenet", wide, None),
            ("gpt", "fine-grained E64 k8", "gpt_moe", fine, None),
            ("moeut", moeut_dense, "gpt", presets.get(moeut_dense), mb_ut),
            ("moeut", moeut, "moeut", presets.get(moeut), mb_ut),
            ("umoe", "umoe dense baseline", "gpt", um_dense, mb_um),
            ("umoe", "umoe FFN-MoE baseline", "umoe", um_ffn, mb_um),
            ("umoe", "UMoE (shared experts)", "umoe", um, mb_um)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="Small shapes in fp32 on the CPU.")
    ap.add_argument("--micro-batch", type=int, default=None, help="Sequences per step (default 8 GPU, 2 CPU).")
    ap.add_argument("--iters", type=int, default=None, help="Timed steps (default 10 GPU, 3 CPU).")
    ap.add_argument("--warmup", type=int, default=None, help="Untimed steps first (default 3 GPU, 1 CPU).")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="Dense bf16 peak for MFU (H100: 989).")
    ap.add_argument("--groups", nargs="+", default=["gpt", "moeut", "umoe"], choices=["gpt", "moeut", "umoe"],
                    help="Which comparisons: gpt (dense / WideNet / fine-grained at 24 x 1024), moeut "
                         "(MoEUT-244M beside its dense baseline) and umoe (umoe_small beside its FFN-MoE and dense "
                         "baselines). Default all three.")
    args = ap.parse_args(argv)
    device = start(args.cpu)
    cuda = bf16 = device.type == "cuda"
    mb = args.micro_batch or (8 if cuda else 2)
    iters = args.iters or (10 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    from wider import parallel

    print(f"device {torch.cuda.get_device_name() if cuda else 'CPU'} | {'bf16' if bf16 else 'fp32'} | micro-batch {mb}"
          f" | median of {iters} steps", flush=True)
    header = f"{'model':<22} {'build':<20} {'step ms':>9} {'tokens/s':>10} {'MFU':>7} {'vs dense':>9} {'peak GiB':>9}"
    print(header)
    print("-" * len(header))
    dense_ms = {}
    for group, label, kind, cfg, mb_cfg in configs(not cuda):
        if group not in args.groups:
            continue
        m = cfg.model
        mb_run = mb_cfg or mb
        for obvious in ([False, True] if kind in ("widenet", "gpt_moe") else [False]):
            parallel.set_seed(1)
            vocab = m.vocab_size or 8000
            try:
                model, flops_per_token = build(kind, obvious, cfg, vocab, bf16)
            except Exception as e:
                print(f"{label:<22} {'stock DeepSpeed MoE' if obvious else 'wider':<20} n/a  {type(e).__name__}: {e}")
                continue
            model = model.to(device=device, dtype=torch.bfloat16 if bf16 else torch.float32)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=cuda)
            tokens = torch.randint(0, vocab, (mb_run, m.seq_length), device=device)
            pos = torch.arange(m.seq_length, device=device).expand(mb_run, -1)
            times = []
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            from wider.moe import stats

            for i in range(warmup + iters):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                stats.clear(model)
                loss = model(tokens, pos, None, labels=tokens).float().mean()
                aux, _ = stats.take(model)
                (loss if aux is None else loss + aux).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.synchronize()
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
            step = statistics.median(times)
            ntok = mb_run * m.seq_length
            flops = flops_per_token * ntok
            mfu = f"{flops / step / (args.peak_tflops * 1e12):.3f}" if cuda else "-"
            if kind == "gpt":
                dense_ms[group] = step
            peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if cuda else "-"
            print(f"{label:<22} {'stock DeepSpeed MoE' if obvious else 'wider':<20} {step * 1e3:>9.1f} "
                  f"{ntok / step:>10.0f} {mfu:>7} {step / dense_ms[group]:>8.2f}x {peak:>9}", flush=True)
            del model, opt
    parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
