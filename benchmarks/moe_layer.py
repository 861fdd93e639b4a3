"""One MoE FFN layer, forward + backward, against its peers in the same run (DESIGN section 7, issue 4).

    python benchmarks/moe_layer.py            # GPU: the four shapes of DESIGN 7, 16384 tokens, bf16
    python benchmarks/moe_layer.py --cpu      # these 2-core machines: smaller shapes, fp32, 2048 tokens

Columns per shape: the dense FFN whose width is k * d_expert (the same active FLOPs), wider's MoE (dropless
and capacity factor 1.25), DeepSpeed's stock MoE (capacity factor 1.25, deterministic gate), and
megatron-core's MoELayer with local experts (it needs CUDA: on CPU the row says why it did not run).
Time is the median of --iters timed fwd+bwd passes after --warmup; TFLOP/s counts active FLOPs only,
12 * tokens * k * d * d_expert per fwd+bwd (3 GEMM passes x 2 matrices x 2 FLOPs per multiply-add),
the router and the dispatch are overhead; "vs dense" is the ratio of TFLOP/s to the dense FFN's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from common import start  # benchmarks/common.py (scripts run from this directory)

GPU_SHAPES = [(1024, 8, 2, 4096), (1024, 64, 8, 512), (1024, 128, 16, 256), (2048, 16, 2, 8192)]
CPU_SHAPES = [(256, 8, 2, 1024), (256, 64, 8, 128), (256, 128, 16, 64), (512, 16, 2, 2048)]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fwd_bwd(module, x, call, iters: int, warmup: int) -> tuple[float, float]:
    """Median milliseconds of forward + backward, and the peak memory (GiB, CUDA only; NaN on CPU)."""
    device = x.device
    g = None
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + iters):
        xi = x.detach().requires_grad_()
        _sync(device)
        t0 = time.perf_counter()
        out = call(module, xi)
        if g is None:
            g = torch.randn_like(out)
        out.backward(g)
        _sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
        for p in module.parameters():
            p.grad = None
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def dense_ffn(d: int, width: int):
    return torch.nn.Sequential(torch.nn.Linear(d, width, bias=False), torch.nn.GELU(),
                               torch.nn.Linear(width, d, bias=False))


def ours(d: int, E: int, k: int, de: int, cf):
    from wider.moe.config import MoEConfig
    from wider.moe.layer import MoE
    from wider.moe.settings import MoESettings

    settings = MoESettings(capacity_factor=cf, eval_capacity_factor=cf, min_capacity=0, aux_loss_weight=0.01)
    return MoE(MoEConfig(hidden_size=d, num_experts=E, top_k=k, ffn_size=de, settings=settings))


def eager_routing(m, xi):
    from wider.moe.config import MoEConfig
    from wider.moe.layer import reconfigured

    with reconfigured(m, MoEConfig.eager):
        return m(xi)[0]


def deepspeed_stock(d: int, E: int, k: int, de: int):
    from deepspeed.moe.layer import MoE

    m = MoE(d, dense_ffn(d, de), num_experts=E, k=k, capacity_factor=1.25, eval_capacity_factor=1.25,
            min_capacity=0, noisy_gate_policy=None, drop_tokens=True, use_rts=False, top2_2nd_expert_sampling=False)
    m.set_deepspeed_parallelism()
    return m


def megatron_moe(d: int, E: int, k: int, de: int, dtype):
    """megatron-core 0.16.1 MoELayer with local experts (SequentialMLP), alltoall dispatcher, no drops.

    Needs Transformer Engine: 0.16.1's router GEMM (moe_utils.RouterGatingLinearFunction) tests
    `te_general_gemm is not None`, a name bound only when TE imports, so without TE every call raises
    NameError whatever moe_router_dtype is (seen on an H100 with torch 2.11, 2026-11-23). The row then says so."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=d, num_attention_heads=max(1, d // 128), ffn_hidden_size=4 * d,
                            moe_ffn_hidden_size=de, num_moe_experts=E, moe_router_topk=k, add_bias_linear=False,
                            moe_token_dispatcher_type="alltoall", moe_router_load_balancing_type="aux_loss",
                            moe_aux_loss_coeff=0.01, bf16=dtype == torch.bfloat16, params_dtype=dtype,
                            gated_linear_unit=False, activation_func=torch.nn.functional.gelu,
                            use_cpu_initialization=False)
    spec = get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=False)
    if torch.cuda.is_available():  # megatron's experts draw their init from its expert-parallel CUDA RNG
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(0)
    from megatron.core.transformer.spec_utils import build_module

    return build_module(spec.submodules.mlp, config=cfg)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="Small shapes in fp32 on the CPU (default: GPU shapes, bf16).")
    ap.add_argument("--tokens", type=int, default=None, help="Tokens per pass (default 16384 GPU, 2048 CPU).")
    ap.add_argument("--iters", type=int, default=None, help="Timed passes (default 20 GPU, 3 CPU).")
    ap.add_argument("--warmup", type=int, default=None, help="Untimed passes first (default 5 GPU, 1 CPU).")
    args = ap.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device: running the --cpu mode", flush=True)
    device = start(args.cpu)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    tokens = args.tokens or (16384 if cuda else 2048)
    iters = args.iters or (20 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    shapes = GPU_SHAPES if cuda else CPU_SHAPES
    from wider import parallel

    print(f"device {torch.cuda.get_device_name() if cuda else 'CPU'} | {dtype} | {tokens} tokens | torch "
          f"{torch.__version__} | median of {iters} fwd+bwd", flush=True)
    header = f"{'shape':<28} {'layer':<34} {'ms':>9} {'TFLOP/s':>9} {'vs dense':>9} {'peak GiB':>9}"
    print(header)
    print("-" * len(header))
    for d, E, k, de in shapes:
        torch.manual_seed(0)
        x = torch.randn(tokens, d, device=device, dtype=dtype)
        flops = 12.0 * tokens * k * d * de
        shape = f"d {d} E {E} k {k} de {de}"
        rows = []

        def add(name, build, call):
            try:
                module = build().to(device=device, dtype=dtype)
                ms, peak = time_fwd_bwd(module, x, call, iters, warmup)
                rows.append((name, ms, flops / (ms * 1e-3) / 1e12, peak))
            except Exception as e:  # a peer that cannot run here: say why, keep going
                rows.append((name, None, f"{type(e).__name__}: {str(e).splitlines()[0][:60]}", None))
            if device.type == "cuda":
                torch.cuda.empty_cache()

        add("dense FFN (k*de wide)", lambda: dense_ffn(d, k * de), lambda m, xi: m(xi))
        add("wider MoE dropless", lambda: ours(d, E, k, de, None), lambda m, xi: m(xi)[0])
        add("wider MoE cf 1.25", lambda: ours(d, E, k, de, 1.25), lambda m, xi: m(xi)[0])
        if cuda:  # what compiling the router and plan buys (launch overhead)
            add("wider MoE dropless, eager routing", lambda: ours(d, E, k, de, None), eager_routing)
        add("DeepSpeed stock MoE cf 1.25", lambda: deepspeed_stock(d, E, k, de), lambda m, xi: m(xi)[0])
        add("megatron-core MoELayer (local)", lambda: megatron_moe(d, E, k, de, dtype),
            lambda m, xi: m(xi.unsqueeze(1))[0].squeeze(1))
        dense_tflops = rows[0][2]
        for name, ms, tf, peak in rows:
            if ms is None:
                print(f"{shape:<28} {name:<34} {'n/a':>9}  {tf}")
                continue
            peak_s = f"{peak:.2f}" if peak == peak else "-"
            print(f"{shape:<28} {name:<34} {ms:>9.2f} {tf:>9.3f} {tf / dense_tflops:>9.2f} {peak_s:>9}", flush=True)
    parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
