"""The expert fast path (grouped GEMM, fixed-shape dispatch) against the reference path (one matmul per expert):
same math, on uneven loads with empty experts, with and without drops, fp32 and bf16."""

from __future__ import annotations

import pytest
import torch

from wider.moe.settings import MoESettings

D, F = 32, 48


def _moe(E: int, k: int, settings: MoESettings, dtype=torch.float32, device="cpu", seed: int = 0):
    from wider.moe.layer import MoE

    torch.manual_seed(seed)
    moe = MoE(D, E, k, F, settings, renormalize=False, init_std=0.3, output_std=0.3)
    with torch.no_grad():  # uneven loads on inputs with a positive mean (_x): the last two experts are never
        w = moe.deepspeed_moe.gate.wg.weight  # chosen, expert 0 is popular
        w[-2:] = -0.5
        w[0] += 0.02
    return moe.to(device=device, dtype=dtype)


def _x(T: int) -> torch.Tensor:
    return torch.randn(T, D, generator=torch.Generator().manual_seed(T)) + 1.0


def _run(moe, x, kernel: str):
    moe.deepspeed_moe.experts.kernel = kernel
    x = x.clone().requires_grad_()
    out, aux, _ = moe(x)
    g = torch.linspace(-1, 1, out.numel(), device=out.device, dtype=out.dtype).reshape(out.shape)
    ((out * g).sum() + aux).backward()
    grads = [p.grad.clone() for p in moe.parameters()]
    for p in moe.parameters():
        p.grad = None
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("E,k,cf", [(8, 2, None), (8, 2, 0.75), (16, 4, 1.0), (6, 1, 0.5)])
def test_grouped_gemm_path_equals_reference_path_fp32(single_rank, E, k, cf):
    moe = _moe(E, k, MoESettings(capacity_factor=cf, eval_capacity_factor=cf, min_capacity=0))
    assert moe.deepspeed_moe.experts.kernel_name(torch.device("cpu"), torch.float32) == "grouped_mm"
    x = _x(96)
    fast = _run(moe, x, "grouped_mm")
    r = moe.records[-1]
    assert int((r.routed_E == 0).sum()) >= 2  # empty experts
    if cf is not None:
        assert int(r.kept_E.sum()) < int(r.routed_E.sum())  # drops
    ref = _run(moe, x, "loop")
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast[1], ref[1], rtol=1e-6, atol=1e-6)
    for a, b in zip(fast[2], ref[2]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert torch.isfinite(a).all()
    # Experts nobody chose get exactly zero gradient (parameters: router, w1, w2).
    assert fast[2][1][-2:].abs().sum() == 0 and fast[2][2][-2:].abs().sum() == 0


def test_bf16_within_one_percent_of_fp32(single_rank):
    """bf16 activations and weights (the GPU dtype; on CPU the expert kernel is the loop) against fp32."""
    s = MoESettings(capacity_factor=None, eval_capacity_factor=None)
    ref_moe = _moe(8, 2, s)
    moe = _moe(8, 2, s, dtype=torch.bfloat16)
    x = _x(128)
    out32, _, _ = _run(ref_moe, x, "auto")
    out16, _, _ = _run(moe, x.bfloat16(), "auto")
    rel = (out16.float() - out32).norm() / out32.norm()
    assert rel < 1e-2, rel


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_grouped_gemm_without_host_sync():
    """On CUDA in bf16 the fast path runs with torch's sync debug mode set to error: no device-to-host copy in
    routing, planning, experts or combine (one rank, no expert parallelism)."""
    from wider import parallel

    parallel.init_distributed(1)
    try:
        s = MoESettings(capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0)
        moe = _moe(8, 2, s, dtype=torch.bfloat16, device="cuda")
        ref = _moe(8, 2, s, device="cuda")
        assert moe.deepspeed_moe.experts.kernel_name(torch.device("cuda"), torch.bfloat16) == "grouped_mm"
        x = _x(4096).cuda()
        moe.exchange()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out, _, _ = moe(x.bfloat16())
        finally:
            torch.cuda.set_sync_debug_mode("default")
        want, _, _ = ref(x)
        assert (out.float() - want).norm() / want.norm() < 1e-2
    finally:
        parallel.destroy()
