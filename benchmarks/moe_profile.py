"""Where an MoE layer's time goes, per shape (issue 4 asks for a profile, not a guess).

    python benchmarks/moe_profile.py                  # GPU: the four shapes of DESIGN 7, 16384 tokens, bf16
    python benchmarks/moe_profile.py --cpu            # smaller shapes on the CPU (fp32)

For each shape, wider's MoE layer (dropless) runs forward + backward under torch.profiler; the kernels are
grouped into routing, planning (sorts and index arithmetic), gathers / combine, grouped GEMMs, activation
and other, and printed with their share of the device time. Beside it, the grouped GEMMs alone (the same six
GEMMs of forward + backward on the same row counts, no routing or data movement) give the bound that a
perfectly fused dispatch would approach, with mat_b stored row-major (our [L, D, F] weights) and
column-major (a transposed view of [L, F, D]).
"""

from __future__ import annotations

import argparse
import collections
import sys

import torch

from common import start  # benchmarks/common.py (scripts run from this directory)
from moe_layer import CPU_SHAPES, GPU_SHAPES, ours, time_fwd_bwd

# Kernel-name fragments -> category (first match wins; names differ between CPU ops and CUDA kernels, so both
# the aten op names and kernel substrings are listed).
CATEGORIES = [
    ("router / loss", ("softmax", "topk", "logsumexp", "sgemm", "xmma_gemm_f32", "cublasLt", "gemmk1")),
    ("batched GEMM (torch combine)", ("nvjet", "gemv", "wmma", "bmm")),
    ("grouped GEMM", ("grouped_mm", "GroupedGemm", "grouped_gemm", "cutlass", "Sm90", "sm90_xmma_gemm_group")),
    ("plan (sort, index math)", ("sort", "Sort", "radix", "scan", "cumsum", "scatter_", "arange", "remainder",
                                 "div", "floor")),
    ("gather / combine", ("_weighted_gather_sum", "_scaled_gather_dot", "index_select", "indexSelect", "index_add",
                          "gather", "where", "reduce_kernel",
                          "sum")),
    ("activation", ("gelu", "GeluCUDA", "silu", "relu")),
]


def categorise(name: str) -> str:
    for cat, frags in CATEGORIES:
        if any(f in name for f in frags):
            return cat
    return "other (casts, fills, copies)"


def profile_layer(module, x, device) -> tuple[list, float]:
    """Per-kernel device time of one fwd+bwd (after warm-up): [(name, us)], total us."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    def clear():  # parameter gradients would otherwise accumulate (an add kernel the layer does not have)
        for p in module.parameters():
            p.grad = None

    for _ in range(3):
        xi = x.detach().requires_grad_()
        module(xi)[0].float().sum().backward()
        clear()
    with profile(activities=acts) as prof:
        xi = x.detach().requires_grad_()
        module(xi)[0].float().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
    clear()
    rows = []
    for e in prof.key_averages():
        if device.type == "cuda":
            t = e.self_device_time_total
            if t > 0 and e.device_type.name == "CUDA":
                rows.append((e.key, t))
        else:
            if e.self_cpu_time_total > 0 and e.key.startswith("aten::"):
                rows.append((e.key, e.self_cpu_time_total))
    rows.sort(key=lambda r: -r[1])
    return rows, sum(t for _, t in rows)


def gemm_only_ms(d: int, E: int, k: int, de: int, tokens: int, device, dtype, column_major: bool) -> float:
    """The six grouped GEMMs of an expert FFN's forward + backward on a realistic row split (multinomial over
    experts), nothing else."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    rows = tokens * k
    counts = torch.bincount(torch.randint(0, E, (rows,)), minlength=E).to(device)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    x = torch.randn(rows, d, device=device, dtype=dtype)
    g = torch.randn(rows, d, device=device, dtype=dtype)
    if column_major:
        w1 = torch.randn(E, de, d, device=device, dtype=dtype).transpose(-2, -1)
        w2 = torch.randn(E, d, de, device=device, dtype=dtype).transpose(-2, -1)
    else:
        w1 = torch.randn(E, d, de, device=device, dtype=dtype)
        w2 = torch.randn(E, de, d, device=device, dtype=dtype)
    w1.requires_grad_()
    w2.requires_grad_()

    def step(_m, xi):
        return F.grouped_mm(F.grouped_mm(xi, w1, offs=offs), w2, offs=offs)

    ms, _ = time_fwd_bwd(torch.nn.Module(), x, step, iters=10, warmup=3)
    return ms


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="Small shapes in fp32 on the CPU.")
    ap.add_argument("--tokens", type=int, default=None, help="Tokens per pass (default 16384 GPU, 2048 CPU).")
    ap.add_argument("--top", type=int, default=12, help="Kernels listed per shape.")
    args = ap.parse_args(argv)
    device = start(args.cpu)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    tokens = args.tokens or (16384 if cuda else 2048)
    from wider import parallel

    print(f"device {torch.cuda.get_device_name() if cuda else 'CPU'} | {dtype} | {tokens} tokens | torch "
          f"{torch.__version__}", flush=True)
    for d, E, k, de in GPU_SHAPES if cuda else CPU_SHAPES:
        torch.manual_seed(0)
        x = torch.randn(tokens, d, device=device, dtype=dtype)
        module = ours(d, E, k, de, None).to(device=device, dtype=dtype)
        ms, _ = time_fwd_bwd(module, x, lambda m, xi: m(xi)[0], iters=10, warmup=3)
        rows, total = profile_layer(module, x, device)
        print(f"\n== d {d} E {E} k {k} de {de}: layer fwd+bwd {ms:.2f} ms wall, {total / 1e3:.2f} ms in kernels")
        by_cat = collections.Counter()
        for name, t in rows:
            by_cat[categorise(name)] += t
        for cat, t in by_cat.most_common():
            print(f"   {cat:<28} {t / 1e3:>8.3f} ms  {100 * t / total:>5.1f}%")
        print(f"   top kernels:")
        for name, t in rows[:args.top]:
            print(f"     {t / 1e3:>8.3f} ms  {name[:110]}")
        if hasattr(torch.nn.functional, "grouped_mm") and (cuda or dtype == torch.float32):
            for cm in (False, True):
                try:
                    g_ms = gemm_only_ms(d, E, k, de, tokens, device, dtype, cm)
                    print(f"   grouped GEMMs alone ({'column' if cm else 'row'}-major mat_b): {g_ms:.2f} ms "
                          f"({12.0 * tokens * k * d * de / (g_ms * 1e-3) / 1e12:.3g} TFLOP/s)")
                except Exception as e:
                    print(f"   grouped GEMMs alone ({'column' if cm else 'row'}-major): {type(e).__name__}: {e}")
        del module
    parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
