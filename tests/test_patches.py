"""Each patch: upstream still needs it (these fail when megatron-core fixes the problem, so the patch can
go), and with the patch the behaviour is right."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, child_env

needs_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the upstream failure is CPU-only")


# Each snippet fails on CPU with unpatched megatron-core 0.16.1; they run in one fresh interpreter (one import of
# megatron-core, not four), each in its own namespace, and report the traceback text they raised.
UPSTREAM = {
    "rope": """
        from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
        RotaryEmbedding(kv_channels=16, rotary_percent=1.0, use_cpu_initialization=True).get_emb(8)
    """,
    "seed": """
        from megatron.core.tensor_parallel import random
        random.model_parallel_cuda_manual_seed(1, tp_rank=0, ep_rank=0, etp_rank=0)
    """,
    "recompute": """
        import torch
        from megatron.core import tensor_parallel
        lin = torch.nn.Linear(4, 4)
        x = torch.randn(2, 4, requires_grad=True)
        tensor_parallel.checkpoint(lin, False, x).sum().backward()
    """,
    "kv_cache": """
        import types, torch
        from megatron.core.transformer.attention import Attention
        Attention._allocate_memory(types.SimpleNamespace(num_query_groups_per_partition=2), 8, 1, 4, torch.float32)
    """,
}
RUNNER = """
import json, sys, textwrap, traceback
out = {}
for name, code in json.loads(sys.argv[1]).items():
    try:
        exec(textwrap.dedent(code), {})
        out[name] = None
    except BaseException:
        out[name] = traceback.format_exc()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def upstream() -> dict:
    """snippet name -> the traceback it raised against unpatched megatron-core (None: it ran)."""
    p = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(UPSTREAM)], cwd=REPO, env=child_env(),
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def _fails_for_cuda(upstream: dict, name: str) -> bool:
    return upstream[name] is not None and "CUDA" in upstream[name]


@needs_cpu_only
def test_rope_patch_still_needed(upstream):
    assert _fails_for_cuda(upstream, "rope"), "upstream RoPE runs on CPU now: delete patches/rope_cpu.py"


@needs_cpu_only
def test_seed_patch_still_needed(upstream):
    assert _fails_for_cuda(upstream, "seed"), \
        "upstream seeding works without CUDA now: delete patches/cpu_rng_tracker.py"


def test_recompute_patch_still_needed(upstream):
    from megatron.core.tensor_parallel import random

    # Upstream recompute is still the reentrant autograd.Function that saves RNG states itself...
    assert issubclass(random.CheckpointFunction, torch.autograd.Function), \
        "upstream recompute changed: re-check patches/nonreentrant_recompute.py"
    if torch.cuda.is_available():
        return
    # ... and on CPU it fails outright.
    assert _fails_for_cuda(upstream, "recompute"), \
        "upstream recompute runs on CPU now: re-check patches/nonreentrant_recompute.py"


def test_patches_refuse_other_versions(monkeypatch):
    import patches

    monkeypatch.setattr(patches, "version", lambda pkg: "0.0.1")
    monkeypatch.setattr(patches, "_applied", set())
    with pytest.raises(RuntimeError, match="targets megatron-core 0.16.1 but 0.0.1"):
        patches.apply("rope_cpu")


def test_rope_patched_matches_float64_reference():
    import patches

    patches.apply("rope_cpu")
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    dim, seq, base = 16, 12, 10000
    emb = RotaryEmbedding(kv_channels=dim, rotary_percent=1.0, rotary_base=base, use_cpu_initialization=True)
    got = emb.get_emb(seq)
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    ang = torch.arange(seq, dtype=torch.float64)[:, None] * inv[None, :]
    ref = torch.cat([ang, ang], dim=-1)[:, None, None, :]
    assert got.shape == (seq, 1, 1, dim)
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-5)


def test_seed_patch_gives_reproducible_tracker_forks():
    import patches

    patches.apply("cpu_rng_tracker")
    from megatron.core.tensor_parallel import random

    def draw():
        random.model_parallel_cuda_manual_seed(7, tp_rank=1, ep_rank=0, etp_rank=0, force_reset_rng=True)
        torch.manual_seed(0)
        with random.get_cuda_rng_tracker().fork():
            a = torch.rand(4)
        b = torch.rand(4)  # the default stream continues as if the fork never happened
        return a, b

    a1, b1 = draw()
    a2, b2 = draw()
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(b1, b2)
    torch.manual_seed(0)
    torch.testing.assert_close(b1, torch.rand(4))
    assert not torch.equal(a1, b1)
    # tensor-parallel seed = seed + 2718 + tp_rank, as upstream
    g = torch.Generator().manual_seed(7 + 2718 + 1)
    torch.testing.assert_close(a1, torch.rand(4, generator=g))


def test_nonreentrant_recompute_gives_same_grads_and_fires_shared_hooks_once():
    import patches

    patches.apply("nonreentrant_recompute")
    from megatron.core import tensor_parallel

    torch.manual_seed(0)
    shared = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)

    def block(h):
        return torch.tanh(shared(h))

    def run(recompute: bool):
        shared.zero_grad()
        x.grad = None
        calls = []
        handle = shared.weight.register_post_accumulate_grad_hook(lambda p: calls.append(1))
        h = x
        for _ in range(3):  # the same parameters in three blocks, as in WideNet
            h = tensor_parallel.checkpoint(block, False, h) if recompute else block(h)
        h.sum().backward()
        handle.remove()
        return shared.weight.grad.clone(), x.grad.clone(), len(calls)

    g0, x0, n0 = run(False)
    g1, x1, n1 = run(True)
    torch.testing.assert_close(g0, g1)
    torch.testing.assert_close(x0, x1)
    assert n0 == n1 == 1
    with pytest.raises(ValueError, match="distribute_saved_activations"):
        tensor_parallel.checkpoint(block, True, x)


@needs_cpu_only
def test_kv_cache_patch_still_needed(upstream):
    assert _fails_for_cuda(upstream, "kv_cache"), \
        "upstream allocates the inference KV cache without CUDA now: delete patches/kv_cache_cpu.py"


def test_kv_cache_patch_allocates_upstreams_buffer_on_the_modules_device():
    import patches

    patches.apply("kv_cache_cpu")
    from megatron.core.transformer.attention import Attention

    holder = torch.nn.Linear(2, 2).to(torch.float64)  # stands for the attention's parameters
    holder.num_query_groups_per_partition = 3
    buf = Attention._allocate_memory(holder, 16, 2, 8, torch.bfloat16)
    assert buf.shape == (16, 2, 3, 8) and buf.dtype == torch.bfloat16 and buf.device == holder.weight.device
